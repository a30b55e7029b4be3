"""The HTTP side: FastAPI routes in OpenAI's shapes over the continuous-batching engine (needs the
`serve` extra: FastAPI and uvicorn).

Requests are checked and their media loaded on a worker thread (a bad request is a 400 before
it reaches a slot), then handed to the engine, whose thread reports each token back to the
request's event loop. A client that disconnects cancels its request, which frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from qwenvl_jax.generation.decode import ContextLengthError
from qwenvl_jax.generation.sampling import SamplingParams
from qwenvl_jax.serve import protocol
from qwenvl_jax.serve.engine import Engine, Request
from qwenvl_jax.serve.media import MediaError, load_image, load_video
from qwenvl_jax.serve.protocol import APIError, ChatRequest, TextStream


class Server:
    """Model, processor and engine behind the routes; `prepare` turns a body into an engine Request."""

    def __init__(self, model, processor, engine: Engine, *, name: str, defaults: SamplingParams,
                 allowed_media_dir: Path | None = None, api_key: str | None = None, video_fps: float = 2.0):
        self.model, self.processor, self.engine = model, processor, engine
        self.name, self.defaults, self.allowed_media_dir = name, defaults, allowed_media_dir
        self.api_key, self.video_fps = api_key, video_fps
        self.created = int(time.time())

    def prepare(self, body) -> tuple[ChatRequest, object, int]:
        """-> (the parsed request, the model inputs, prompt tokens); APIError for anything wrong."""
        chat = protocol.parse_chat_request(body, self.defaults, self.name)
        try:
            chat.sampling.validate()
        except ValueError as e:
            raise APIError(str(e), param=str(e).split()[0]) from None
        images, videos, fps = [], [], []
        for ref in chat.media:
            try:
                if ref.kind == "image":
                    images.append(load_image(ref.url, self.allowed_media_dir))
                else:
                    frames, sample_fps = load_video(ref.url, self.allowed_media_dir, fps=self.video_fps)
                    videos.append(frames)
                    fps.append(sample_fps)
            except MediaError as e:
                raise APIError(f"{ref.param}: {e}", param=ref.param) from None
        proc = self.processor
        try:
            prompt = proc.apply_chat_template(chat.messages, add_generation_prompt=True)
            batch = proc(text=prompt, images=images or None, videos=videos or None, fps=fps or self.video_fps,
                         video_min_pixels=proc.video_min_pixels, video_max_pixels=proc.video_max_pixels)
        except ValueError as e:  # e.g. a budget the image cannot meet
            raise APIError(str(e), param="messages") from None
        inputs = self.model.prepare(**batch)
        prompt_tokens, limit = int(inputs.segment_ids.sum()), self.engine.max_seq_len
        if prompt_tokens >= limit:
            raise APIError(f"the prompt ({prompt_tokens} tokens) leaves no room for an answer in --max-seq-len "
                           f"({limit})", param="messages", code="context_length_exceeded")
        if chat.max_tokens is None:
            chat.max_tokens = limit - prompt_tokens
        try:
            self.engine.check(prompt_tokens, chat.max_tokens)
        except ContextLengthError as e:
            raise APIError(str(e), param="max_tokens", code="context_length_exceeded") from None
        return chat, inputs, prompt_tokens


def _events(loop: asyncio.AbstractEventLoop, chat: ChatRequest, inputs) -> tuple[Request, asyncio.Queue]:
    """An engine Request whose callbacks post ("token", id) / ("finish", reason) / ("error", e) to a queue."""
    events: asyncio.Queue = asyncio.Queue()

    def post(kind):
        return lambda value: loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    request = Request(inputs, max_tokens=chat.max_tokens, sampling=chat.sampling, seed=chat.seed,
                      on_token=post("token"), on_finish=post("finish"), on_error=post("error"))
    return request, events


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="qwenvl_jax", docs_url=None, redoc_url=None)
    eos = server.engine.eos

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.middleware("http")
    async def authenticate(request: HTTPRequest, call_next):
        if server.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {server.api_key}":
                return error(APIError("missing or wrong API key (Authorization: Bearer ...)", status=401,
                                      type="authentication_error", code="invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        engine = server.engine
        return {"status": "ok", "busy_slots": engine.busy_slots, "waiting": engine.waiting,
                "decode_steps": engine.steps}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                            "owned_by": "qwenvl_jax", "max_model_len": server.engine.max_seq_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        try:
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError):
                raise APIError("the request body is not valid JSON") from None
            chat, inputs, prompt_tokens = await run_in_threadpool(server.prepare, body)
        except APIError as e:
            return error(e)
        engine_request, events = _events(asyncio.get_running_loop(), chat, inputs)
        text = TextStream(server.processor.decode, chat.stop, skip_ids=eos)
        used = [0]  # tokens up to the end of the answer (a stop string's tokens; not those after it)

        def take(token: int) -> str:
            if not text.stopped:
                used[0] += 1
            delta = text.add(token)
            if text.stopped:
                engine_request.cancel()
            return delta

        server.engine.submit(engine_request)
        cid, created = protocol.completion_id(), int(time.time())

        def finish_reason(reason: str) -> str:
            return "stop" if text.stopped or reason == "stop" else "length"

        if not chat.stream:
            parts = []
            try:
                while True:
                    try:
                        kind, value = await asyncio.wait_for(events.get(), timeout=1.0)
                    except TimeoutError:
                        if await request.is_disconnected():
                            engine_request.cancel()
                            return JSONResponse({}, status_code=499)
                        continue
                    if kind == "token":
                        parts.append(take(value))
                    elif kind == "error":
                        return error(APIError(f"generation failed: {value}", status=500, type="server_error"))
                    else:
                        parts.append(text.finish())
                        return protocol.completion(cid, server.name, "".join(parts), finish_reason(value),
                                                   prompt_tokens, used[0])
            finally:
                engine_request.cancel()

        async def stream():
            def sse(obj) -> str:
                return f"data: {json.dumps(obj)}\n\n"

            try:
                yield sse(protocol.chunk(cid, server.name, created, {"role": "assistant", "content": ""}))
                while True:
                    kind, value = await events.get()
                    if kind == "token":
                        delta = take(value)
                        if delta:
                            yield sse(protocol.chunk(cid, server.name, created, {"content": delta}))
                    elif kind == "error":
                        yield sse(APIError(f"generation failed: {value}", status=500, type="server_error").body())
                        break
                    else:
                        delta = text.finish()
                        if delta:
                            yield sse(protocol.chunk(cid, server.name, created, {"content": delta}))
                        yield sse(protocol.chunk(cid, server.name, created, {}, finish_reason(value)))
                        if chat.include_usage:
                            yield sse(protocol.chunk(cid, server.name, created, None,
                                                     usage_=protocol.usage(prompt_tokens, used[0])))
                        break
                yield "data: [DONE]\n\n"
            finally:  # also when the client goes away mid-stream: the slot is freed
                engine_request.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app
