"""Fine-tuning records -> HF-form conversations, and loss labels for the assistant turns.

Two record shapes are accepted (one JSON object per JSONL line):

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.jpg"},
                                               {"type": "text", "text": "What is it?"}]},
                  {"role": "assistant", "content": "A dog."}]}
    {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                                         {"from": "gpt", "value": "A dog."}]}

A media part of the first shape may carry its own keys, as qwen-vl-utils reads them: `min_pixels`,
`max_pixels` (an image's or each video frame's budget) and, for a video, `fps` or `nframes`,
`min_frames`, `max_frames`, `total_pixels`, `video_start` / `video_end` (seconds).

Both become a `Conversation` whose messages are what `Processor.apply_chat_template` takes. A bad
record raises `DataError`, whose `reason` is a short key the training loop counts skips under:
a broken record must cost one example, never the run.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from qwenvl_jax.processing.image import MAX_BUDGET_PIXELS, check_pixel_budget
from qwenvl_jax.processing.video_io import check_read_options

# Skip reasons: the whole vocabulary, so skip counters have fixed, documented keys.
MALFORMED_JSON = "malformed_json"  # a line that is not JSON
BAD_FORMAT = "bad_format"  # JSON, but not a conversation this module understands
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
MISSING_VIDEO = "missing_video"
CORRUPT_VIDEO = "corrupt_video"
TOO_LONG = "too_long"  # raised by the packing / truncation step, not here
REASONS = (MALFORMED_JSON, BAD_FORMAT, MISSING_IMAGE, CORRUPT_IMAGE, MISSING_VIDEO, CORRUPT_VIDEO, TOO_LONG)

ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
MEDIA_KINDS = ("image", "video")
_PLACEHOLDER = re.compile(r"(<image>|<video>)")
# Chat-template control tokens inside record text would break placeholder counting and label masking.
_CONTROL = re.compile(r"<\|(?:im_start|im_end|endoftext|vision_start|vision_end|vision_pad|image_pad|video_pad)\|>")
# Qwen2's pre-tokenizer merges the template's "\n" after the role with leading whitespace that holds
# a newline into one token, which would hide the turn start from `assistant_labels`.
_LEADING_NEWLINES = re.compile(r"^\s*[\r\n]")
# A media part's own keys (qwen-vl-utils' names), by kind; the rest of a part's keys are ignored.
MEDIA_OPTIONS = {"image": ("min_pixels", "max_pixels"),
                 "video": ("fps", "nframes", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels",
                           "video_start", "video_end")}
_UNSUPPORTED_OPTIONS = ("resized_height", "resized_width")


class DataError(ValueError):
    """A record that cannot become a training example; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown DataError reason {reason!r}; expected one of {REASONS}")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # grain workers send errors across processes
        return DataError, (self.reason, str(self))


@dataclasses.dataclass(frozen=True)
class MediaBlob:
    """An image/video file's bytes carried inside a record (ArrayRecord), named as the record named it."""

    name: str
    data: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class Conversation:
    """HF-form messages (content always a list of parts) and their media values in order of appearance.

    A media value is an absolute path string (JSONL) or a MediaBlob (ArrayRecord); the same object
    sits in the message part's "image"/"video" key and in `images`/`videos`.
    """

    messages: list
    images: list
    videos: list
    image_options: list = dataclasses.field(default_factory=list)  # media_options per image ({} if none)
    video_options: list = dataclasses.field(default_factory=list)  # read_video keywords per video


def _bad(message: str) -> DataError:
    return DataError(BAD_FORMAT, message)


def _text(value, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{where}: text must be a string, got {type(value).__name__}")
    if m := _CONTROL.search(value):
        raise _bad(f"{where}: text contains the chat-template token {m.group()}")
    return value


def _ref(value, kind: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(f"{where}: {kind} must be a non-empty path string, got {value!r}")
    value = value.removeprefix("file://")
    if re.match(r"^[a-z][a-z0-9+.-]*://", value, re.I) or value.startswith("data:"):
        raise _bad(f"{where}: {kind} {value[:60]!r} is a URL; only local files are supported (download first)")
    return value


def media_options(part: dict, kind: str, where: str = "") -> dict:
    """The options a media part gives for itself (MEDIA_OPTIONS[kind] keys present), checked.

    Raises DataError bad_format naming the key: a non-finite, non-positive or out-of-range number,
    min above max, video_start not before video_end, both fps and nframes (qwen-vl-utils refuses it too),
    or resized_height / resized_width (not supported: give min_pixels / max_pixels instead).
    """
    at = f"{where}: " if where else ""
    if unsupported := [k for k in _UNSUPPORTED_OPTIONS if k in part]:
        raise _bad(f"{at}{'/'.join(unsupported)} not supported; give the {kind} min_pixels / max_pixels instead")
    options = {k: part[k] for k in MEDIA_OPTIONS[kind] if k in part and part[k] is not None}
    try:
        if kind == "image":
            check_pixel_budget(options.get("min_pixels", 1), options.get("max_pixels", MAX_BUDGET_PIXELS))
        else:
            if "fps" in options and "nframes" in options:
                raise ValueError("give fps or nframes, not both")
            check_read_options(**options)
    except ValueError as e:
        raise _bad(f"{at}{kind} {e}") from None
    return options


def _role(turn: dict, key: str, where: str) -> str:
    role = turn.get(key)
    if not isinstance(role, str) or role not in ROLES:
        raise _bad(f"{where}: unknown role {role!r}; expected one of {sorted(ROLES)}")
    return ROLES[role]


def _messages_shape(record: dict, resolve) -> list[dict]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or "content" not in message:
            raise _bad(f"{where}: a message is an object with 'role' and 'content'")
        role, content = _role(message, "role", where), message["content"]
        if isinstance(content, str):
            parts = [{"type": "text", "text": _text(content, where)}]
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                at = f"{where}.content[{j}]"
                if not isinstance(part, dict):
                    raise _bad(f"{at}: a content part is an object, got {type(part).__name__}")
                kind = part.get("type") or next((k for k in ("image", "video", "text") if k in part), None)
                if kind in MEDIA_KINDS:
                    if kind not in part:
                        raise _bad(f"{at}: a {kind} part needs a {kind!r} key")
                    media_options(part, kind, at)
                    parts.append({**part, "type": kind, kind: resolve(kind, _ref(part[kind], kind, at))})
                elif kind == "text":
                    parts.append({"type": "text", "text": _text(part.get("text"), at)})
                else:
                    raise _bad(f"{at}: unknown part type {kind!r}; expected image, video or text")
        else:
            raise _bad(f"{where}: content must be a string or a list of parts")
        out.append({"role": role, "content": parts})
    return out


def _listed(record: dict, kind: str) -> list[str]:
    value = record.get(kind)
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list):
        raise _bad(f"'{kind}' must be a path or a list of paths")
    return [_ref(v, kind, f"'{kind}'") for v in values]


def _conversations_shape(record: dict, resolve) -> list[dict]:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise _bad("'conversations' must be a non-empty list")
    files = {kind: _listed(record, kind) for kind in MEDIA_KINDS}
    texts = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _bad(f"conversations[{i}]: a turn is an object with 'from' and 'value'")
        texts.append(_text(turn.get("value", turn.get("content")), f"conversations[{i}]"))
    for kind in MEDIA_KINDS:  # check before resolving, so a mismatch names both counts
        n = sum(t.count(f"<{kind}>") for t in texts)
        if n != len(files[kind]):
            raise _bad(f"the conversation holds {n} <{kind}> placeholder(s) but the record lists "
                       f"{len(files[kind])} {kind}(s)")
    queues = {kind: iter(files[kind]) for kind in MEDIA_KINDS}
    out = []
    for i, (turn, text) in enumerate(zip(turns, texts)):
        role = _role(turn, "from" if "from" in turn else "role", f"conversations[{i}]")
        parts = []
        for piece in _PLACEHOLDER.split(text):
            if piece in ("<image>", "<video>"):
                kind = piece[1:-1]
                parts.append({"type": kind, kind: resolve(kind, next(queues[kind]))})
            elif piece:  # text kept verbatim: "<image>\nQ" renders as Qwen's own finetuning code renders it
                parts.append({"type": "text", "text": piece})
        out.append({"role": role, "content": parts})
    return out


def _parse(record, resolve: Callable[[str, str], object]) -> list[dict]:
    """Validated HF-form messages; resolve(kind, ref) gives each media part's value."""
    if not isinstance(record, dict):
        raise _bad(f"a record must be a JSON object, got {type(record).__name__}")
    if ("messages" in record) == ("conversations" in record):
        raise _bad("a record needs exactly one of 'messages' (HF chat form) or 'conversations' (LLaVA form)"
                   f"; found keys {sorted(record)[:10]}")
    messages = (_messages_shape if "messages" in record else _conversations_shape)(record, resolve)
    answered = False
    for message in messages:
        if message["role"] != "assistant":
            continue
        texts = [p for p in message["content"] if p["type"] == "text"]
        if texts and texts[0] is message["content"][0]:
            texts[0]["text"] = _LEADING_NEWLINES.sub("", texts[0]["text"])
        answered |= any(p["text"].strip() for p in texts)
    if not answered:
        raise _bad("the conversation has no assistant turn with text, so nothing to train on")
    return messages


def parse_record(record: dict, data_root=None, *, media: Mapping[str, bytes] | None = None) -> Conversation:
    """A JSON record -> Conversation. Raises DataError (bad_format, or missing_* when `media` lacks a file).

    Relative media paths are joined to `data_root`; absolute paths are kept. For a record read from a
    data file, data_root is `sources.resolve_data_root(file)`: the file's directory unless a root is
    given explicitly (the pipeline and the CLIs do this). None: the current directory.
    Files are not opened here, so a missing one surfaces as missing_image/missing_video when loaded.
    `media` (from an ArrayRecord) maps each reference as written in the record to the file's bytes;
    the values are then MediaBlobs and `data_root` is unused.
    """
    def resolve(kind, ref):
        if media is None:
            return os.path.abspath(os.path.join(os.fspath(data_root), ref) if data_root is not None else ref)
        if ref not in media:
            raise DataError(MISSING_IMAGE if kind == "image" else MISSING_VIDEO,
                            f"{kind} {ref} was missing when this record was converted to ArrayRecord")
        return MediaBlob(ref, media[ref])

    messages = _parse(record, resolve)
    parts = {kind: [p for m in messages for p in m["content"] if p["type"] == kind] for kind in MEDIA_KINDS}
    return Conversation(messages, [p["image"] for p in parts["image"]], [p["video"] for p in parts["video"]],
                        [media_options(p, "image") for p in parts["image"]],
                        [media_options(p, "video") for p in parts["video"]])


def media_references(record: dict) -> list[tuple[str, str]]:
    """[(kind, ref)] of a record's media as written in it (validated as parse_record does), in order."""
    refs = []
    _parse(record, lambda kind, ref: refs.append((kind, ref)) or ref)
    return refs


def assistant_labels(input_ids, im_start_id: int, im_end_id: int, assistant_prefix_ids, ignore_index: int = -100,
                     mask_ids: Iterable[int] | None = None) -> np.ndarray:
    """Labels [L] for one token row [L]: input_ids on each assistant turn's content and its <|im_end|>.

    A turn is `<|im_start|>` + assistant_prefix_ids (the ids of "assistant\\n") + content + `<|im_end|>`.
    The newline the template writes after <|im_end|> stays unlabeled: generation stops at <|im_end|>,
    so the model never has to produce it. A turn cut off by truncation is labeled to the row's end.
    Everything else (system, user, the "<|im_start|>assistant\\n" scaffolding) and any id in `mask_ids`
    (vision tokens) get ignore_index. Labels are not shifted; the loss shifts.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 1:
        raise ValueError(f"input_ids must be one row [L], got shape {ids.shape}")
    prefix = np.asarray(list(assistant_prefix_ids), ids.dtype)
    labels = np.full_like(ids, ignore_index)
    ends = np.flatnonzero(ids == im_end_id)
    for start in np.flatnonzero(ids == im_start_id):
        content = start + 1 + len(prefix)
        if not np.array_equal(ids[start + 1:content], prefix):
            continue
        j = np.searchsorted(ends, content)
        stop = ends[j] + 1 if j < len(ends) else len(ids)
        labels[content:stop] = ids[content:stop]
    mask = list(mask_ids) if mask_ids is not None else []
    if mask:
        labels[np.isin(ids, mask)] = ignore_index
    return labels
