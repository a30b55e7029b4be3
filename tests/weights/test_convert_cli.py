"""python -m qwenvl_jax.convert: bf16 checkpoint in, bf16 checkpoint out, bit-identical tensors."""

import copy
import subprocess
import sys

import ml_dtypes  # noqa: F401  (bfloat16 for safetensors' numpy reader)
import numpy as np
import torch
from safetensors.numpy import load_file


def test_convert_keeps_dtype_and_tensors(tiny_checkpoint, tmp_path):
    _, hf = tiny_checkpoint("tied_w56")
    src = tmp_path / "src"
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(src)  # the shared fixture stays float32
    (src / "preprocessor_config.json").write_text('{"min_pixels": 3136, "max_pixels": 12845056}')
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "qwenvl_jax.convert", "--checkpoint", str(src), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ref, got = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(got) == set(ref) - {"lm_head.weight"}  # tied: written without lm_head, as HF does
    for name in got:
        assert got[name].dtype == ref[name].dtype and np.array_equal(got[name], ref[name]), name
    assert (out / "preprocessor_config.json").is_file()


def test_convert_bad_checkpoint_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qwenvl_jax.convert", "--checkpoint", str(tmp_path / "none"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "config.json" in r.stderr and "Traceback" not in r.stderr


def test_convert_output_problems_before_loading(tiny_checkpoint, tmp_path, capsys):
    """A bad --out or shard size is one line before any loading, and nothing is written."""
    from qwenvl_jax import convert

    src, _ = tiny_checkpoint("tied_w56")
    a_file = tmp_path / "taken"
    a_file.write_text("keep me")
    capsys.readouterr()  # the fixture's own output
    for extra, needle in ((["--out", str(a_file)], "is a file, not a directory"),
                          (["--out", str(tmp_path / "o"), "--max-shard-size-gb", "nan"], "must be a positive number"),
                          (["--out", str(tmp_path / "o"), "--max-shard-size-gb", "0"], "must be a positive number"),
                          (["--out", str(a_file / "sub")], "cannot write into")):
        assert convert.main(["--checkpoint", str(src), *extra]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert a_file.read_text() == "keep me" and not (tmp_path / "o").exists()
