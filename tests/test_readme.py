"""README's Python snippets run as written: each in a fresh interpreter, in README order, in one
empty working folder (as a reader pasting them one after another would). They use the bundled
demo model (a tiny checkpoint) and the data the snippets themselves generate."""

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def test_readme_has_the_snippets_this_test_expects():
    assert len(SNIPPETS) >= 4  # aot compile, ArrayRecord, pipeline, use from Python


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


SERVER = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def demo_server():
    """`python -m qwenvl_jax.serve` as the README starts it (bundled model, port 8000), for the
    snippets that talk to it."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable, "-m", "qwenvl_jax.serve"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while True:
        try:
            with urllib.request.urlopen(SERVER + "/health", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the README's server did not start: {proc.stderr.read()[-3000:]}")
            time.sleep(0.5)
    yield
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs_as_written(index, workdir, request):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one device, as on a reader's machine
    if SERVER in SNIPPETS[index]:
        request.getfixturevalue("demo_server")
    proc = subprocess.run([sys.executable, "-c", SNIPPETS[index]], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"README snippet {index}:\n{SNIPPETS[index]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
