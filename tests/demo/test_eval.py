"""qwenvl_jax.eval: IoU, matching and scoring on hand-made predictions; the batching plumbing with a stub
generator (no model compile); user errors as one line."""

import json

import pytest

import qwenvl_jax.generation.decode as decode
from qwenvl_jax import eval as ev
from qwenvl_jax.demo.make_data import main as make_data


def test_iou():
    assert ev.iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert ev.iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    assert ev.iou([0, 0, 10, 10], [2, 2, 4, 4]) == pytest.approx(0.04)
    assert ev.iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges share no area
    assert ev.iou([0, 0, 10, 10], [30, 30, 40, 40]) == 0.0
    assert ev.iou([5, 5, 5, 5], [5, 5, 5, 5]) == 0.0  # empty boxes


def test_matching_is_one_to_one():
    truth = [[0, 0, 10, 10], [20, 0, 30, 10]]
    assert ev.match_boxes(truth, [[0, 0, 10, 10], [0, 0, 10, 10]]) == [1.0, 0.0]
    assert ev.match_boxes(truth, [[20, 0, 30, 10], [1, 0, 10, 10]]) == [0.9, 1.0]
    assert ev.match_boxes(truth, []) == [0.0, 0.0]


def _box(*boxes, label="red circle"):
    return json.dumps([{"bbox_2d": b, "label": label} for b in boxes], separators=(",", ":"))


RECORDS = [
    {"task": "count", "answer": "2"},
    {"task": "count", "answer": "3"},
    {"task": "attribute", "answer": "blue"},
    {"task": "ground", "answer": _box([10, 10, 50, 50]), "boxes": [[10, 10, 50, 50]]},
    {"task": "ground", "answer": _box([0, 0, 20, 20], [100, 100, 140, 140]),
     "boxes": [[0, 0, 20, 20], [100, 100, 140, 140]]},
    {"task": None, "answer": "Hello!"},
]


def test_score_perfect():
    spaced = '```json\n[{"bbox_2d": [0, 0, 20, 20], "label": "red circle"}, ' \
             '{"bbox_2d": [100, 100, 140, 140], "label": "Red circle"}]\n```'
    preds = ["2", " 3.", "Blue", RECORDS[3]["answer"], spaced, "hello!"]
    out = ev.score(RECORDS, preds)
    assert out == {"counting_accuracy": 1.0, "attribute_accuracy": 1.0, "exact_accuracy": 1.0,
                   "grounding_iou50": 1.0, "grounding_precision50": 1.0, "grounding_mean_iou": 1.0,
                   "n": 6, "n_count": 2, "n_attribute": 1, "n_ground": 2, "by_form": {}}


def test_score_by_question_form():
    """by_form splits the scores by make_data's question form: per form n, accuracy, and for
    grounding forms the share of boxes at IoU >= 0.5."""
    records = [{**RECORDS[0], "form": "count_color_kind"}, {**RECORDS[1], "form": "count_all"},
               {**RECORDS[2], "form": "color"}, {**RECORDS[3], "form": "ground"},
               {**RECORDS[4], "form": "ground"}]
    preds = ["2", "4", "blue", RECORDS[3]["answer"], _box([0, 0, 20, 20])]  # 2nd ground: one box of two
    out = ev.score(records, preds)["by_form"]
    assert out == {"color": {"n": 1, "accuracy": 1.0}, "count_all": {"n": 1, "accuracy": 0.0},
                   "count_color_kind": {"n": 1, "accuracy": 1.0},
                   "ground": {"n": 2, "accuracy": 0.5, "iou50": round(2 / 3, 4)}}


def test_score_wrong_malformed_and_missing():
    preds = ["two", "3", "red",
             _box([200, 200, 240, 240]),  # far off
             _box([0, 0, 20, 20]) + "}{[",  # one of two boxes, junk after it
             "Hi"]
    out = ev.score(RECORDS, preds)
    assert out["counting_accuracy"] == 0.5 and out["attribute_accuracy"] == 0.0
    assert out["exact_accuracy"] == round(1 / 6, 4)
    assert out["grounding_iou50"] == round(1 / 3, 4) and out["grounding_mean_iou"] == round(1 / 3, 4)
    assert out["grounding_precision50"] == 0.5
    ground = RECORDS[3:5]
    broken = ev.score(ground, ['[{"bbox_2d": [10, 10, 50', "no boxes here"])
    assert broken["grounding_iou50"] == 0.0 and broken["grounding_precision50"] == 0.0
    half = ev.score(ground, [_box([10, 10, 50, 70]), _box([0, 0, 20, 20], [100, 100, 140, 140], label="x")])
    assert half["grounding_iou50"] == 1.0 and half["exact_accuracy"] == 0.0  # IoU 2/3 passes; a wrong label is inexact
    assert half["grounding_mean_iou"] == round((2 / 3 + 2) / 3, 4)


def test_detect_scores_as_grounding():
    """make_data's "Locate every shape." answers (a label per box) count toward the grounding metrics."""
    answer = json.dumps([{"bbox_2d": [0, 0, 20, 20], "label": "red circle"},
                         {"bbox_2d": [100, 100, 140, 140], "label": "blue square"}], separators=(",", ":"))
    record = {"task": "detect", "answer": answer, "boxes": [[0, 0, 20, 20], [100, 100, 140, 140]]}
    out = ev.score([record], [answer])
    assert out["n_ground"] == 1 and out["grounding_iou50"] == 1.0 and out["exact_accuracy"] == 1.0
    one = ev.score([record], [_box([0, 0, 20, 20])])  # one of the two boxes, and the wrong label
    assert one["grounding_iou50"] == 0.5 and one["exact_accuracy"] == 0.0


def test_score_without_tasks_and_length_check():
    out = ev.score([{"task": None, "answer": "a"}], ["a"])
    assert out["exact_accuracy"] == 1.0 and out["counting_accuracy"] is None and out["grounding_iou50"] is None
    with pytest.raises(ValueError, match="2 records but 1 predictions"):
        ev.score(RECORDS[:2], ["2"])


class _StubModel:
    def prepare(self, **batch):
        return batch


def test_evaluate_batches_prompts(tmp_path, monkeypatch):
    """Real processor and images, a generator that answers from a queue: the plumbing, without a model."""
    from qwenvl_jax.processing.processor import Processor

    assert make_data(["--out", str(tmp_path), "--n", "7", "--seed", "5"]) == 0
    records = ev.load_records(tmp_path / "train.jsonl")
    processor = Processor.from_pretrained(tmp_path)
    answers = iter([r["meta"]["answer"] for r in records])
    calls = []

    def fake_generate(model, batch, *, max_new_tokens, eos_token_ids, pad_token_id):
        rows = len(batch["input_ids"])
        calls.append((rows, batch["attention_mask"][:, 0].tolist(), int(batch["image_grid_thw"].shape[0])))
        ids = [processor.tokenizer.encode(next(answers)) + [eos_token_ids[0]] for _ in range(rows)]
        return decode.GenerationOutput(ids, [0] * rows, 0.0, 0.0, 0, 0.0)

    monkeypatch.setattr(decode, "generate", fake_generate)
    rows = []
    out = ev.evaluate(_StubModel(), processor, records, tmp_path, batch_size=3, predictions_out=rows)
    assert [c[0] for c in calls] == [3, 3, 1] and [c[2] for c in calls] == [3, 3, 1]
    assert any(0 in c[1] for c in calls)  # left padding: shorter prompts start with padding
    assert out["exact_accuracy"] == 1.0 and out["n"] == 7 and "resized_mismatch" not in out
    assert [r["prediction"] for r in rows] == [r["meta"]["answer"] for r in records]


def test_cli_errors(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"conversations": []}\n')
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cases = [
        (["--checkpoint", str(tmp_path / "nope"), "--data", str(data)], "no config.json"),
        (["--checkpoint", str(tmp_path), "--data", str(data), "--limit", "0"], "--limit"),
    ]
    (ckpt / "config.json").write_text("{}")
    cases.append((["--checkpoint", str(ckpt), "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"))
    for argv, needle in cases:
        assert ev.main(argv) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith("error:") and needle in err
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not JSON"):
        ev.load_records(tmp_path / "bad.jsonl")


def test_evaluate_sizes_each_image_by_its_own_budget(tmp_path, monkeypatch):
    """An image part's min_pixels / max_pixels reach the processor, as in training: the grids are
    those transformers' image processor gives under each image's own limits."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from qwenvl_jax.processing.processor import Processor

    assert make_data(["--out", str(tmp_path), "--n", "2", "--seed", "5"]) == 0
    budgets = [dict(max_pixels=28 * 28 * 6), {}]
    records = []  # the same records in the HF chat form, whose media parts carry keys
    for record, own in zip(ev.load_records(tmp_path / "train.jsonl"), budgets):
        question = record["conversations"][0]["value"].replace("<image>", "")
        records.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": record["image"], **own},
                                         {"type": "text", "text": question}]},
            {"role": "assistant", "content": record["conversations"][1]["value"]}], "meta": record["meta"]})
    processor = Processor.from_pretrained(tmp_path)
    grids = []

    def fake_generate(model, batch, *, max_new_tokens, eos_token_ids, pad_token_id):
        grids.extend(batch["image_grid_thw"].tolist())
        rows = len(batch["input_ids"])
        return decode.GenerationOutput([[eos_token_ids[0]]] * rows, [0] * rows, 0.0, 0.0, 0, 0.0)

    monkeypatch.setattr(decode, "generate", fake_generate)
    ev.evaluate(_StubModel(), processor, records, tmp_path, batch_size=2)
    expected = []
    for record, own in zip(records, budgets):
        image = Image.open(tmp_path / record["messages"][0]["content"][0]["image"])
        hf = Qwen2VLImageProcessorPil(min_pixels=processor.min_pixels,
                                      max_pixels=own.get("max_pixels", processor.max_pixels))
        expected.append(hf(image, return_tensors="np")["image_grid_thw"][0].tolist())
    assert grids == expected and grids[0] != grids[1]
