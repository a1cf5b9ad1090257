"""Every Python example runs as written (each starts its own local Ray)."""

import os
import subprocess
import sys

import pytest
from ports import free_port

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EXAMPLES = [
    ("actor_wrapper_usage.py", []),
    ("task_wrapper.py", []),
    ("frameworks.py", []),
    ("ray_data_demo.py", ["--size-mb", "16", "--rows", "32"]),
    # Serve's HTTP port: one found free when the test runs (a fixed one may
    # be taken on the machine), filled in below.
    ("serve_deployment.py", ["--port", None]),
    ("serve_many_models.py", ["--port", None]),
    ("serve_updates.py", ["--port", None]),
    ("checkpoints.py", []),
    ("quantized_and_audio.py", []),
    ("diffusers_pipeline.py", []),
    ("sentence_embeddings.py", []),
]


@pytest.mark.parametrize("name, args", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_runs(name, args):
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    args = [str(free_port()) if a is None else a for a in args]
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "python", name), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
