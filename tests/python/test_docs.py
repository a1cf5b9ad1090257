"""Every Python code block in the docs and the README runs in `make test`:
either as it is (marked `<!-- test: run -->`) or through the example it
points to (`<!-- test: examples/python/NAME.py -->`), which the examples
test runs. A block with neither fails here."""

import os
import re
import subprocess
import sys

import pytest
from test_examples import EXAMPLES

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MARK = re.compile(r"<!-- test: (\S+) -->")


def python_blocks():
    pages = [os.path.join(ROOT, "README.md")]
    for d, _, files in os.walk(os.path.join(ROOT, "docs")):
        pages += [os.path.join(d, f) for f in sorted(files) if f.endswith(".md")]
    for page in pages:
        lines = open(page).read().splitlines()
        for i, line in enumerate(lines):
            if line.strip() != "```python":
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            mark = MARK.search(before)
            yield os.path.relpath(page, ROOT), i + 1, mark.group(1) if mark else None, "\n".join(lines[i + 1 : end])


BLOCKS = list(python_blocks())


@pytest.mark.parametrize("page, line, mark, code", BLOCKS, ids=[f"{b[0]}:{b[1]}" for b in BLOCKS])
def test_every_python_block_runs(page, line, mark, code, tmp_path):
    assert mark is not None, (
        f"{page}:{line}: a Python block needs <!-- test: run --> or <!-- test: examples/python/NAME.py -->"
    )
    if mark == "run":
        env = dict(os.environ, RAY_AUTH_MODE="disabled")
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, f"{page}:{line}:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    else:
        assert os.path.isfile(os.path.join(ROOT, mark)), f"{page}:{line}: {mark} does not exist"
        assert os.path.basename(mark) in {name for name, _ in EXAMPLES}, (
            f"{page}:{line}: {mark} is not run by test_examples"
        )


def test_the_docs_have_python_blocks():
    assert len(BLOCKS) > 15
