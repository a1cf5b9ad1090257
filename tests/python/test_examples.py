"""Every Python example runs as written (each starts its own local Ray)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EXAMPLES = [
    ("actor_wrapper_usage.py", []),
    ("task_wrapper.py", []),
    ("frameworks.py", []),
    ("ray_data_demo.py", ["--size-mb", "16", "--rows", "32"]),
    ("serve_deployment.py", ["--port", "8471"]),
    ("serve_many_models.py", ["--port", "8472"]),
    ("serve_updates.py", ["--port", "8473"]),
    ("checkpoints.py", []),
    ("quantized_and_audio.py", []),
    ("diffusers_pipeline.py", []),
    ("sentence_embeddings.py", []),
]


@pytest.mark.parametrize("name, args", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_runs(name, args):
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "python", name), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
