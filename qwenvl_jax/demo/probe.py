"""python -m qwenvl_jax.demo.probe: does a checkpoint read its pictures?

    python -m qwenvl_jax.demo.probe --checkpoint DIR --data data/demo/eval.jsonl --limit 60

Generation scores (`qwenvl_jax.eval`) say how often an answer is right, not why it is wrong. This
probe separates "cannot see" from "sees but cannot answer":

* picture reliance: each record's first answer is scored teacher-forced (mean NLL of its tokens and
  <|im_end|>) with the real picture and with a white one of the same size. Per task, a model that
  reads the picture scores lower with the real one; equal numbers mean the answer comes from the
  text alone.
* coordinates: the teacher-forced NLL of each digit of the first box of the grounding answers, by
  coordinate (x1 y1 x2 y2) and place (hundreds, tens, units). ln 10 = 2.30 is chance for a digit;
  a model that reads colours but not positions sits there on x1 and y1.
* image-token embeddings (the merger's output, which replaces the image placeholders) against the
  text tokens' embeddings: rms of all, of their common part (the mean image token) and of the
  part that varies between tokens. On white canvases most tokens are identical, and a common part
  much larger than the varying one leaves the LLM little content to tell tokens apart.

Prints one JSON line: {"nll": {task: {"real", "blank", "n"}}, "coordinates": {coord: {place: nll}},
"embeddings": {...}}.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from qwenvl_jax import compilation_cache
from qwenvl_jax.cli import DefaultsHelpFormatter, user_error
from qwenvl_jax.data.sources import resolve_data_root


def answer_logprobs(model, processor, messages: list[dict], answer: str, images: list) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, teacher-forced log-probs) of `answer` + <|im_end|> after `messages` (the prompt).

    The answer's tokens are those after the generation prompt, so their count comes from the
    tokenizer, not from the template's trailing text.
    """
    import jax

    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    full = processor.apply_chat_template(messages + [{"role": "assistant", "content": [
        {"type": "text", "text": answer}]}], add_generation_prompt=False)
    batch = processor(text=[full], images=images or None)
    ids = np.asarray(batch["input_ids"][0])
    start = len(processor(text=[prompt], images=images or None)["input_ids"][0])
    stop = start + len(processor.tokenizer.encode(answer)) + 1  # + <|im_end|>
    logp = np.asarray(jax.nn.log_softmax(np.asarray(model(**batch), np.float32)[0], axis=-1))
    return ids[start:stop], logp[np.arange(start - 1, stop - 1), ids[start:stop]]


def score_first_answers(model, processor, records: list[dict], data_root=None) -> list[tuple]:
    """Per record: (truth, answer token ids, their log-probs with the real picture, with a white one
    of the same size). One pass feeds both `picture_reliance` and `coordinate_nll`."""
    from qwenvl_jax.eval import references
    from qwenvl_jax.processing.image import load_image

    scored = []
    for messages, paths, truth in references(records, data_root):
        images = [load_image(p) for p in paths]
        blank = [Image.new("RGB", im.size, (255, 255, 255)) for im in images]
        ids, real = answer_logprobs(model, processor, messages, truth["answer"], images)
        white = answer_logprobs(model, processor, messages, truth["answer"], blank)[1]
        scored.append((truth, ids, real, white))
    return scored


def picture_reliance(scored: list[tuple]) -> dict:
    """{task: {"real": mean NLL, "blank": mean NLL with white pictures, "n"}} over `score_first_answers`."""
    sums: dict[str, list] = {}
    for truth, _, real, white in scored:
        s = sums.setdefault(truth["task"] or "other", [0.0, 0.0, 0])
        s[0] -= float(np.mean(real))
        s[1] -= float(np.mean(white))
        s[2] += 1
    return {task: {"real": round(r / k, 4), "blank": round(b / k, 4), "n": k} for task, (r, b, k) in sums.items()}


BOX = re.compile(r'"bbox_2d"\s*:\s*\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]')
COORDINATES = ("x1", "y1", "x2", "y2")
PLACES = ("units", "tens", "hundreds", "thousands")


def token_spans(tokenizer, ids) -> list[tuple[int, int]]:
    """Character span of each token in the decoded text of `ids` (prefix decoding: exact for ASCII)."""
    ends = [len(tokenizer.decode(ids[:i + 1])) for i in range(len(ids))]
    return list(zip([0] + ends[:-1], ends))


def coordinate_tokens(answer: str, spans: list[tuple[int, int]]) -> list[tuple[int, str, str]]:
    """(token index, coordinate, digit place) of each token inside the numbers of the answer's first
    bbox_2d. A token holding one digit is named by its place ("tens"); one holding several, "number"."""
    m = BOX.search(answer)
    if m is None:
        return []
    out = []
    for k, coord in enumerate(COORDINATES, start=1):
        lo, hi = m.span(k)
        for i, (a, b) in enumerate(spans):
            if lo <= a and b <= hi and b > a:
                place = hi - 1 - a  # digits to the right of this one
                name = PLACES[place] if place < len(PLACES) else f"10^{place}"
                out.append((i, coord, name if b - a == 1 else "number"))
    return out


def coordinate_nll(tokenizer, scored: list[tuple]) -> dict:
    """{coordinate: {place: mean NLL}} of the first box in the grounding records' first answers
    (`score_first_answers`, real pictures). With digit tokens, a digit the model cannot place scores
    ln 10 (2.30), chance among ten; a model that localizes brings the leading places well below it.
    With number tokens (the demo tokenizer) a multi-digit coordinate is "number" (chance ~ln of the
    coordinate range) and a one-digit coordinate still reports as "units"."""
    sums: dict[str, dict[str, list]] = {}
    for truth, ids, real, _ in scored:
        if truth["task"] != "ground":
            continue
        for i, coord, place in coordinate_tokens(truth["answer"], token_spans(tokenizer, ids)):
            s = sums.setdefault(coord, {}).setdefault(place, [0.0, 0])
            s[0] -= float(real[i])
            s[1] += 1
    return {c: {p: round(v / k, 4) for p, (v, k) in places.items()} for c, places in sums.items()}


def embedding_stats(model, batch: dict, image_token_id: int) -> dict:
    """rms of the image-token rows of the input embeddings (all / common part / varying part) and
    of the text rows, for one processor batch."""
    import jax

    inputs = model.prepare(**batch)
    module = model.module
    x = np.asarray(jax.jit(module.embed)(inputs.input_ids, inputs.vision, inputs.vision_token_index), np.float64)
    is_image = np.asarray(inputs.input_ids) == image_token_id
    real = np.asarray(inputs.segment_ids) > 0
    img, txt = x[is_image], x[real & ~is_image]
    rms = lambda a: float(np.sqrt(np.mean(a * a))) if a.size else 0.0  # noqa: E731
    common = img.mean(axis=0) if len(img) else np.zeros(x.shape[-1])
    return {"image_rms": rms(img), "image_common_rms": rms(common), "image_varying_rms": rms(img - common),
            "text_rms": rms(txt), "image_tokens": int(is_image.sum())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwenvl_jax.demo.probe", description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="HF Qwen2.5-VL checkpoint directory (with tokenizer)")
    ap.add_argument("--data", required=True, help="JSONL with meta (make_data's format)")
    ap.add_argument("--data-root", help="resolve relative media paths against this directory (default: --data's)")
    ap.add_argument("--limit", type=int, default=60, help="first N records")
    ap.add_argument("--dtype", default="float32", choices=("bfloat16", "float32"))
    compilation_cache.add_argument(ap)
    args = ap.parse_args(argv)
    try:
        compilation_cache.enable_from_args(args)
        from qwenvl_jax.eval import load_records, reference
        from qwenvl_jax.pretrained import load_pretrained
        from qwenvl_jax.processing.image import load_image
        from qwenvl_jax.processing.processor import Processor

        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        checkpoint = Path(args.checkpoint)
        if not (checkpoint / "config.json").is_file():
            raise FileNotFoundError(f"{checkpoint} is not a checkpoint directory (no config.json)")
        root = resolve_data_root(args.data, args.data_root)
        records = load_records(args.data, args.limit)
        processor = Processor.from_pretrained(checkpoint)
        model = load_pretrained(checkpoint, dtype=args.dtype)
        scored = score_first_answers(model, processor, records, root)
        nll, coordinates = picture_reliance(scored), coordinate_nll(processor.tokenizer, scored)
        messages, paths, _ = reference(records[0], root)
        batch = processor(text=[processor.apply_chat_template(messages, add_generation_prompt=True)],
                          images=[load_image(p) for p in paths] or None)
        stats = embedding_stats(model, batch, processor.image_token_id)
    except (ValueError, OSError, KeyError) as e:  # user errors: one line, no traceback
        return user_error(e)
    embeddings = {k: round(v, 5) for k, v in stats.items()}
    print(json.dumps({"nll": nll, "coordinates": coordinates, "embeddings": embeddings}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
