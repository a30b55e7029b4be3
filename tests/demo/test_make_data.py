"""The shapes demo data: deterministic, and every answer is what the saved picture shows."""

import json
import re

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.data.formats import parse_record
from qwenvl_jax.demo.make_data import (
    BUNDLED_SHAPES,
    COLORS,
    SHAPES,
    main,
    make_bundled_dataset,
    make_dataset,
    question_form,
    write_demo_tokenizer,
)
from qwenvl_jax.generation.grounding import ground, parse_grounding
from qwenvl_jax.processing.image import smart_resize
from qwenvl_jax.processing.processor import Processor
from qwenvl_jax.processing.tiny_tokenizer import SPECIAL_TOKENS


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return root, _records(make_dataset(root, 150, seed=7))


def _components(mask: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """4-connected components of a boolean mask as (x1, y1, x2, y2, pixel count), without scipy.

    Each pixel's label is a flat index in its component (its own at first): take the neighbours'
    minimum, then jump pointers (label = label[label]) so labels settle in a few rounds.
    """
    big = mask.size
    label = np.where(mask, np.arange(big).reshape(mask.shape), big)
    while True:
        p = np.pad(label, 1, constant_values=big)
        new = np.where(mask, np.minimum.reduce([label, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]), big)
        for _ in range(4):
            new = np.append(new.ravel(), big)[new]
        if np.array_equal(new, label):
            break
        label = new
    out = []
    for v in np.unique(label[mask]):
        ys, xs = np.nonzero(label == v)
        out.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, len(xs)))
    return out


def _detect(path) -> list[dict]:
    """Shapes found in a PNG: colour by exact RGB, kind by how much of its box it fills."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    found = []
    for name, rgb in COLORS.items():
        for x1, y1, x2, y2, n in _components((pixels == rgb).all(-1)):
            fill = n / ((x2 - x1) * (y2 - y1))
            kind = "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"
            found.append({"color": name, "shape": kind, "bbox": [int(x1), int(y1), int(x2), int(y2)]})
    return found


def test_same_seed_same_bytes(tmp_path):
    a = make_dataset(tmp_path / "a", 30, seed=3)
    b = make_dataset(tmp_path / "b", 30, seed=3)
    c = make_dataset(tmp_path / "c", 30, seed=4)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    for rec in _records(a):
        assert (a.parent / rec["image"]).read_bytes() == (b.parent / rec["image"]).read_bytes()


def test_records_parse_and_mix(dataset):
    root, records = dataset
    for rec in records:  # the "meta" key does not disturb the training format
        conv = parse_record(rec, root)
        assert conv.messages[1]["content"][0]["text"] == rec["meta"]["answer"]
        # The user turn is [image, question], as infer and eval build it from a prompt: same tokens.
        question = rec["conversations"][0]["value"].removeprefix("<image>")
        assert [p["type"] for p in conv.messages[0]["content"]] == ["image", "text"]
        assert conv.messages[0]["content"][1]["text"] == question
    tasks = [r["meta"]["task"] for r in records]
    assert 0.25 < tasks.count("count") / len(tasks) < 0.6 and tasks.count("ground") / len(tasks) > 0.25
    assert tasks.count("attribute") > 10


def test_shapes_inside_and_apart(dataset):
    _, records = dataset
    sizes = set()
    for rec in records:
        h, w = rec["meta"]["original_hw"]
        sizes.add((h, w))
        assert 160 <= h <= 448 and 160 <= w <= 448
        boxes = [s["bbox"] for s in rec["meta"]["shapes"]]
        assert 1 <= len(boxes) <= 5
        for i, (x1, y1, x2, y2) in enumerate(boxes):
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and 24 <= max(x2 - x1, y2 - y1) <= 96
            for a1, b1, a2, b2 in boxes[i + 1:]:
                assert x2 <= a1 or a2 <= x1 or y2 <= b1 or b2 <= y1
    assert len(sizes) > 50


QUESTION = re.compile(r"How many (?:(red|green|blue|yellow) )?(circle|square|triangle|shape)s are there\?")


def _check_answer(question: str, meta: dict, found: list[dict]) -> None:
    """meta's answer to `question` is what the detected shapes say."""
    if meta["task"] == "count":
        color, kind = QUESTION.fullmatch(question).groups()
        n = sum((color is None or s["color"] == color) and kind in ("shape", s["shape"]) for s in found)
        assert meta["answer"] == str(n)
    elif meta["task"] == "attribute":
        if m := re.fullmatch(r"What color is the (\w+)\?", question):
            [hit] = [s for s in found if s["shape"] == m.group(1)]
            assert meta["answer"] == hit["color"]
        else:
            color = re.fullmatch(r"What shape is the (\w+) object\?", question).group(1)
            [hit] = [s for s in found if s["color"] == color]
            assert meta["answer"] == hit["shape"]
    elif meta["task"] == "detect":  # every shape, left to right, each with its own label
        assert question == "Locate every shape."
        items = [(i["bbox_2d"], i["label"]) for i in parse_grounding(meta["answer"])]
        boxes = [b for b, _ in items]
        assert boxes == meta["boxes_resized"] and [b[0] for b in boxes] == sorted(b[0] for b in boxes)
        assert sorted(lab for _, lab in items) == sorted(f"{s['color']} {s['shape']}" for s in found)
    else:
        label = re.fullmatch(r"Locate (?:the|every) (\w+ \w+)\.", question).group(1)
        items = parse_grounding(meta["answer"])
        assert {i["label"] for i in items} == {label}
        assert len(items) == sum(f"{s['color']} {s['shape']}" == label for s in found)


def test_answers_match_the_pixels(dataset):
    root, records = dataset
    checked = set()
    for rec in records:
        meta = rec["meta"]
        found = _detect(root / rec["image"])
        key = lambda s: (s["bbox"], s["color"], s["shape"])  # noqa: E731
        assert sorted(map(key, found)) == sorted(map(key, meta["shapes"]))  # drawn = described
        _check_answer(rec["conversations"][0]["value"].removeprefix("<image>"), meta, found)
        checked.add(meta["task"])
    assert checked == {"count", "attribute", "ground"}


def test_multi_turn_records(tmp_path):
    """--turns K: up to K distinct questions about one picture, each answer true, first turn = meta."""
    records = _records(make_dataset(tmp_path, 40, seed=5, turns=6))
    lengths = []
    for rec in records:
        conv, meta = rec["conversations"], rec["meta"]
        turns = meta.get("turns", [meta])
        lengths.append(len(turns))
        assert len(conv) == 2 * len(turns) and [c["from"] for c in conv] == ["human", "gpt"] * len(turns)
        questions = [c["value"].removeprefix("<image>") for c in conv[::2]]
        assert conv[0]["value"].startswith("<image>") and all("<image>" not in q for q in conv[2::2])
        assert len(set(questions)) == len(questions)
        assert {k: meta[k] for k in turns[0]} == turns[0]
        found = _detect(tmp_path / rec["image"])
        for q, a, t in zip(questions, conv[1::2], turns):
            assert a["value"] == t["answer"]
            _check_answer(q, t, found)
        assert len(parse_record(rec, tmp_path).messages) == 2 * len(turns)
    assert max(lengths) == 6 and min(lengths) >= 1 and sum(lengths) / len(lengths) > 3


@pytest.mark.parametrize("max_pixels", [200704, 50176])
def test_boxes_in_resized_pixels(tmp_path, max_pixels):
    records = _records(make_dataset(tmp_path, 60, seed=1, mix=(0, 0, 1), max_pixels=max_pixels))
    for rec in records:
        meta = rec["meta"]
        (oh, ow), (rh, rw) = meta["original_hw"], meta["resized_hw"]
        assert (rh, rw) == smart_resize(oh, ow, factor=28, min_pixels=3136, max_pixels=max_pixels)
        label = re.fullmatch(r"<image>Locate (?:the|every) (\w+ \w+)\.", rec["conversations"][0]["value"]).group(1)
        truth = sorted(s["bbox"] for s in meta["shapes"] if f"{s['color']} {s['shape']}" == label)
        items = parse_grounding(meta["answer"])
        assert [i["bbox_2d"] for i in items] == meta["boxes_resized"]
        assert [i["bbox_2d"][0] for i in items] == sorted(i["bbox_2d"][0] for i in items)  # left to right
        assert {i["label"] for i in items} == {label} and len(items) == len(truth)
        for box, (x1, y1, x2, y2) in zip(sorted(meta["boxes_resized"]), truth):
            assert box == [round(x1 * rw / ow), round(y1 * rh / oh), round(x2 * rw / ow), round(y2 * rh / oh)]
        back = sorted(i["bbox_2d"] for i in ground(meta["answer"], (oh, ow), (rh, rw)))
        assert np.allclose(back, truth, atol=0.5 * max(ow / rw, oh / rh) + 1e-6)
        assert meta["answer"] == rec["conversations"][1]["value"] and " " not in meta["answer"].replace(label, "")


def test_tokenizer_covers_the_answers(tmp_path, dataset):
    ids = write_demo_tokenizer(tmp_path)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    model_vocab = Qwen25VLConfig.from_preset("demo").text.vocab_size
    assert ids["vocab_size"] == tok.get_vocab_size() <= model_vocab
    assert max(tok.token_to_id(t) for t in SPECIAL_TOKENS) < model_vocab
    texts = [t for r in dataset[1] for t in (r["meta"]["answer"], r["conversations"][0]["value"])]
    for text in texts:
        enc = tok.encode(text)
        assert tok.decode(enc.ids) == text
    for c in COLORS:  # template words are single tokens, not spelled out
        for s in SHAPES:
            assert len(tok.encode(f" {c} {s}").ids) == 2


def test_coordinates_are_one_token_here_and_in_transformers(tmp_path, dataset):
    """Numbers 0..999 are single tokens (the demo's split), and transformers' AutoTokenizer, which
    rebuilds Qwen2's own split for a Qwen2Tokenizer, reads the saved tokenizer the same way."""
    from transformers import AutoTokenizer

    write_demo_tokenizer(tmp_path)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert all(len(tok.encode(str(k)).ids) == 1 for k in range(1000))
    assert tok.encode("1234").tokens == ["123", "4"]
    hf = AutoTokenizer.from_pretrained(tmp_path)
    texts = [r["meta"]["answer"] for r in dataset[1][:40]] + ["There are 5 apples in 2024, not 12345."]
    for text in texts:
        assert hf(text)["input_ids"] == tok.encode(text).ids
    boxes = [b for r in dataset[1] if r["meta"]["task"] == "ground" for b in r["meta"]["boxes_resized"]]
    for box in boxes[:10]:
        ids = tok.encode(",".join(map(str, box))).ids
        assert len(ids) == 7  # four numbers, three commas


def test_cli_dir_is_a_processor_dir(tmp_path):
    assert main(["--out", str(tmp_path), "--n", "12", "--seed", "2", "--max-pixels", "50176",
                 "--name", "eval.jsonl"]) == 0
    records = _records(tmp_path / "eval.jsonl")
    assert len(records) == 12 and all(r["image"].startswith("images/eval_") for r in records)
    processor = Processor.from_pretrained(tmp_path)  # the boxes' frame is the one the processor feeds the model
    for rec in records[:4]:
        batch = processor(text="<|vision_start|><|image_pad|><|vision_end|>", images=[str(tmp_path / rec["image"])])
        _, gh, gw = batch["image_grid_thw"][0]
        assert [gh * 14, gw * 14] == rec["meta"]["resized_hw"]
    assert main(["--out", str(tmp_path), "--n", "0"]) == 1
    assert main(["--out", str(tmp_path), "--mix", "1,2"]) == 1
    assert main(["--out", str(tmp_path), "--turns", "0"]) == 1
    gen = json.loads((tmp_path / "generation_config.json").read_text())  # exported with the tokenizer
    assert gen["do_sample"] is False
    assert sorted(gen["eos_token_id"]) == sorted(processor.eos_token_ids)
    assert gen["pad_token_id"] == processor.pad_token_id


def test_shapes_per_picture(tmp_path, capsys):
    one = _records(make_dataset(tmp_path / "one", 20, seed=6, shapes=(1, 1), mix=(0, 0, 1)))
    assert all(len(r["meta"]["shapes"]) == 1 for r in one)
    for rec in one:  # what the pixels show: one shape, the one the answer names
        found = _detect(tmp_path / "one" / rec["image"])
        assert len(found) == 1
        _check_answer(rec["conversations"][0]["value"].removeprefix("<image>"), rec["meta"], found)
    many = _records(make_dataset(tmp_path / "many", 20, seed=6, shapes=(4, 5)))
    assert all(len(r["meta"]["shapes"]) <= 5 for r in many)
    assert sum(len(r["meta"]["shapes"]) >= 4 for r in many) >= 15  # rejection sampling rarely runs out of room
    for bad in ("0,2", "3,2", "1,6", "2", "a,b"):
        assert main(["--out", str(tmp_path / "bad"), "--n", "2", "--shapes", bad]) == 1
        assert "--shapes" in capsys.readouterr().err


def test_repeat_makes_larger_counts(tmp_path, capsys):
    """--repeat P: shapes copy earlier shapes' colour and kind, so counts of 2+ and multi-box
    groundings become common; every answer still matches the pixels."""
    def big_counts(records):
        turns = [m for r in records for m in r["meta"]["turns"] if m["task"] == "count"]
        return sum(m["answer"] != "1" for m in turns) / len(turns)

    plain = _records(make_dataset(tmp_path / "plain", 60, seed=8, turns=4, shapes=(3, 5)))
    repeated = _records(make_dataset(tmp_path / "rep", 60, seed=8, turns=4, shapes=(3, 5), repeat=0.8))
    assert big_counts(repeated) > big_counts(plain) + 0.15
    kinds = [len({(s["color"], s["shape"]) for s in r["meta"]["shapes"]}) / len(r["meta"]["shapes"]) for r in repeated]
    assert np.mean(kinds) < 0.7
    for rec in repeated[:20]:
        found = _detect(tmp_path / "rep" / rec["image"])
        key = lambda s: (s["bbox"], s["color"], s["shape"])  # noqa: E731
        assert sorted(map(key, found)) == sorted(map(key, rec["meta"]["shapes"]))
        questions = [c["value"].removeprefix("<image>") for c in rec["conversations"][::2]]
        for question, meta in zip(questions, rec["meta"]["turns"]):
            _check_answer(question, meta, found)
    for bad in ("-0.1", "1.5"):
        assert main(["--out", str(tmp_path / "bad"), "--n", "2", "--repeat", bad]) == 1
        assert "--repeat" in capsys.readouterr().err


def test_detect_names_every_shape(tmp_path, capsys):
    """The 4th --mix weight asks "Locate every shape.": each shape's box (resized pixels) and label,
    true to the pixels; a 3-weight mix (the default) never asks it and draws the same bytes as
    an explicit zero detect weight."""
    records = _records(make_dataset(tmp_path / "det", 30, seed=9, mix=(0, 0, 0, 1)))
    for rec in records:
        meta = rec["meta"]
        found = _detect(tmp_path / "det" / rec["image"])
        _check_answer(rec["conversations"][0]["value"].removeprefix("<image>"), meta, found)
        (oh, ow), (rh, rw) = meta["original_hw"], meta["resized_hw"]
        scaled = sorted([round(x1 * rw / ow), round(y1 * rh / oh), round(x2 * rw / ow), round(y2 * rh / oh)]
                        for x1, y1, x2, y2 in (s["bbox"] for s in found))
        assert sorted(meta["boxes_resized"]) == scaled
    assert sum(len(r["meta"]["shapes"]) > 1 for r in records) > 10
    three = make_dataset(tmp_path / "a", 20, seed=3, turns=3)
    four = make_dataset(tmp_path / "b", 20, seed=3, turns=3, mix=(0.4, 0.2, 0.4, 0))
    assert three.read_bytes() == four.read_bytes()
    assert main(["--out", str(tmp_path / "bad"), "--n", "2", "--mix", "1,1,1,1,1"]) == 1
    assert "mix must be 3 or 4" in capsys.readouterr().err


def test_attributes_selects_the_question(tmp_path, capsys):
    """--attributes kind asks only "What shape is the <colour> object?", --attributes color only
    "What color is the <kind>?"; the answers still match the pixels."""
    for attributes, prefix in (("kind", "What shape is the "), ("color", "What color is the ")):
        root = tmp_path / attributes
        records = _records(make_dataset(root, 40, seed=10, turns=3, shapes=(1, 3), mix=(0, 1, 0),
                                        attributes=attributes))
        asked = 0
        for rec in records[:20]:
            found = _detect(root / rec["image"])
            questions = [c["value"].removeprefix("<image>") for c in rec["conversations"][::2]]
            for question, meta in zip(questions, rec["meta"].get("turns", [rec["meta"]])):
                _check_answer(question, meta, found)
                if meta["task"] == "attribute":
                    assert question.startswith(prefix), question
                    asked += 1
        assert asked >= 20
    assert main(["--out", str(tmp_path / "bad"), "--n", "2", "--attributes", "size"]) == 1
    assert "--attributes" in capsys.readouterr().err


def test_bundled_recipe_asks_its_forms_about_the_pictures_it_names(tmp_path):
    """--recipe bundled: one question per picture; grounding, colour and kind on one-shape pictures,
    "How many shapes are there?" on 1-5; every answer agrees with the shapes found in the pixels."""
    records = _records(make_bundled_dataset(tmp_path, 80, seed=3, weights=[1, 1, 1, 1], max_pixels=18816))
    seen = {}
    for rec in records:
        meta, question = rec["meta"], rec["conversations"][0]["value"].removeprefix("<image>")
        assert len(rec["conversations"]) == 2 and question_form(question) == meta["form"]
        found = _detect(tmp_path / rec["image"])
        lo, hi = BUNDLED_SHAPES[meta["form"]]
        assert lo <= len(found) <= hi
        _check_answer(question, meta, found)
        seen.setdefault(meta["form"], set()).add(len(found))
    assert set(seen) == set(BUNDLED_SHAPES) and seen["count_all"] == {1, 2, 3, 4, 5}
    assert _records(make_bundled_dataset(tmp_path / "again", 80, seed=3, weights=[1, 1, 1, 1],
                                         max_pixels=18816)) == records


def test_question_forms():
    questions = {"How many shapes are there?": "count_all", "How many red shapes are there?": "count_color",
                 "How many circles are there?": "count_kind", "How many red circles are there?": "count_color_kind",
                 "What color is the square?": "color", "What shape is the red object?": "kind",
                 "Locate the red square.": "ground", "Locate every red square.": "ground",
                 "Locate every shape.": "detect"}
    assert {q: question_form(q) for q in questions} == questions


def test_bundled_recipe_cli_errors(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--recipe", "bundled", "--weights", "1,1,1", "--n", "2"]) == 1
    assert "--weights must be 4 non-negative weights" in capsys.readouterr().err
