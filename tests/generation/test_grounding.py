"""Grounding answers: parsing realistic Qwen2.5-VL outputs, mapping to the original image, drawing.

Expected items and coordinates are written out by hand; the drawing is checked by reading the PNG
back and looking at pixels on and far from the drawn shapes.
"""

import math

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.generation.grounding import draw_grounding, ground, parse_grounding, to_original

FENCED = """```json
[
\t{"bbox_2d": [135, 114, 1016, 672], "label": "dog"},
\t{"bbox_2d": [598, 290, 780, 417], "label": "frisbee"}
]
```"""
EXPECTED = [{"bbox_2d": [135, 114, 1016, 672], "label": "dog"},
            {"bbox_2d": [598, 290, 780, 417], "label": "frisbee"}]


@pytest.mark.parametrize("text", [
    FENCED,
    FENCED.replace("```json", "").replace("```", ""),  # unfenced
    "Sure! Here are the objects I found:\n" + FENCED + "\nLet me know if you need anything else.",
    FENCED.replace("```json", "```JSON"),
    '[{"bbox_2d": [135, 114, 1016, 672], "label": "dog",}, {"bbox_2d": [598, 290, 780, 417], "label": "frisbee"},]',
    '{"objects": [{"bbox_2d": [135, 114, 1016, 672], "label": "dog"}, '
    '{"bbox_2d": [598, 290, 780, 417], "label": "frisbee"}]}',  # wrapped in an object
    '[{"bbox_2d": [1016, 672, 135, 114], "label": "dog"}, {"bbox_2d": [598, 417, 780, 290], "label": "frisbee"}]',
])
def test_parse_realistic_answers(text):
    assert parse_grounding(text) == EXPECTED


def test_parse_single_object_points_and_extra_keys():
    assert parse_grounding('The cat is here: {"bbox_2d": [10, 20, 30.5, 40], "label": "cat"}.') == [
        {"bbox_2d": [10, 20, 30.5, 40], "label": "cat"}]
    text = '```json\n[{"point_2d": [320, 240], "label": "left eye"}, {"point_2d": [400, 238]}]\n```'
    assert parse_grounding(text) == [{"point_2d": [320, 240], "label": "left eye"},
                                     {"point_2d": [400, 238], "label": ""}]
    text = '[{"bbox_2d": [1, 2, 3, 4], "label": "sign", "text_content": "STOP"}]'
    assert parse_grounding(text) == [{"bbox_2d": [1, 2, 3, 4], "label": "sign", "text_content": "STOP"}]


def test_parse_drops_invalid_entries():
    text = """[
      {"bbox_2d": [1, 2, 3], "label": "three numbers"},
      {"bbox_2d": ["1", "2", "3", "4"], "label": "strings"},
      {"bbox_2d": [1, 2, NaN, 4], "label": "nan"},
      {"bbox_2d": [true, 2, 3, 4], "label": "bool"},
      {"point_2d": [5], "label": "short point"},
      {"label": "no coordinates"},
      {"bbox_2d": [1, 2, 3, 4], "label": "ok"}
    ]"""
    assert parse_grounding(text) == [{"bbox_2d": [1, 2, 3, 4], "label": "ok"}]


@pytest.mark.parametrize("text", ["", "I could not find any cat in the image.", "[", "{", "```json\n[\n",
                                  "[1, 2, 3]", '{"label": "cat"}', "[[[[", None, 42])
def test_parse_never_raises(text):
    assert parse_grounding(text) == []


def test_parse_truncated_output_keeps_complete_entries():
    full = FENCED.replace("\n]", ',\n\t{"bbox_2d": [5, 6, 7, 8], "label": "ball"}\n]')
    items = parse_grounding(full)
    assert len(items) == 3
    for cut in range(len(full) + 1):  # every prefix: a prefix of the items, never an error
        got = parse_grounding(full[:cut])
        assert got == items[:len(got)]
    assert parse_grounding(full[:full.index('"ball"')]) == items[:2]


# -------------------------------------------------------------------------------------------- map

def test_to_original_hand_values():
    items = [{"bbox_2d": [40, 50, 120, 100], "label": "a"}, {"point_2d": [200, 125], "label": "b"},
             {"bbox_2d": [-5, 10, 410, 260], "label": "outside"}]
    # resized 250x400 (H x W) -> original 500x1000: x * 2.5, y * 2
    out = to_original(items, resized_hw=(250, 400), original_hw=(500, 1000))
    assert out == [{"bbox_2d": [100.0, 100.0, 300.0, 200.0], "label": "a"},
                   {"point_2d": [500.0, 250.0], "label": "b"},
                   {"bbox_2d": [0.0, 20.0, 1000.0, 500.0], "label": "outside"}]  # clamped
    assert items[0]["bbox_2d"] == [40, 50, 120, 100]  # inputs untouched


def test_ground_spec_example_size():
    # SPEC 1.1: a 768x1024 photo is fed as 756x1036; the centre of one is the centre of the other
    items = ground('[{"bbox_2d": [0, 0, 518, 378], "label": "top-left quarter"}]', (768, 1024), (756, 1036))
    assert items[0]["bbox_2d"] == pytest.approx([0, 0, 512, 384])
    assert items[0]["label"] == "top-left quarter"


# ------------------------------------------------------------------------------------------- draw

def test_draw_grounding_marks_boxes_and_points_only(tmp_path):
    image = Image.new("RGB", (200, 120), (255, 255, 255))  # W=200, H=120
    items = [{"bbox_2d": [40, 30, 160, 90], "label": "cat"}, {"point_2d": [20, 100], "label": "dot"}]
    out = tmp_path / "drawn.png"
    returned = draw_grounding(image, items, out)
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (200, 120)
        pixels = np.asarray(png.convert("RGB")).astype(int)  # [H, W, 3]
    np.testing.assert_array_equal(pixels, np.asarray(returned))
    white = (pixels == 255).all(-1)  # [H, W]
    for x, y in [(100, 30), (100, 90), (40, 60), (160, 60), (20, 100)]:  # box edges, point centre
        assert not white[y, x], (x, y)
    assert not white[20:30, 40:60].all()  # the label tag above the box
    for x, y in [(100, 60), (190, 110), (195, 5), (120, 110)]:  # box inside, far corners
        assert white[y, x], (x, y)
    assert white.mean() > 0.7  # boxes are outlines, not fills
    assert (np.asarray(image) == 255).all()  # the input image is not drawn on


def test_hostile_model_output_never_raises_and_stays_fast():
    """Deep nesting, numbers past float range, non-numbers and random damage to a valid answer:
    parse_grounding returns what is valid (maybe nothing), never raises, in bounded time."""
    import random
    import time

    depth = 200_000
    hostile = ["[" * depth, "{" * depth, '{"a":' * depth, "[1," * depth, "[{" * depth + "]",
               '[{"bbox_2d": [' + "9" * 5000 + ', 1, 2, 3]}]', f'[{{"bbox_2d": [{10**400}, 1, 2, 3]}}]',
               '[{"bbox_2d": [1e999, 1, 2, 3]}]', '[{"bbox_2d": [NaN, 1, 2, 3]}]', '[{"bbox_2d": [true, 1, 2, 3]}]',
               '[{"point_2d": ["1", 2]}]', '[{"bbox_2d": {"x": 1}}]', "```json\n" * 10_000]
    valid = '```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "cat"}, {"point_2d": [5, 6], "label": "nose"}]\n```'
    rng = random.Random(0)
    for _ in range(300):
        chars = list(valid)
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(len(chars))
            op = rng.random()
            if op < 0.4:
                del chars[at]
            elif op < 0.8:
                chars.insert(at, rng.choice('[]{},:"9e-.x \n'))
            else:
                chars[at] = rng.choice('[]{}"')
        hostile.append("".join(chars))
    t0 = time.perf_counter()
    for text in hostile:
        items = parse_grounding(text)
        for item in items:
            assert all(math.isfinite(v) for v in item.get("bbox_2d", []) + item.get("point_2d", []))
    assert time.perf_counter() - t0 < 20
    assert parse_grounding(hostile[5] + valid)[0]["label"] == "cat"  # the valid answer after the damage still parses
    assert parse_grounding(hostile[0] + valid)[0]["label"] == "cat"


def test_prose_with_odd_quotes_or_bracketed_labels():
    assert parse_grounding('Here is "the answer: [{"bbox_2d": [1, 2, 3, 4], "label": "cat"}]')[0]["label"] == "cat"
    assert parse_grounding('[{"bbox_2d": [1, 2, 3, 4], "label": "a[b"}]')[0]["label"] == "a[b"
