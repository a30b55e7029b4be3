"""python -m qwenvl_jax.infer: answer a prompt about images / a video with a Qwen2.5-VL checkpoint.

    python -m qwenvl_jax.infer          # the bundled demo model on its sample picture (draws boxes)
    python -m qwenvl_jax.infer --checkpoint DIR --prompt "Describe the picture." --image cat.jpg
    python -m qwenvl_jax.infer --checkpoint DIR --prompt "Locate the cat." --image cat.jpg --draw out.png
    python -m qwenvl_jax.infer --checkpoint DIR --prompt "What happens?" --video clip.mp4 --stream
    python -m qwenvl_jax.infer --checkpoint DIR --prompt ... --image a.jpg --mesh data=1,fsdp=2,tensor=4
    python -m qwenvl_jax.infer --checkpoint Qwen/Qwen2.5-VL-3B-Instruct --adapter my_lora/ --prompt ... --image a.jpg

Prints the answer (token by token with --stream). With --json the last stdout line is one JSON
object: text, token_ids (generated ids), prompt_tokens, boxes (grounding output mapped to
original-image pixels), prefill_s, decode_tokens_per_s, compile_s, load_s. Progress goes to stderr.
Checkpoints: a directory (safetensors or PyTorch .bin) or a hub id (from the local hub cache, or
downloaded; HF_HUB_OFFLINE=1 honoured), optionally with a PEFT LoRA adapter merged at load; the
dtype is the checkpoint's own unless --dtype says otherwise.
Sampling defaults come from the checkpoint's generation_config.json; flags override them.
With --mesh the weights are loaded straight into their shards over all devices (of all
processes, with --distributed or --coordinator...); only process 0 prints.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":  # a one-shot run: no cycle collection over the imports' objects (imports_done)
    gc.disable()

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import jax

from qwenvl_jax import compilation_cache, distributed
from qwenvl_jax.cli import DefaultsHelpFormatter, imports_done, skip_final_collection, user_error
from qwenvl_jax.config import is_finite_number
from qwenvl_jax.demo import DEMO_MODEL, SAMPLE_IMAGE, SAMPLE_PROMPT
from qwenvl_jax.generation.sampling import SamplingParams
from qwenvl_jax.processing.video_io import check_read_options

DEFAULT_MAX_NEW_TOKENS = 512
DEMO_DRAW = "demo_boxes.png"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m qwenvl_jax.infer", description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--checkpoint", help="HF Qwen2.5-VL checkpoint: a directory (safetensors or PyTorch .bin) or "
                    "a hub id such as Qwen/Qwen2.5-VL-3B-Instruct (default: the bundled demo model)")
    ap.add_argument("--adapter", help="PEFT LoRA adapter (directory or hub id), merged into the weights at load")
    ap.add_argument("--revision", help="hub revision (branch, tag or commit) of a --checkpoint hub id")
    ap.add_argument("--adapter-revision", help="hub revision of an --adapter hub id")
    ap.add_argument("--prompt", help=f"the user's question (demo default: {SAMPLE_PROMPT!r})")
    ap.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    ap.add_argument("--video", help="video file, animated GIF/WebP, or a directory of frames")
    ap.add_argument("--system", help="system prompt (default: the chat template's)")
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    ap.add_argument("--temperature", type=float, help="0 = greedy (default: generation_config.json)")
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--repetition-penalty", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                    help="params' and compute dtype; auto: the checkpoint's own (config.json torch_dtype), "
                         "as transformers does")
    ap.add_argument("--min-pixels", type=int, help="per-image pixel floor (default: the checkpoint's)")
    ap.add_argument("--max-pixels", type=int, help="per-image pixel cap (default: the checkpoint's)")
    ap.add_argument("--fps", type=float, default=2.0, help="video frames sampled per second")
    ap.add_argument("--nframes", type=int, help="sample this many video frames (instead of --fps)")
    ap.add_argument("--video-start", type=float, metavar="SECONDS", help="start of the video clip to read")
    ap.add_argument("--video-end", type=float, metavar="SECONDS", help="end of the video clip to read")
    ap.add_argument("--json", action="store_true", help="end stdout with one JSON line")
    ap.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    ap.add_argument("--draw", metavar="OUT.png", help="write the first image with the predicted boxes")
    ap.add_argument("--mesh", metavar="data=A,fsdp=B,tensor=C",
                    help="device mesh over all devices; one size may be -1 (default: one device; with several "
                         "processes, all devices on fsdp)")
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "pallas"],
                    help="attention implementation: auto = Pallas kernels on TPU, XLA elsewhere")
    compilation_cache.add_argument(ap)
    distributed.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.checkpoint is None:  # the bundled demo: its model, its sample picture, boxes drawn
        args.checkpoint = str(DEMO_MODEL)
        if args.prompt is None and not args.image and not args.video:
            args.prompt, args.image = SAMPLE_PROMPT, [str(SAMPLE_IMAGE)]
            args.draw = args.draw or DEMO_DRAW
            args.max_new_tokens = min(args.max_new_tokens, 128)
    if args.prompt is None:
        ap.error("--prompt is required with --checkpoint")
    return args


def sampling_from(checkpoint: Path, args) -> tuple[SamplingParams, list[int] | None]:
    """generation_config.json defaults (if any), overridden by flags; also its eos ids."""
    gen = read_generation_config(checkpoint / "generation_config.json")
    greedy = not gen.get("do_sample", False)
    temperature = args.temperature if args.temperature is not None else (0.0 if greedy else gen.get("temperature", 1.0))
    params = SamplingParams(
        temperature=float(temperature),
        top_k=int(args.top_k if args.top_k is not None else (0 if greedy else gen.get("top_k") or 0)),
        top_p=float(args.top_p if args.top_p is not None else (1.0 if greedy else gen.get("top_p") or 1.0)),
        repetition_penalty=float(args.repetition_penalty if args.repetition_penalty is not None
                                 else gen.get("repetition_penalty", 1.0)))
    eos = gen.get("eos_token_id")
    return params, ([eos] if isinstance(eos, int) else eos)


def read_generation_config(path: Path) -> dict:
    """The sampling keys of a generation_config.json ({} without one), type-checked, so a bad
    value is one line naming the file rather than a failure deep in sampling."""
    if not path.is_file():
        return {}
    try:
        gen = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(gen, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(gen).__name__}")
    if not isinstance(gen.get("do_sample", False), bool):
        raise ValueError(f"{path}: do_sample must be true or false, got {gen['do_sample']!r}")
    for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
        value = gen.get(key)
        if value is not None and not is_finite_number(value):
            raise ValueError(f"{path}: {key} must be a finite number, got {value!r}")
    eos = gen.get("eos_token_id")
    ids = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
    if eos is not None and not (isinstance(ids, list) and ids
                                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
        raise ValueError(f"{path}: eos_token_id must be a token id or a list of them, got {eos!r}")
    return gen


def check_numbers(args) -> None:
    """Every numeric flag finite and in range before any work (NaN passes `< 0` checks)."""
    if not (math.isfinite(args.fps) and args.fps > 0):
        raise ValueError(f"--fps must be a positive number, got {args.fps}")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}")
    for flag, value in (("--min-pixels", args.min_pixels), ("--max-pixels", args.max_pixels)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.min_pixels is not None and args.max_pixels is not None and args.min_pixels > args.max_pixels:
        raise ValueError(f"--min-pixels ({args.min_pixels}) must not exceed --max-pixels ({args.max_pixels})")
    if (args.nframes is not None or args.video_start is not None or args.video_end is not None) and not args.video:
        raise ValueError("--nframes / --video-start / --video-end need a --video")
    try:
        check_read_options(nframes=args.nframes, video_start=args.video_start, video_end=args.video_end)
    except ValueError as e:  # named as the flags are
        message = str(e)
        for name in ("nframes", "video_start", "video_end"):
            message = message.replace(name, "--" + name.replace("_", "-"))
        raise ValueError(message) from None


def build_messages(args) -> list[dict]:
    content = [{"type": "image", "image": p} for p in args.image]
    if args.video:
        content.append({"type": "video", "video": args.video})
    content.append({"type": "text", "text": args.prompt})
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return messages + [{"role": "user", "content": content}]


def say(*args, **kwargs) -> None:
    """print() on process 0 only: every process of a multi-host run executes the same command."""
    if distributed.is_main_process():
        print(*args, **kwargs)


class _Stream:
    """Prints the decoded text as it grows (whole-prefix decode: byte-level BPE pieces can be partial)."""

    def __init__(self, processor):
        self.processor, self.ids, self.printed = processor, [], ""

    def __call__(self, tokens):
        self.ids.append(int(tokens[0]))
        text = self.processor.decode(self.ids)
        if not text.endswith("\ufffd") and len(text) > len(self.printed):
            say(text[len(self.printed):], end="", flush=True)
            self.printed = text


def run(args) -> dict:
    from qwenvl_jax.config import Qwen25VLConfig
    from qwenvl_jax.generation.decode import check_context, generate
    from qwenvl_jax.generation.grounding import draw_grounding, ground
    from qwenvl_jax.pretrained import checkpoint_dtype, load_pretrained
    from qwenvl_jax.processing.image import load_image
    from qwenvl_jax.processing.processor import Processor
    from qwenvl_jax.processing.video_io import read_video
    from qwenvl_jax.sharding import Layout
    from qwenvl_jax.weights import hub

    imports_done()
    checkpoint = hub.resolve(args.checkpoint, args.revision)  # a hub id -> its local snapshot
    if checkpoint == DEMO_MODEL and not (checkpoint / "config.json").is_file():
        raise ValueError(f"the bundled demo model is missing ({checkpoint}); pass --checkpoint DIR")
    if not args.prompt.strip():
        raise ValueError("--prompt is empty")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check_numbers(args)
    if args.draw and not args.image:
        raise ValueError("--draw needs an --image to draw on")
    if args.draw:  # checked before generating, so the answer is never lost to a bad path
        folder = Path(args.draw).resolve().parent
        if not folder.is_dir():
            raise ValueError(f"--draw {args.draw}: folder {folder} does not exist")
        if Path(args.draw).is_dir() or not os.access(folder, os.W_OK):
            raise ValueError(f"--draw {args.draw}: cannot write a file there")
    sampling, gen_eos = sampling_from(checkpoint, args)
    sampling.validate()

    processor = Processor.from_pretrained(checkpoint)
    images = [load_image(p) for p in args.image]  # fails early, naming the file
    videos, fps = [], args.fps
    if args.video:
        # the frame budget goes where qwen-vl-utils applies it: to the frames as they are read
        frames, fps = read_video(args.video, fps=args.fps, nframes=args.nframes, min_pixels=args.min_pixels,
                                 max_pixels=args.max_pixels, video_start=args.video_start, video_end=args.video_end)
        videos = [frames]
    prompt = processor.apply_chat_template(build_messages(args), add_generation_prompt=True)
    batch = processor(text=prompt, images=images or None, videos=videos or None, fps=fps,
                      min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                      video_min_pixels=processor.video_min_pixels, video_max_pixels=processor.video_max_pixels)

    # Before the (slow) weight load: does the request fit the context?
    config = Qwen25VLConfig.from_hf_file(checkpoint)
    check_context(int(batch["attention_mask"].sum()), args.max_new_tokens, config.text.max_position_embeddings)
    layout = Layout.create(args.mesh)  # a mesh that does not fit the devices fails here, before loading
    mesh_desc = ",".join(f"{a}={n}" for a, n in layout.mesh.shape.items())

    t = time.perf_counter()
    dtype = checkpoint_dtype(checkpoint) if args.dtype == "auto" else args.dtype
    with_adapter = f" + adapter {args.adapter}" if args.adapter else ""
    say(f"loading {checkpoint}{with_adapter} ({dtype}, mesh {mesh_desc})...", file=sys.stderr, flush=True)
    model = load_pretrained(checkpoint, dtype=dtype, mesh=layout, attention_impl=args.attention,
                            adapter=args.adapter, adapter_revision=args.adapter_revision)
    load_s = time.perf_counter() - t
    say(f"loaded in {load_s:.1f} s; compiling and generating...", file=sys.stderr, flush=True)
    stream = _Stream(processor) if args.stream else None
    out = generate(model, model.prepare(**batch), max_new_tokens=args.max_new_tokens,
                   eos_token_ids=gen_eos or processor.eos_token_ids, pad_token_id=processor.pad_token_id,
                   sampling=sampling, seed=args.seed, on_tokens=stream)
    ids = out.token_ids[0]
    text = processor.decode(ids)
    if stream is not None:
        say(text[len(stream.printed):], flush=True)
    else:
        say(text, flush=True)

    boxes = []
    if images:
        gh, gw = batch["image_grid_thw"][0][1:]
        resized = (int(gh) * processor.patch_size, int(gw) * processor.patch_size)
        boxes = ground(text, (images[0].height, images[0].width), resized)
        if args.draw and distributed.is_main_process():
            draw_grounding(images[0], boxes, args.draw)
            say(f"wrote {args.draw} ({len(boxes)} boxes/points)", file=sys.stderr)
    return {"text": text, "token_ids": ids, "prompt_tokens": out.prompt_tokens[0], "boxes": boxes,
            "prefill_s": round(out.prefill_s, 4), "decode_tokens_per_s": round(out.decode_tokens_per_s, 2),
            "compile_s": round(out.compile_s, 2), "load_s": round(load_s, 2), "mesh": dict(layout.mesh.shape),
            "processes": jax.process_count()}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        distributed.initialize_from_args(args)
        compilation_cache.enable_from_args(args)
        result = run(args)
    except (ValueError, OSError, KeyError) as e:  # user errors: one line, no traceback
        return user_error(e)
    if args.json:
        say(json.dumps(result))
    skip_final_collection()
    return 0


if __name__ == "__main__":
    sys.exit(main())
