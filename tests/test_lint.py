"""The code base stays lint-clean (pyflakes errors, pycodestyle, import order): ruff, configured in
pyproject.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    assert Path(ruff).exists(), "ruff is not installed: pip install -e '.[test]'"
    r = subprocess.run([ruff, "check", "qwenvl_jax", "tests", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]


def test_lower_layers_do_not_import_upper_ones():
    """The model, kernels, processing and weights layers never import generation, training, data or
    the CLIs (not even inside a function): no import cycles, and each layer is usable alone."""
    import ast

    lower = ("model", "kernels", "processing", "weights")
    upper = tuple(f"qwenvl_jax.{m}" for m in ("generation", "train", "data", "infer", "eval", "convert", "demo",
                                                "serve", "aot", "plan", "pretrained"))
    bad = []
    for pkg in lower:
        for file in (ROOT / "qwenvl_jax" / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                bad += [f"{file.relative_to(ROOT)}: {n}" for n in names if n.startswith(upper)]
    assert not bad, bad
