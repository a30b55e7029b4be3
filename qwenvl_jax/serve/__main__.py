"""python -m qwenvl_jax.serve: an OpenAI-compatible chat-completions server with continuous batching.

    python -m qwenvl_jax.serve --checkpoint Qwen/Qwen2.5-VL-7B-Instruct --max-batch 8 --port 8000

Without --checkpoint it serves the bundled demo model. It compiles the prefill, insert and decode
programs (a short text request through several slots) before it reports ready.

On several hosts every process runs the same command (with --distributed, or --coordinator,
--num-processes and --process-id); process 0 serves HTTP and broadcasts each scheduling decision,
the others run the same device programs.
"""

from __future__ import annotations

import argparse
import sys
import time

from qwenvl_jax import compilation_cache, distributed
from qwenvl_jax.cli import DefaultsHelpFormatter, user_error
from qwenvl_jax.demo import DEMO_MODEL


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m qwenvl_jax.serve", description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="HF checkpoint directory or hub id (default: the bundled demo "
                                                       "model)")
    ap.add_argument("--adapter", help="PEFT LoRA adapter (directory or hub id), merged at load")
    ap.add_argument("--revision", help="hub revision of a --checkpoint hub id")
    ap.add_argument("--adapter-revision", help="hub revision of an --adapter hub id")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-batch", type=int, default=8, help="decode slots (requests generated together)")
    ap.add_argument("--max-seq-len", type=int, help="prompt + max_tokens per request (default: the model's "
                                                    "context, at most 4096)")
    ap.add_argument("--steps-per-call", type=int, default=1, help="decode steps per device call (new requests "
                                                                   "join between calls: more steps, less overhead "
                                                                   "but a longer wait for a new request)")
    ap.add_argument("--warm-up-prompt-tokens", type=int, default=512, metavar="N",
                    help="before serving, compile the prefill of text prompts up to N tokens (prompts are padded "
                         "to powers of two; longer ones and new image sizes compile on first use)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"])
    ap.add_argument("--mesh", metavar="data=A,fsdp=B,tensor=C",
                    help="device mesh over all devices; one size may be -1 (default: one device; with several "
                         "processes, all devices on fsdp)")
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "pallas"])
    ap.add_argument("--allowed-media-dir", help="file:// image and video URLs must lie in this directory "
                                                "(default: file:// refused)")
    ap.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1 routes")
    ap.add_argument("--served-model-name", help="the model id clients name (default: the checkpoint's)")
    ap.add_argument("--video-fps", type=float, default=2.0, help="video frames sampled per second")
    compilation_cache.add_argument(ap)
    distributed.add_arguments(ap)
    return ap.parse_args(argv)


def build_server(args):
    """Loads the model and warms the engine; returns the Server (nothing listening yet)."""
    import jax  # noqa: F401 - after the compilation cache is set up

    from qwenvl_jax.config import is_finite_number
    from qwenvl_jax.infer import sampling_from
    from qwenvl_jax.pretrained import checkpoint_dtype, load_pretrained
    from qwenvl_jax.processing.processor import Processor
    from qwenvl_jax.serve.app import Server
    from qwenvl_jax.serve.engine import Engine, warm_up
    from qwenvl_jax.serve.media import allowed_media_dir
    from qwenvl_jax.sharding import Layout
    from qwenvl_jax.weights import hub

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    if args.max_batch < 1 or args.steps_per_call < 1:
        raise ValueError("--max-batch and --steps-per-call must be >= 1")
    if args.warm_up_prompt_tokens < 0:
        raise ValueError(f"--warm-up-prompt-tokens must be >= 0, got {args.warm_up_prompt_tokens}")
    if not (is_finite_number(args.video_fps) and args.video_fps > 0):
        raise ValueError(f"--video-fps must be a positive number, got {args.video_fps}")
    media_dir = allowed_media_dir(args.allowed_media_dir)
    checkpoint = hub.resolve(args.checkpoint or str(DEMO_MODEL), args.revision)
    if not (checkpoint / "config.json").is_file():
        raise ValueError(f"{checkpoint}: no config.json (not a Qwen2.5-VL checkpoint directory)")
    processor = Processor.from_pretrained(checkpoint)
    defaults, gen_eos = sampling_from(checkpoint, argparse.Namespace(temperature=None, top_k=None, top_p=None,
                                                                     repetition_penalty=None))
    layout = Layout.create(args.mesh)
    dtype = checkpoint_dtype(checkpoint) if args.dtype == "auto" else args.dtype
    t = time.perf_counter()
    model = load_pretrained(checkpoint, dtype=dtype, mesh=layout, attention_impl=args.attention,
                            adapter=args.adapter, adapter_revision=args.adapter_revision)
    context = model.config.text.max_position_embeddings
    max_seq_len = args.max_seq_len or min(context, 4096)
    engine = Engine(model, max_batch=args.max_batch, max_seq_len=max_seq_len,
                    eos_token_ids=gen_eos or processor.eos_token_ids, pad_token_id=processor.pad_token_id,
                    steps_per_call=args.steps_per_call)
    print(f"loaded {checkpoint} ({dtype}) in {time.perf_counter() - t:.1f} s; compiling...", file=sys.stderr,
          flush=True)
    name = args.served_model_name or (args.checkpoint if args.checkpoint else "qwenvl_jax-demo")
    if distributed.is_main_process():  # the others compile the same programs by following its warm-up
        prompt = processor.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
        warm_s = warm_up(engine, model.prepare(**processor(text=prompt)), max_prompt=args.warm_up_prompt_tokens)
        print(f"compiled in {warm_s:.1f} s", file=sys.stderr, flush=True)
    return Server(model, processor, engine, name=name, defaults=defaults, allowed_media_dir=media_dir,
                  api_key=args.api_key, video_fps=args.video_fps)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        return user_error(ValueError("serving needs FastAPI and uvicorn: pip install qwenvl_jax[serve]"))
    try:
        distributed.initialize_from_args(args)
        compilation_cache.enable_from_args(args)
        server = build_server(args)
    except (ValueError, OSError, KeyError) as e:
        return user_error(e)
    if not distributed.is_main_process():
        import jax

        print(f"process {jax.process_index()}: running process 0's steps", file=sys.stderr, flush=True)
        server.engine.follow()
        return 0
    from qwenvl_jax.serve.app import create_app

    server.engine.start()
    app = create_app(server)
    app.router.on_startup.append(lambda: print(f"ready: serving {server.name!r} on http://{args.host}:{args.port}/v1",
                                               file=sys.stderr, flush=True))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        server.engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
