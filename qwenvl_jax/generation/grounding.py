"""Grounding answers -> boxes and points on the original image.

Asked to locate things, Qwen2.5-VL answers with JSON such as

    ```json
    [{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}, {"point_2d": [x, y], "label": "nose"}]
    ```

in absolute pixels of the *resized* model input (the smart_resize size, SPEC 1.1), not of the
original image and not normalised to 0..1000 as Qwen2-VL did.

    items = ground(answer, original_hw=(h, w), resized_hw=smart_resize(h, w, ...))
    draw_grounding("photo.jpg", items, "photo_boxes.png")

Sizes are (height, width) throughout, like smart_resize's result (PIL's `.size` is (width, height)).
"""

from __future__ import annotations

import json
import re

from PIL import Image, ImageDraw, ImageFont

from qwenvl_jax.config import is_finite_number
from qwenvl_jax.processing.image import load_image  # same loader (EXIF turn) as the processor saw

BOX, POINT = "bbox_2d", "point_2d"
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (128, 128, 0))
_TRAILING_COMMA = re.compile(r",\s*(?=[\]}])")
_FENCE = re.compile(r"```[A-Za-z]*")
_OPEN = re.compile(r"[\[{]")
MAX_TEXT = 1 << 20  # characters parsed; an answer is a few KB
MAX_DEPTH = 32  # nesting of a JSON value worth parsing; an answer nests 3 deep


# ------------------------------------------------------------------------------------------ parse

def _openers(text: str, max_depth: int = MAX_DEPTH) -> list[int]:
    """Indices of the '[' / '{' whose bracket closes and whose content nests at most max_depth
    deep, by bracket counting in one linear pass. Only these are worth a JSON parse (the parser
    itself decides what is JSON): a cut-off or absurdly deep one cannot be an answer, and skipping
    it keeps hostile text linear in time. Quotes are not tracked, so an odd quote in the prose
    around an answer cannot hide it; a bracket inside a label at worst adds a start to try."""
    stack: list[list[int]] = []  # [opener index, deepest nesting inside]
    ok: list[int] = []
    for i, ch in enumerate(text):
        if ch in "[{":
            stack.append([i, 1])
        elif ch in "]}" and stack:
            opener, depth = stack.pop()
            if depth <= max_depth:
                ok.append(opener)
            if stack:
                stack[-1][1] = max(stack[-1][1], depth + 1)
    return sorted(ok)


def _json_values(text: str):
    """Every complete JSON array/object in `text`, left to right, without overlaps.

    Starting at each balanced '[' or '{' lets prose, fences and a truncated tail fall away: when
    the outer list is cut off, its complete inner objects still parse one by one.
    """
    decoder, pos = json.JSONDecoder(), 0
    for start in _openers(text):
        if start < pos:
            continue
        try:
            value, pos = decoder.raw_decode(text, start)
            yield value
        except (ValueError, RecursionError):  # not JSON, or an integer too long to convert
            pass


def _candidates(value):
    """Dicts holding a box or point, found anywhere in a parsed value (also inside wrappers), in
    order; iterative, so nesting depth costs no stack."""
    stack = [value]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if BOX in value or POINT in value:
                yield value
            else:
                stack.extend(reversed(list(value.values())))
        elif isinstance(value, list):
            stack.extend(reversed(value))


def _finite(v) -> float | None:
    return float(v) if is_finite_number(v) else None


def _numbers(value, n: int) -> list[float] | None:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        return None
    numbers = [_finite(v) for v in value]
    return None if None in numbers else numbers


def _clean(entry: dict) -> dict | None:
    """Valid box (4 numbers, reordered so x1<=x2, y1<=y2) and/or point (2 numbers), else None."""
    item = {k: v for k, v in entry.items() if k not in (BOX, POINT)}
    if (box := _numbers(entry.get(BOX), 4)) is not None:
        x1, y1, x2, y2 = box
        item[BOX] = [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]
    if (point := _numbers(entry.get(POINT), 2)) is not None:
        item[POINT] = point
    if BOX not in item and POINT not in item:
        return None
    item["label"] = "" if item.get("label") is None else str(item["label"])
    return item


def parse_grounding(text: str) -> list[dict]:
    """Model text -> [{"bbox_2d": [x1, y1, x2, y2] and/or "point_2d": [x, y], "label": str, ...}].

    Tolerates ```json fences, prose around the JSON, a single object instead of a list, trailing
    commas and output cut off mid-list (complete entries are kept). Entries without a valid box or
    point are dropped; other keys are kept. Never raises on model text.
    """
    if not isinstance(text, str):
        return []
    text = _TRAILING_COMMA.sub("", _FENCE.sub(" ", text[:MAX_TEXT]))
    items = []
    for value in _json_values(text):
        items.extend(item for item in map(_clean, _candidates(value)) if item is not None)
    return items


# ------------------------------------------------------------------------------------------ map

def to_original(items: list[dict], resized_hw: tuple[int, int], original_hw: tuple[int, int]) -> list[dict]:
    """Resized-input pixels -> original-image pixels: x * W/W', y * H/H', clamped to [0, W] x [0, H].

    Coordinates are pixel-edge positions (a box covering the whole image is [0, 0, W, H]).
    Returns new dicts; the inputs are left as they are.
    """
    (rh, rw), (oh, ow) = resized_hw, original_hw
    sx, sy = ow / rw, oh / rh

    def xy(values):  # [x, y, x, y, ...] -> scaled and clamped floats
        return [min(max(v * (sx if k % 2 == 0 else sy), 0.0), float(ow if k % 2 == 0 else oh))
                for k, v in enumerate(values)]

    out = []
    for item in items:
        item = dict(item)
        for key in (BOX, POINT):
            if key in item:
                item[key] = xy(item[key])
        out.append(item)
    return out


def ground(text: str, original_hw: tuple[int, int], resized_hw: tuple[int, int]) -> list[dict]:
    """parse_grounding + to_original: model text -> items in original-image pixels."""
    return to_original(parse_grounding(text), resized_hw, original_hw)


# ------------------------------------------------------------------------------------------ draw

def draw_grounding(image, items: list[dict], out_path) -> Image.Image:
    """Draw boxes (rectangles), points (dots) and labels on the image; save as PNG; return it.

    `image`: path, PIL image or uint8 array, the original the items were mapped to (to_original).
    One colour per distinct label; line width and dot size grow with the image.
    """
    canvas = load_image(image).copy()
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    width = max(2, round(min(canvas.size) / 250))
    colours = {}
    for item in items:
        label = str(item.get("label", ""))
        colour = colours.setdefault(label, PALETTE[len(colours) % len(PALETTE)])
        anchor = None
        if BOX in item:
            x1, y1, x2, y2 = (round(v) for v in item[BOX])
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
            anchor = (x1, y1)
        if POINT in item:
            x, y = (round(v) for v in item[POINT])
            r = 2 * width
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=(255, 255, 255))
            anchor = anchor or (x + r, y - r)
        if label and anchor:
            _draw_label(draw, font, label, anchor, colour)
    canvas.save(out_path, format="PNG")
    return canvas


def _draw_label(draw: ImageDraw.ImageDraw, font, label: str, anchor: tuple[int, int], colour):
    # White text on a tag of the item's colour, just above the anchor (below it at the top edge).
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    w, h = right - left + 4, bottom - top + 4
    x, y = anchor[0], anchor[1] - h if anchor[1] >= h else anchor[1]
    draw.rectangle((x, y, x + w, y + h), fill=colour)
    draw.text((x + 2 - left, y + 2 - top), label, fill=(255, 255, 255), font=font)
