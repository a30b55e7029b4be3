"""README's Python snippets run as written: each in a fresh interpreter, in README order, in one
empty working folder (as a reader pasting them one after another would). They use the bundled
demo model (a tiny checkpoint) and the data the snippets themselves generate."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def test_readme_has_the_snippets_this_test_expects():
    assert len(SNIPPETS) >= 4  # aot compile, ArrayRecord, pipeline, use from Python


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs_as_written(index, workdir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one device, as on a reader's machine
    proc = subprocess.run([sys.executable, "-c", SNIPPETS[index]], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"README snippet {index}:\n{SNIPPETS[index]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
