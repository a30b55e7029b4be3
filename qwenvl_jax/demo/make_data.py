"""python -m qwenvl_jax.demo.make_data: a shapes dataset with exact answers, for fine-tuning demos.

    python -m qwenvl_jax.demo.make_data --out data/shapes --n 5000 --seed 0
    python -m qwenvl_jax.demo.make_data --out data/shapes --n 500 --seed 1 --name eval.jsonl

White canvases (160-448 px a side) hold 1-5 non-overlapping solid circles, squares and triangles
in four colours. Each record asks one question in the repo's LLaVA form:

    count      "How many red circles are there?"      -> "2"
    attribute  "What color is the triangle?"          -> "blue"   (asked only when the answer is unique)
    ground     "Locate the blue square."              -> [{"bbox_2d":[x1,y1,x2,y2],"label":"blue square"}]
    detect     "Locate every shape."                  -> every shape's box and "colour kind" label
               (off by default: a 4th --mix weight; a dense target, all boxes and labels in one answer)

Boxes are in absolute pixels of the *resized* model input (smart_resize with --min/--max-pixels),
as Qwen2.5-VL answers. `parse_record` ignores unknown top-level keys, so each record carries a
"meta" object with what evaluation needs (task, answer, boxes_resized, resized_hw, original_hw, shapes).
OUT also receives a demo tokenizer and a preprocessor_config.json with the same pixel limits, so
OUT is a complete `model.tokenizer` directory and the boxes match what the processor feeds the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from qwenvl_jax.cli import DefaultsHelpFormatter
from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.processing import tiny_tokenizer
from qwenvl_jax.processing.image import smart_resize

COLORS = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "yellow": (230, 200, 0)}
SHAPES = ("circle", "square", "triangle")
TASKS = ("count", "attribute", "ground", "detect")
DEFAULT_MIX = (0.4, 0.2, 0.4)  # count, attribute, ground; a 4th weight (detect) is optional
CANVAS = (160, 448)  # side length range, inclusive
SIZE = (24, 96)  # shape side range, inclusive
SHAPE_COUNT = (1, 5)  # shapes per canvas, inclusive
GAP = 4  # empty pixels kept between shapes' boxes, so same-colour shapes never touch
MIN_PIXELS, MAX_PIXELS = 3136, 200704
DEMO_VOCAB = 1400  # BPE ids before the 22 added tokens: < 1536 (the demo preset's vocab)
# Qwen2's split with numbers cut into runs of up to 3 digits instead of single digits (as cl100k does),
# and every number 0..999 in the BPE corpus: a box coordinate is one token, a class the model picks
# from a position it has located, instead of 1-3 digits whose first one (1, 1x or 1xx?) already
# needs the whole number. Everything else tokenizes as Qwen2's pipeline does.
DEMO_SPLIT = tiny_tokenizer.QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


# ------------------------------------------------------------------------------------------ drawing

def _mask(shape: str, size: int) -> Image.Image:
    """Binary (0/255) mask of one shape in a size x size tile; PIL draws without anti-aliasing."""
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    if shape == "circle":
        d.ellipse((0, 0, size - 1, size - 1), fill=255)
    elif shape == "square":
        d.rectangle((0, 0, size - 1, size - 1), fill=255)
    else:
        d.polygon([(size / 2, 0), (0, size - 1), (size - 1, size - 1)], fill=255)
    return m


def _place(rng, h: int, w: int, n: int) -> list[tuple[int, int, int]]:
    """Up to n (x, y, size) tiles inside the canvas, pairwise GAP apart; rejection sampling keeps it simple."""
    tiles = []
    for _ in range(n * 30):
        if len(tiles) == n:
            break
        s = int(rng.integers(SIZE[0], SIZE[1] + 1))
        x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        if all(x + s + GAP <= tx or tx + ts + GAP <= x or y + s + GAP <= ty or ty + ts + GAP <= y
               for tx, ty, ts in tiles):
            tiles.append((x, y, s))
    return tiles


def draw_scene(rng, count: tuple[int, int] = SHAPE_COUNT, repeat: float = 0.0) -> tuple[Image.Image, list[dict]]:
    """A random canvas and its shapes [{"color", "shape", "bbox": tight [x1, y1, x2, y2] pixel edges}],
    count[0]..count[1] of them (fewer only when rejection sampling finds no room).

    repeat: probability that a shape after the first copies the colour and kind of an earlier one.
    Independent draws make most counting answers "1" (12 kinds, <= 5 shapes); repeats give training
    sets the 2-5 answers and multi-box groundings that independent scenes rarely hold.
    """
    h, w = (int(v) for v in rng.integers(CANVAS[0], CANVAS[1] + 1, size=2))
    img = Image.new("RGB", (w, h), (255, 255, 255))
    shapes = []
    for x, y, s in _place(rng, h, w, int(rng.integers(count[0], count[1] + 1))):
        color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
        if repeat > 0 and shapes and rng.random() < repeat:  # no extra draws at 0: old seeds, old bytes
            ref = shapes[int(rng.integers(len(shapes)))]
            color, shape = ref["color"], ref["shape"]
        mask = _mask(shape, s)
        left, top, right, bottom = mask.getbbox()  # exclusive right/bottom = pixel-edge coordinates
        img.paste(COLORS[color], (x, y), mask)
        shapes.append({"color": color, "shape": shape, "bbox": [x + left, y + top, x + right, y + bottom]})
    return img, shapes


# ------------------------------------------------------------------------------------------ questions

def scale_box(box, original_hw, resized_hw) -> list[int]:
    """Original-pixel box -> resized-input pixels (what Qwen2.5-VL answers in), rounded."""
    (oh, ow), (rh, rw) = original_hw, resized_hw
    return [round(v * (rw / ow if k % 2 == 0 else rh / oh)) for k, v in enumerate(box)]


def left_to_right(box) -> tuple[int, int]:
    """Sort key of the canonical box order in answers: x1, then y1."""
    return box[0], box[1]


def grounding_answer(boxes: list[list[int]], label: str | list[str]) -> str:
    """Compact JSON, left to right: fewer tokens to learn than Qwen's fenced, spaced form
    (parse_grounding reads both), and one canonical order so the target is deterministic.
    label: one for every box, or one per box."""
    labels = [label] * len(boxes) if isinstance(label, str) else list(label)
    items = [{"bbox_2d": b, "label": lab} for b, lab in sorted(zip(boxes, labels), key=lambda x: left_to_right(x[0]))]
    return json.dumps(items, separators=(",", ":"))


def _plural(shape: str) -> str:
    return shape + "s"


def _count(rng, shapes):
    """Counts everything, one colour, one shape kind, or one colour+kind; always about something present."""
    ref = shapes[int(rng.integers(len(shapes)))]
    kind = int(rng.integers(4))
    color, shape = (ref["color"] if kind in (1, 3) else None), (ref["shape"] if kind in (2, 3) else None)
    return _count_of(shapes, color, shape)


def _count_of(shapes, color=None, shape=None):
    """("How many ... are there?", answer) for shapes of one colour and/or kind (None: any)."""
    n = sum((color is None or s["color"] == color) and (shape is None or s["shape"] == shape) for s in shapes)
    what = " ".join(p for p in (color, _plural(shape) if shape else "shapes") if p)
    return f"How many {what} are there?", str(n)


def question_form(question: str) -> str:
    """The form of a make_data question, for per-form scores: count_all, count_color, count_kind,
    count_color_kind, color, kind, ground or detect."""
    if question.startswith("How many "):
        words = question.removeprefix("How many ").removesuffix(" are there?").split()
        return "count_" + ("all" if words == ["shapes"] else "color" if words[-1] == "shapes"
                           else "color_kind" if len(words) == 2 else "kind")
    if question.startswith("What color"):
        return "color"
    if question.startswith("What shape"):
        return "kind"
    return "detect" if question == "Locate every shape." else "ground"


ATTRIBUTES = {"both": ("color", "shape"), "color": ("color",), "kind": ("shape",)}  # what is asked


def _attribute(rng, shapes, attributes: str = "both"):
    """Asks only what the picture answers uniquely; None when no colour or shape kind occurs once.
    attributes: "both", or only "color" ("What color is the <kind>?") or "kind" ("What shape is
    the <colour> object?") questions."""
    options = []
    for key, other in (("shape", "color"), ("color", "shape")):
        if other not in ATTRIBUTES[attributes]:
            continue
        for s in shapes:
            if sum(t[key] == s[key] for t in shapes) == 1:
                q = (f"What color is the {s['shape']}?" if key == "shape"
                     else f"What shape is the {s['color']} object?")
                options.append((q, s[other]))
    return options[int(rng.integers(len(options)))] if options else None


def _ground(rng, shapes, original_hw, resized_hw):
    ref = shapes[int(rng.integers(len(shapes)))]
    label = f"{ref['color']} {ref['shape']}"
    boxes = [scale_box(s["bbox"], original_hw, resized_hw) for s in shapes
             if s["color"] == ref["color"] and s["shape"] == ref["shape"]]
    q = f"Locate the {label}." if len(boxes) == 1 else f"Locate every {label}."
    return q, grounding_answer(boxes, label), sorted(boxes, key=left_to_right)


def _detect(shapes, original_hw, resized_hw):
    """Every shape, left to right, with its "colour kind" label; draws no random numbers."""
    boxes = [scale_box(s["bbox"], original_hw, resized_hw) for s in shapes]
    answer = grounding_answer(boxes, [f"{s['color']} {s['shape']}" for s in shapes])
    return "Locate every shape.", answer, sorted(boxes, key=left_to_right)


def _question(rng, task: str, shapes, original_hw, resized_hw, attributes: str = "both") -> tuple[str, str, dict]:
    """One (question, answer, meta); an attribute question without a unique answer becomes a count."""
    meta = {"task": task}
    qa = _attribute(rng, shapes, attributes) if task == "attribute" else None
    if task == "detect":
        q, a, meta["boxes_resized"] = _detect(shapes, original_hw, resized_hw)
    elif task == "ground":
        q, a, meta["boxes_resized"] = _ground(rng, shapes, original_hw, resized_hw)
    elif qa is not None:
        q, a = qa
    else:
        meta["task"] = "count"
        q, a = _count(rng, shapes)
    meta["answer"], meta["form"] = a, question_form(q)
    return q, a, meta


def make_record(rng, tasks: list[str], shapes, image: str, original_hw, resized_hw, attributes: str = "both") -> dict:
    """One LLaVA-form record with a turn per task (distinct questions; repeats are redrawn a few times).

    "meta" describes the first turn (what `qwenvl_jax.eval` scores) plus the picture; with more than
    one turn, meta["turns"] lists every turn's meta. Several turns about one picture give the model
    more answer tokens per encoded image, which is what a CPU training budget is short of.
    """
    turns, seen = [], set()
    for task in tasks:
        for _ in range(8):
            q, a, meta = _question(rng, task, shapes, original_hw, resized_hw, attributes)
            if q not in seen:
                break
        if q in seen:
            continue
        seen.add(q)
        turns.append((q, a, meta))
    conversations = []
    for k, (q, a, _) in enumerate(turns):
        # No newline after <image>: the prompt then tokenizes exactly as infer/eval's chat messages
        # ([image, text]) do, so the bundled model is asked in the form it was trained on.
        conversations += [{"from": "human", "value": f"<image>{q}" if k == 0 else q},
                          {"from": "gpt", "value": a}]
    meta = {**turns[0][2], "original_hw": list(original_hw), "resized_hw": list(resized_hw), "shapes": shapes}
    if len(turns) > 1:
        meta["turns"] = [m for _, _, m in turns]
    return {"image": image, "conversations": conversations, "meta": meta}


def make_dataset(out_dir, n: int, seed: int = 0, name: str = "train.jsonl", mix=DEFAULT_MIX,
                 min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS, per_image: int = 1,
                 turns: int = 1, shapes: tuple[int, int] = SHAPE_COUNT, repeat: float = 0.0,
                 attributes: str = "both") -> Path:
    """Writes out_dir/name and out_dir/images/<stem>_NNNNN.png (stem keeps train and eval sets apart).

    One numpy Generator drives everything in a fixed order, so a seed fixes every byte.
    per_image > 1 asks several questions about each picture (one record each); turns > 1 asks up to
    that many distinct questions about a picture within one record (a multi-turn conversation).
    shapes = (min, max) shapes per picture, within 1..5 (one shape per picture: a localization warm-up).
    repeat = probability that a shape copies an earlier one's colour and kind (see `draw_scene`).
    attributes = which attribute questions are asked: "both", "color" or "kind" (see `_attribute`).
    """
    if n < 1 or per_image < 1 or turns < 1:
        raise ValueError(f"--n, --per-image and --turns must be >= 1, got {n}, {per_image} and {turns}")
    lo, hi = shapes
    if not SHAPE_COUNT[0] <= lo <= hi <= SHAPE_COUNT[1]:
        raise ValueError(f"--shapes must be MIN,MAX with {SHAPE_COUNT[0]} <= MIN <= MAX <= {SHAPE_COUNT[1]}, "
                         f"got {lo},{hi}")
    if attributes not in ATTRIBUTES:
        raise ValueError(f"--attributes must be one of {', '.join(ATTRIBUTES)}, got {attributes!r}")
    if not 0.0 <= repeat <= 1.0:
        raise ValueError(f"--repeat must be a probability in [0, 1], got {repeat}")
    p = np.asarray(mix, float)
    if p.shape not in ((3,), (4,)) or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"mix must be 3 or 4 non-negative weights (count, attribute, ground[, detect]), got {mix}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    stem, rng = Path(name).stem, np.random.default_rng(seed)
    lines = []
    for i in range(n):
        if i % per_image == 0:
            img, drawn = draw_scene(rng, (lo, hi), repeat)
            rel = f"images/{stem}_{i // per_image:05d}.png"
            img.save(out / rel, format="PNG", compress_level=1)
            original = (img.height, img.width)
            resized = smart_resize(*original, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
        tasks = [TASKS[int(k)] for k in rng.choice(len(p), size=turns, p=p / p.sum())]
        record = {"id": f"{stem}-{i}", **make_record(rng, tasks, drawn, rel, original, resized, attributes)}
        lines.append(json.dumps(record, separators=(",", ":")) + "\n")
    return _write_lines(out / name, lines)


# ------------------------------------------------------------------------------------------ the bundled recipe

# What the bundled demo model is trained on and scored on (configs/demo_*.yaml): each record is one
# question about a fresh picture; its form decides how many shapes the picture holds. Only questions
# that need no choosing among shapes: "which shape does the question name?" is what a model this
# size does not learn on a CPU budget (docs/demo_model.md), so colour, kind and grounding are asked
# about one-shape pictures and counting is of every shape.
BUNDLED_SHAPES = {"ground": (1, 1), "color": (1, 1), "kind": (1, 1), "count_all": (1, 5)}
BUNDLED_WEIGHTS = (0.35, 0.1, 0.25, 0.3)  # grounding needs the most steps, colour the fewest


def _bundled_question(rng, form: str, shapes, original_hw, resized_hw) -> tuple[str, str, dict]:
    meta = {"task": {"ground": "ground", "count_all": "count"}.get(form, "attribute"), "form": form}
    ref = shapes[0]
    if form == "ground":
        q, a, meta["boxes_resized"] = _ground(rng, shapes, original_hw, resized_hw)
    elif form == "color":
        q, a = f"What color is the {ref['shape']}?", ref["color"]
    elif form == "kind":
        q, a = f"What shape is the {ref['color']} object?", ref["shape"]
    else:
        q, a = _count_of(shapes)
    meta["answer"] = a
    return q, a, meta


def make_bundled_dataset(out_dir, n: int, seed: int = 0, name: str = "train.jsonl", weights=BUNDLED_WEIGHTS,
                         min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> Path:
    """The bundled model's data: n one-question records, forms drawn with `weights` (ground, color,
    kind, count_all; see BUNDLED_SHAPES); images under out_dir/images/<stem>_NNNNN.png."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    w = np.asarray(weights, float)
    if w.shape != (len(BUNDLED_SHAPES),) or (w < 0).any() or w.sum() <= 0 or not np.isfinite(w).all():
        raise ValueError(f"--weights must be {len(BUNDLED_SHAPES)} non-negative weights "
                         f"({','.join(BUNDLED_SHAPES)}), got {weights}")
    forms = list(BUNDLED_SHAPES)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    stem, rng = Path(name).stem, np.random.default_rng(seed)
    lines = []
    for i in range(n):
        form = forms[int(rng.choice(len(forms), p=w / w.sum()))]
        img, shapes = draw_scene(rng, BUNDLED_SHAPES[form])
        rel = f"images/{stem}_{i:05d}.png"
        img.save(out / rel, format="PNG", compress_level=1)
        original = (img.height, img.width)
        resized = smart_resize(*original, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
        q, a, meta = _bundled_question(rng, form, shapes, original, resized)
        meta.update(original_hw=list(original), resized_hw=list(resized), shapes=shapes)
        conversations = [{"from": "human", "value": f"<image>{q}"}, {"from": "gpt", "value": a}]
        lines.append(json.dumps({"id": f"{stem}-{i}", "image": rel, "conversations": conversations, "meta": meta},
                                separators=(",", ":")) + "\n")
    return _write_lines(out / name, lines)


def _write_lines(path: Path, lines: list[str]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines))
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------ tokenizer

def demo_corpus() -> str:
    """Every question template and answer form (digits, colours, shapes, compact JSON) plus the chat
    template's words, repeated so BPE (min_frequency=2) merges them into few tokens."""
    lines = ["You are a helpful assistant.", "system", "user", "assistant"]
    for c in COLORS:
        lines.append(f"How many {c} shapes are there?")
        for s in SHAPES:
            lines += [f"How many {c} {_plural(s)} are there?", f"Locate the {c} {s}.", f"Locate every {c} {s}.",
                      f"What color is the {s}? {c}", f"What shape is the {c} object? {s}"]
    lines += [f"How many {_plural(s)} are there? How many shapes are there?" for s in SHAPES]
    rng = np.random.default_rng(0)
    for k in range(60):  # grounding answers with many numbers: digits and JSON punctuation
        c, s = list(COLORS)[k % 4], SHAPES[k % 3]
        boxes = [[int(v) for v in rng.integers(0, 448, 4)] for _ in range(1 + k % 3)]
        lines.append(grounding_answer(boxes, f"{c} {s}"))
    lines.append(" ".join(str(d) for d in range(10)) + " 0123456789")
    lines += [",".join(str(v) for v in range(k, k + 20)) for k in range(0, 1000, 20)]  # every coordinate
    return "\n".join(lines * 3) + "\n"


def write_demo_tokenizer(out_dir) -> dict[str, int]:
    """tokenizer.json / tokenizer_config.json / chat_template.jinja trained on `demo_corpus()`.

    Qwen2's pipeline except the number split (DEMO_SPLIT), and the same added tokens as
    `make_tiny_tokenizer` (which writes it), so the chat template and special ids behave as in the
    repo's tests. Returns special ids by name and vocab_size.
    """
    ids = tiny_tokenizer.make_tiny_tokenizer(out_dir, demo_corpus(), DEMO_VOCAB, DEMO_SPLIT)
    model_vocab = Qwen25VLConfig.from_preset("demo").text.vocab_size
    if ids["vocab_size"] > model_vocab:
        raise RuntimeError(f"demo tokenizer has {ids['vocab_size']} ids; the demo preset holds {model_vocab}")
    write_generation_config(out_dir, ids)
    return ids


def write_generation_config(out_dir, ids: dict[str, int]) -> Path:
    """generation_config.json: greedy (answers here have one right form), stopping at <|im_end|> or
    <|endoftext|> as the released checkpoints do. The train CLI's --export-hf copies it with the tokenizer."""
    config = {"bos_token_id": ids["pad_token_id"], "pad_token_id": ids["pad_token_id"], "do_sample": False,
              "eos_token_id": [ids["eos_token_id"], ids["pad_token_id"]]}
    path = Path(out_dir) / "generation_config.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------------------ CLI

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwenvl_jax.demo.make_data", description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (JSONL, images/, tokenizer)")
    ap.add_argument("--n", type=int, default=1000, help="number of records")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="train.jsonl", help="JSONL file name inside --out")
    ap.add_argument("--min-pixels", type=int, default=MIN_PIXELS)
    ap.add_argument("--max-pixels", type=int, default=MAX_PIXELS)
    ap.add_argument("--mix", default=",".join(map(str, DEFAULT_MIX)),
                    help="weights count,attribute,ground[,detect] (detect: 'Locate every shape.')")
    ap.add_argument("--per-image", type=int, default=1, help="questions (records) per picture")
    ap.add_argument("--turns", type=int, default=1, help="questions per record (multi-turn conversation)")
    ap.add_argument("--shapes", default="%d,%d" % SHAPE_COUNT, help="shapes per picture MIN,MAX (1..5)")
    ap.add_argument("--repeat", type=float, default=0.0,
                    help="probability a shape repeats an earlier one's colour and kind (more 2-5 counts)")
    ap.add_argument("--attributes", default="both",
                    help="attribute questions asked: both, color ('What color is the square?') or kind "
                         "('What shape is the red object?')")
    ap.add_argument("--recipe", choices=["bundled"],
                    help="bundled: the bundled demo model's questions (one-shape grounding, colour and kind; "
                         "counting every shape of 1-5); --mix/--shapes/--turns/--repeat/--attributes are then unused")
    ap.add_argument("--weights", default=",".join(map(str, BUNDLED_WEIGHTS)),
                    help="with --recipe bundled: weights of " + ",".join(BUNDLED_SHAPES))
    ap.add_argument("--no-tokenizer", action="store_true", help="skip the tokenizer/preprocessor files")
    args = ap.parse_args(argv)
    try:
        mix = [float(v) for v in args.mix.split(",")]
        shapes = args.shapes.split(",")
        if len(shapes) != 2 or not all(v.strip().isdigit() for v in shapes):
            raise ValueError(f"--shapes must be MIN,MAX (two integers), got {args.shapes!r}")
        t = time.perf_counter()
        if args.recipe == "bundled":
            path = make_bundled_dataset(args.out, args.n, args.seed, args.name,
                                        [float(v) for v in args.weights.split(",")], args.min_pixels, args.max_pixels)
        else:
            path = make_dataset(args.out, args.n, args.seed, args.name, mix, args.min_pixels, args.max_pixels,
                                args.per_image, args.turns, tuple(int(v) for v in shapes), args.repeat,
                                args.attributes)
        if not args.no_tokenizer:
            ids = write_demo_tokenizer(args.out)
            tiny_tokenizer.write_preprocessor_config(args.out, args.min_pixels, args.max_pixels)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    vocab = "" if args.no_tokenizer else f"; tokenizer vocab {ids['vocab_size']}"
    print(f"wrote {args.n} records to {path} in {time.perf_counter() - t:.1f} s{vocab}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
