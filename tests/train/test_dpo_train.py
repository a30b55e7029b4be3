"""DPO through the training CLI: from the reference (loss log 2) the policy learns to prefer the
chosen answers; the reference model stays the initial weights."""

import json
import math
from pathlib import Path

from qwenvl_jax.train.__main__ import main
from qwenvl_jax.train.synthetic import write_synthetic_dataset

ROOT = Path(__file__).resolve().parents[2]


def test_dpo_run_prefers_chosen(tmp_path, capsys):
    synth = write_synthetic_dataset(tmp_path / "synth", samples=16)
    pairs = []
    for line in (synth / "train.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "conversations" not in rec:
            continue
        question = rec["conversations"][0]["value"].replace("<image>\n", "")
        answer = rec["conversations"][1]["value"]
        wrong = "five" if answer != "five" else "red"
        pairs.append({"messages": [{"role": "user", "content": [{"type": "image", "image": rec["image"]},
                                                                {"type": "text", "text": question}]}],
                      "chosen": answer, "rejected": wrong})
    (synth / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "run"
    code = main(["--config", str(ROOT / "configs/train/tiny.yaml"), f"output_dir={out}", "train.stage=dpo",
                 f"model.tokenizer={synth}", f"data.path={synth / 'pairs.jsonl'}", f"data.root={synth}",
                 "data.seq_len=128", "data.patch_budget=256", "data.batch_size=2", "train.steps=12",
                 "optim.learning_rate=1e-3", "train.dpo_beta=0.5", "checkpoint.every=100"])
    assert code == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert abs(lines[0]["loss"] - math.log(2)) < 1e-4  # policy == reference at step 1
    assert lines[-1]["loss"] < 0.5 * math.log(2)
    assert lines[-1]["reward_accuracy"] == 1.0 and lines[-1]["rewards_chosen"] > lines[-1]["rewards_rejected"]
