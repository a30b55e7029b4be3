"""OpenAI chat-completions shapes: a request body -> a checked ChatRequest, generated ids -> text
deltas (stop strings held back until they cannot start one), and the response objects.

Every problem with a request is an APIError naming the field (`param`), answered with
`{"error": {"message", "type", "param", "code"}}` and status 400 (401 for auth, 404 for a model
this server does not serve)."""

from __future__ import annotations

import dataclasses
import time
import uuid

from qwenvl_jax.config import is_finite_number
from qwenvl_jax.generation.sampling import SamplingParams

ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 4


class APIError(Exception):
    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class MediaRef:
    kind: str  # "image" or "video"
    url: str
    param: str  # where it sits in the request, for error messages


@dataclasses.dataclass
class ChatRequest:
    messages: list  # chat-template messages; media parts are {"type": "image"|"video"}
    media: list[MediaRef]  # in order of appearance
    max_tokens: int | None  # None: as many as the context leaves
    sampling: SamplingParams
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


def _number(body: dict, key: str, *, integer: bool = False, low=None, high=None, low_open: bool = False):
    value = body.get(key)
    if value is None:
        return None
    ok = is_finite_number(value) and (not integer or float(value).is_integer())
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        upper = high if high is not None else "inf"
        bounds = f" in {'(' if low_open else '['}{low}, {upper}]" if low is not None else ""
        raise APIError(f"{key} must be a{'n integer' if integer else ' number'}{bounds}, got {value!r}", param=key)
    return int(value) if integer else float(value)


def _text(value, param: str) -> str:
    if not isinstance(value, str):
        raise APIError(f"{param} must be a string, got {type(value).__name__}", param=param)
    return value


def _url(part: dict, key: str, param: str) -> str:
    value = part.get(key)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise APIError(f"{param}.{key} must be {{\"url\": \"...\"}}", param=f"{param}.{key}")
    return url


def _messages(value) -> tuple[list, list[MediaRef]]:
    if not isinstance(value, list) or not value:
        raise APIError("messages must be a non-empty list", param="messages")
    messages, media = [], []
    for i, message in enumerate(value):
        at = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(f"{at} must be an object with role and content", param=at)
        role = message.get("role")
        if role not in ROLES:
            raise APIError(f"{at}.role must be one of {', '.join(ROLES)}, got {role!r}", param=f"{at}.role")
        content = message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list) and content:
            parts = []
            for j, part in enumerate(content):
                where = f"{at}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append({"type": "text", "text": _text(part.get("text"), f"{where}.text")})
                elif kind in ("image_url", "video_url") and role == "user":
                    media.append(MediaRef(kind[:-4], _url(part, kind, where), where))
                    parts.append({"type": kind[:-4]})
                elif kind in ("image_url", "video_url"):
                    raise APIError(f"{where}: {kind} parts are only accepted in user messages", param=f"{where}.type")
                else:
                    raise APIError(f"{where}.type {kind!r} is not supported; expected text, image_url or video_url",
                                   param=f"{where}.type")
        else:
            raise APIError(f"{at}.content must be a string or a non-empty list of parts", param=f"{at}.content")
        messages.append({"role": role, "content": parts})
    if messages[-1]["role"] == "assistant":
        raise APIError("the last message must not be an assistant message (continuing one is not supported)",
                       param=f"messages[{len(messages) - 1}].role")
    return messages, media


def _stop(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise APIError(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them",
                       param="stop")
    return stops


def parse_chat_request(body, defaults: SamplingParams, served_model: str) -> ChatRequest:
    """A chat-completions body -> ChatRequest, or APIError naming the field. `defaults`: the
    checkpoint's generation_config sampling values, used for what the request leaves out."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_model:
        raise APIError(f"model {model!r} is not served here; this server serves {served_model!r}", param="model",
                       status=404, code="model_not_found")
    messages, media = _messages(body.get("messages"))
    n = _number(body, "n", integer=True, low=1)
    if n not in (None, 1):
        raise APIError("n must be 1 (one choice per request)", param="n")
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, low=-2, high=2) not in (None, 0.0):
            raise APIError(f"{key} is not supported (use repetition_penalty)", param=key)
    for key in ("logprobs", "tools", "functions"):
        if body.get(key) not in (None, False, []):
            raise APIError(f"{key} is not supported", param=key)
    max_tokens = _number(body, "max_completion_tokens", integer=True, low=1)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", integer=True, low=1)
    temperature = _number(body, "temperature", low=0, high=2)
    top_p = _number(body, "top_p", low=0, high=1, low_open=True)
    top_k = _number(body, "top_k", integer=True, low=-1)
    penalty = _number(body, "repetition_penalty", low=0, low_open=True)
    sampling = SamplingParams(
        temperature=defaults.temperature if temperature is None else temperature,
        top_k=defaults.top_k if top_k is None else max(top_k, 0),  # -1 (vLLM's "off") is 0 here
        top_p=defaults.top_p if top_p is None else top_p,
        repetition_penalty=defaults.repetition_penalty if penalty is None else penalty)
    seed = _number(body, "seed", integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError("stream must be true or false", param="stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict)
                                    and isinstance(options.get("include_usage", False), bool)):
        raise APIError("stream_options must be {\"include_usage\": true|false}", param="stream_options")
    return ChatRequest(messages=messages, media=media, max_tokens=max_tokens, sampling=sampling,
                       seed=None if seed is None else seed % 2**32, stop=_stop(body.get("stop")), stream=stream,
                       include_usage=bool(options and options.get("include_usage")))


class TextStream:
    """Generated ids -> text deltas. Holds back a trailing incomplete UTF-8 character and the last
    characters that could begin a stop string; ends the text before the first stop string."""

    def __init__(self, decode, stop: list[str], skip_ids=()):
        self.decode, self.stop, self.skip = decode, stop, frozenset(skip_ids)
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def add(self, token: int) -> str:
        if self.stopped or token in self.skip:
            return ""
        self.ids.append(token)
        self.text = self.decode(self.ids)
        found = [i for i in (self.text.find(s, max(0, self.emitted - self.hold)) for s in self.stop) if i >= 0]
        if found:
            self.text, self.stopped = self.text[:min(found)], True
            return self._take(len(self.text))
        end = len(self.text)
        while end > self.emitted and self.text[end - 1] == "\ufffd":  # a character still arriving
            end -= 1
        return self._take(end - self.hold)

    def finish(self) -> str:
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        delta = self.text[self.emitted:max(end, self.emitted)]
        self.emitted = max(end, self.emitted)
        return delta


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(cid: str, model: str, created: int, delta: dict | None, finish_reason: str | None = None,
          usage_: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out

