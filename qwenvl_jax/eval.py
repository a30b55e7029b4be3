"""python -m qwenvl_jax.eval: greedy answers to a JSONL set's first questions, scored against its answers.

    python -m qwenvl_jax.eval --checkpoint runs/shapes/final --data data/shapes/eval.jsonl --limit 500

Prints one JSON line: counting_accuracy, attribute_accuracy, exact_accuracy (all records),
grounding_iou50 (share of ground-truth boxes matched one-to-one by a predicted box with IoU >= 0.5),
grounding_precision50, grounding_mean_iou, n / n_count / n_attribute / n_ground, by_form (per
question form of make_data -- count_all, count_color, color, kind, ground, ... -- its n, accuracy
and, for grounding, iou50), samples_per_s, compile_s. Progress goes to stderr.

Records use the training format (README "Training data"). The task comes from the record's "meta"
(written by `qwenvl_jax.demo.make_data`); a record without one counts toward exact_accuracy only.
Boxes are compared in pixels of the resized model input, the frame Qwen2.5-VL answers in, so
they are never rescaled: ground truth is meta["boxes_resized"] (else the reference answer parsed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qwenvl_jax import compilation_cache
from qwenvl_jax.cli import DefaultsHelpFormatter, user_error
from qwenvl_jax.data.formats import parse_record
from qwenvl_jax.data.sources import resolve_data_root
from qwenvl_jax.generation.grounding import BOX, parse_grounding

TASK_METRIC = {"count": "counting_accuracy", "attribute": "attribute_accuracy"}
DEFAULT_MAX_NEW_TOKENS = 128  # a 3-box grounding answer is ~80 demo tokens; generation stops at EOS anyway


# ------------------------------------------------------------------------------------------ scoring

def iou(a, b) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes (pixel edges); 0 for empty boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0) * max(ih, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(truth: list, predicted: list) -> list[float]:
    """Greedy one-to-one matching, best pair first; returns each truth box's IoU (0 when unmatched).

    Greedy rather than Hungarian: with a few well-separated shapes they agree, and it needs no scipy.
    """
    pairs = sorted(((iou(t, p), i, j) for i, t in enumerate(truth) for j, p in enumerate(predicted)), reverse=True)
    out, used = [0.0] * len(truth), set()
    for v, i, j in pairs:
        if v > 0 and out[i] == 0 and j not in used:
            out[i] = v
            used.add(j)
    return out


def normalize(text: str) -> str:
    """Case, surrounding space and a final period do not make a short answer wrong."""
    return text.strip().lower().removesuffix(".").strip()


def _items(text: str) -> list[tuple[str, list]]:
    return sorted((normalize(x.get("label", "")), [float(v) for v in x[BOX]]) for x in parse_grounding(text)
                  if BOX in x)


def score(records: list[dict], predictions: list[str]) -> dict:
    """Metrics for predictions (model texts) against records (each with "answer", and "task"/"boxes").

    A record here is `{"answer": str, "task": "count"|"attribute"|"ground"|None, "boxes": [[x1,y1,x2,y2]],
    "form": make_data's question form or None}`
    (`reference` builds it from a JSONL record); "detect" (make_data's "Locate every shape.") scores as
    "ground". A grounding prediction is exact when its boxes and labels equal the truth's as sets,
    whatever its JSON spacing; other answers compare after `normalize`.
    Metrics of a task with no records are None.
    """
    if len(records) != len(predictions):
        raise ValueError(f"{len(records)} records but {len(predictions)} predictions")
    hits = {t: [] for t in ("count", "attribute", "ground", None)}
    ious, n_pred, pred_hits = [], 0, 0
    form_hits, form_ious = {}, {}
    for rec, pred in zip(records, predictions):
        matched = None
        task = rec.get("task")
        if task == "detect":  # "Locate every shape.": grounding with a label per box
            task = "ground"
        if task == "ground":
            truth = rec.get("boxes")
            truth = [b for _, b in _items(rec["answer"])] if truth is None else truth
            boxes = [b for _, b in _items(pred)]
            matched = match_boxes(truth, boxes)
            ious += matched
            n_pred += len(boxes)
            pred_hits += sum(v >= 0.5 for v in matched)
            ok = _items(pred) == _items(rec["answer"])
        else:
            ok = normalize(pred) == normalize(rec["answer"])
        hits[task if task in hits else None].append(ok)
        if rec.get("form"):
            form_hits.setdefault(rec["form"], []).append(ok)
            if matched is not None:
                form_ious.setdefault(rec["form"], []).extend(matched)

    def mean(xs):
        return round(sum(xs) / len(xs), 4) if xs else None

    out = {metric: mean(hits[task]) for task, metric in TASK_METRIC.items()}
    out["exact_accuracy"] = mean([h for v in hits.values() for h in v])
    out["grounding_iou50"] = mean([v >= 0.5 for v in ious])
    out["grounding_precision50"] = round(pred_hits / n_pred, 4) if n_pred else (None if not ious else 0.0)
    out["grounding_mean_iou"] = mean(ious)
    out["n"] = len(records)
    out.update({f"n_{t}": len(hits[t]) for t in ("count", "attribute", "ground")})
    out["by_form"] = {form: {"n": len(h), "accuracy": mean(h),
                             **({"iou50": mean([v >= 0.5 for v in form_ious[form]])} if form in form_ious else {})}
                      for form, h in sorted(form_hits.items())}
    return out


# ------------------------------------------------------------------------------------------ prompts

def reference(record: dict, data_root=None) -> tuple[list[dict], list[str], dict]:
    """A JSONL record -> (prompt messages up to its first user turn, image paths, scoring record)."""
    messages = parse_record(record, data_root).messages
    first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    answer = next((m for m in messages[(first or 0) + 1:] if m["role"] == "assistant"), None)
    if first is None or answer is None:
        raise ValueError("the record has no user turn followed by an assistant turn")
    prompt = messages[:first + 1]
    parts = [p for m in prompt for p in m["content"]]
    if any(p["type"] == "video" for p in parts):
        raise ValueError("videos are not supported by eval")
    meta = record.get("meta") or {}
    truth = {"answer": "".join(p["text"] for p in answer["content"] if p["type"] == "text"),
             "task": meta.get("task"), "boxes": meta.get("boxes_resized"), "resized_hw": meta.get("resized_hw"),
             "form": meta.get("form")}
    return prompt, [p["image"] for p in parts if p["type"] == "image"], truth


def references(records: list[dict], data_root=None) -> list[tuple[list[dict], list[str], dict]]:
    """`reference` of every record; a bad one is a ValueError naming its index."""
    out = []
    for n, record in enumerate(records):
        try:
            out.append(reference(record, data_root))
        except ValueError as e:
            raise ValueError(f"record {n}: {e}") from None
    return out


def load_records(path, limit: int | None = None) -> list[dict]:
    """JSON objects of a JSONL file (blank lines skipped), the first `limit` of them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    records = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(records) >= limit:
                break
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e})") from None
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


# ------------------------------------------------------------------------------------------ running

def evaluate(model, processor, records: list[dict], data_root=None, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             batch_size: int = 16, predictions_out: list | None = None, log=None) -> dict:
    """Greedy-generates each record's first answer, `batch_size` left-padded prompts at a time; `score`s them.

    predictions_out, when a list, receives {"task", "answer", "prediction"} per record, in order.
    """
    from qwenvl_jax.data.formats import media_options
    from qwenvl_jax.generation.decode import generate
    from qwenvl_jax.processing.image import load_image

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    prepared = references(records, data_root)
    texts, mismatched, compile_s = [], 0, 0.0
    t = time.perf_counter()
    for start in range(0, len(prepared), batch_size):
        chunk = prepared[start:start + batch_size]
        prompts = [processor.apply_chat_template(msgs, add_generation_prompt=True) for msgs, _, _ in chunk]
        images = [load_image(p) for _, paths, _ in chunk for p in paths]
        # an image part's own min_pixels / max_pixels, as training used them
        own = [media_options(p, "image") for msgs, _, _ in chunk for m in msgs for p in m["content"]
               if p["type"] == "image"]
        limits = [(o.get("min_pixels"), o.get("max_pixels")) if o else None for o in own]
        batch = processor(text=prompts, images=images or None, image_limits=limits if any(limits) else None)
        # The truth's boxes live in the resized frame make_data assumed; flag a processor that resizes otherwise.
        grids = iter(batch.get("image_grid_thw", []))
        for _, paths, truth in chunk:
            sizes = [[int(g[1]) * processor.patch_size, int(g[2]) * processor.patch_size]
                     for g in (next(grids) for _ in paths)]
            mismatched += bool(truth["resized_hw"] and sizes and sizes[0] != list(truth["resized_hw"]))
        out = generate(model, model.prepare(**batch), max_new_tokens=max_new_tokens,
                       eos_token_ids=processor.eos_token_ids, pad_token_id=processor.pad_token_id)
        compile_s += out.compile_s
        texts += [processor.decode(ids) for ids in out.token_ids]
        if log:
            log(f"{len(texts)}/{len(prepared)} records, {time.perf_counter() - t:.1f} s")
    elapsed = time.perf_counter() - t
    if predictions_out is not None:
        predictions_out.extend({"task": truth["task"], "answer": truth["answer"], "prediction": text}
                               for (_, _, truth), text in zip(prepared, texts))
    result = score([truth for _, _, truth in prepared], texts)
    result.update(samples_per_s=round(len(texts) / elapsed, 3), compile_s=round(compile_s, 2))
    if mismatched:
        result["resized_mismatch"] = mismatched
        if log:
            log(f"warning: {mismatched} images resize differently from their meta resized_hw; the data "
                "was made with other --min/--max-pixels than the checkpoint's preprocessor_config.json")
    return result


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m qwenvl_jax.eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="HF Qwen2.5-VL checkpoint directory (with tokenizer)")
    ap.add_argument("--data", required=True, help="JSONL file; relative media paths resolve against its directory")
    ap.add_argument("--data-root", help="resolve relative media paths against this directory instead")
    ap.add_argument("--limit", type=int, help="evaluate the first N records")
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    ap.add_argument("--predictions", metavar="OUT.jsonl", help="write each record's id, answer and prediction")
    compilation_cache.add_argument(ap)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    try:
        from qwenvl_jax.pretrained import load_pretrained
        from qwenvl_jax.processing.processor import Processor

        compilation_cache.enable_from_args(args)
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        checkpoint = Path(args.checkpoint)
        if not (checkpoint / "config.json").is_file():
            raise FileNotFoundError(f"{checkpoint} is not a checkpoint directory (no config.json)")
        records = load_records(args.data, args.limit)
        processor = Processor.from_pretrained(checkpoint)
        log(f"loading {checkpoint} ({args.dtype})...")
        model = load_pretrained(checkpoint, dtype=args.dtype)
        rows = []
        result = evaluate(model, processor, records, resolve_data_root(args.data, args.data_root),
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          predictions_out=rows, log=log)
        if args.predictions:
            Path(args.predictions).write_text("".join(json.dumps({"id": r.get("id", i), **row}) + "\n"
                                                      for i, (r, row) in enumerate(zip(records, rows))))
    except (ValueError, OSError, KeyError) as e:  # user errors: one line, no traceback
        return user_error(e)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
