"""A run killed by SIGTERM at step k and restarted continues exactly: the same losses for the
remaining steps as an uninterrupted run (same data order, same parameters); and the CLI's
outputs (metrics.jsonl, checkpoints, HF export, the last step's metrics on stdout) are there; a
restart after the last step only re-exports and prints nothing on stdout."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from qwenvl_jax.train.__main__ import main

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--config", str(ROOT / "configs/train/tiny.yaml"), "data.seq_len=128", "data.patch_budget=256",
        "data.batch_size=2", "data.packing_bins=4", "train.steps=8", "train.log_every=1", "checkpoint.every=100"]


def _losses(out: Path) -> dict:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines}  # a re-run step keeps its last value


def test_sigterm_then_resume_matches_uninterrupted(tmp_path, capsys):
    full = tmp_path / "full"
    assert main(ARGS + [f"output_dir={full}", "--export-hf", str(tmp_path / "hf")]) == 0
    assert sorted(_losses(full)) == list(range(1, 9))
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()
    assert json.loads(capsys.readouterr().out.strip())["step"] == 8  # stdout: the last step's metrics alone
    # Restarted after the last step: nothing to train, the export is redone, and stdout stays empty.
    assert main(ARGS + [f"output_dir={full}", "--export-hf", str(tmp_path / "hf2")]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "no step to run" in err
    assert sorted(_losses(full)) == list(range(1, 9))
    assert {p.name for p in (tmp_path / "hf2").iterdir()} == {p.name for p in (tmp_path / "hf").iterdir()}

    cut = tmp_path / "cut"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "qwenvl_jax.train", *ARGS, f"output_dir={cut}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            metrics = cut / "metrics.jsonl"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    stopped_at = json.loads(out.strip().splitlines()[-1])
    assert stopped_at["stopped"] == "preempted" and 3 <= stopped_at["step"] < 8
    assert main(ARGS + [f"output_dir={cut}"]) == 0
    assert "resumed from step" in capsys.readouterr().err
    assert _losses(cut) == _losses(full)


def test_unreadable_checkpoint_falls_back_and_metrics_do_not_repeat(tmp_path, capsys):
    """A damaged latest checkpoint is set aside with a warning and the one before it resumes (the
    re-run steps give the same losses); metrics.jsonl rows past the checkpoint (a kill) are dropped,
    not repeated; train.steps below the checkpoint's step is one error line."""
    out = tmp_path / "run"
    args = ARGS + [f"output_dir={out}", "train.steps=4", "checkpoint.every=2"]
    assert main(args) == 0
    first = _losses(out)
    assert sorted(first) == [1, 2, 3, 4]
    damaged = [f for f in (out / "checkpoints" / "4").rglob("*") if f.is_file()]
    assert damaged
    for f in damaged:
        f.write_bytes(b"\0garbage")
    with open(out / "metrics.jsonl", "a") as f:  # steps 5-6 ran before a kill, then half a line
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + json.dumps({"step": 6, "loss": 1.0}) + "\n{\"st")
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "checkpoint step 4 cannot be restored" in err and "resuming from step 2" in err
    assert (out / "checkpoints_unreadable" / "4").is_dir()
    rows = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4]
    assert _losses(out) == first  # steps 3-4 re-run from step 2's state and data position

    assert main(ARGS + [f"output_dir={out}", "train.steps=3"]) == 1
    err = capsys.readouterr().err
    assert "train.steps=3 is below step 4 of the checkpoint" in err and len(err.strip().splitlines()) <= 3
