"""Tokenizer wrapper, chat template and vision placeholder expansion: SPEC sections 1.5 and 5.

The tokenizer is the checkpoint's own `tokenizer.json` run by the `tokenizers` library, as
transformers' fast tokenizer runs it: no BOS, added tokens matched whole. Chat templates are
rendered with jinja2 configured the way transformers configures it (sandboxed, trim_blocks,
lstrip_blocks, loopcontrols, its `tojson` / `raise_exception` / `strftime_now` helpers).
"""

from __future__ import annotations

import functools
import json
import re
import secrets
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

# Qwen2.5-VL's chat_template.json (identical to Qwen2-VL's), used when a checkpoint ships none.
DEFAULT_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_str(value) -> str | None:
    # tokenizer_config.json writes a special token as "..." or {"content": "...", ...}
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """Byte-level BPE tokenizer from `tokenizer.json`, special tokens from `tokenizer_config.json`."""

    def __init__(self, tokenizer: _HFTokenizer, config: dict | None = None):
        self._tok = tokenizer
        self._plain = None  # a copy that encodes special tokens' strings as text (encode_plain)
        config = config or {}
        self.special_tokens_map = {k: _token_str(config[k]) for k in _SPECIAL_KEYS if _token_str(config.get(k))}
        decoder = config.get("added_tokens_decoder", {})
        self.special_tokens = sorted({t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
                                     | {v["content"] for v in decoder.values() if v.get("special")})

    @classmethod
    def from_pretrained(cls, path) -> Tokenizer:
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer: {file} does not exist")
        config_file = path / "tokenizer_config.json"
        try:
            config = json.loads(config_file.read_text()) if config_file.is_file() else {}
            if not isinstance(config, dict):
                raise ValueError(f"a JSON {type(config).__name__}, not an object")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{config_file}: not a readable tokenizer config ({e})") from None
        try:
            tokenizer = _HFTokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
            text = str(e).strip().splitlines()
            raise ValueError(f"{file}: not a readable tokenizer ({text[0] if text else type(e).__name__})") from None
        return cls(tokenizer, config)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens_map.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens_map.get("pad_token")

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    def token_to_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_plain(self, text: str) -> list[int]:
        """`text` as plain text: a special token's string in it ("<|im_start|>") becomes ordinary
        tokens, never the control token (for text a user wrote, which must not forge turns)."""
        if self._plain is None:
            self._plain = _HFTokenizer.from_str(self._tok.to_str())
            self._plain.encode_special_tokens = True
        return self._plain.encode(text, add_special_tokens=False).ids

    def special_in(self, text: str) -> list[str]:
        """The special tokens whose strings occur in `text`."""
        return [t for t in self.special_tokens if t in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


# ---------------------------------------------------------------------------------------- chat template

def load_chat_template(path) -> str | None:
    """The checkpoint's template: chat_template.jinja > chat_template.json > tokenizer_config.json."""
    path = Path(path)
    if (f := path / "chat_template.jinja").is_file():
        return f.read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (f := path / name).is_file():
            template = json.loads(f.read_text()).get("chat_template")
            if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
                template = {t["name"]: t["template"] for t in template}.get("default")
            if template:
                return template
    return None


class _Generation(jinja2.ext.Extension):
    # `{% generation %}...{% endgeneration %}` marks assistant spans for HF's masks; render the body.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                     extensions=[_Generation, jinja2.ext.loopcontrols])
_ENV.filters["tojson"] = _tojson
_ENV.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
_compile = functools.lru_cache(maxsize=16)(_ENV.from_string)


def _plain(value):
    # What the template sees is plain JSON data: images/arrays become "<TypeName>" (templates only
    # test whether a media key is present), None-valued message keys are dropped, as in transformers.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def render_chat_template(messages: list[dict], template: str | None = None, *, add_generation_prompt: bool = True,
                         **kwargs) -> str:
    """HF-format messages -> prompt string. kwargs reach the template (e.g. add_vision_id, eos_token)."""
    if not messages:
        raise ValueError("cannot render an empty conversation")
    if not all(isinstance(m, dict) for m in messages):
        raise ValueError("every message must be a mapping with a role and content")
    messages = [{k: v for k, v in m.items() if v is not None} for m in _plain(list(messages))]
    try:
        compiled = _compile(template or DEFAULT_CHAT_TEMPLATE)
        return compiled.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **_plain(kwargs))
    except jinja2.exceptions.TemplateError as e:  # syntax, the sandbox refusing, raise_exception(...)
        raise ValueError(f"chat template: {type(e).__name__}: {e}") from None


class ChatPrompt(str):
    """A rendered chat prompt that knows which character spans hold message text (`text_spans`,
    sorted (start, end) pairs): Processor tokenizes those as plain text, so text that spells a
    control token ("<|im_start|>system...") cannot open a turn; the template's own markers stay
    control tokens. Any string operation returns a plain str (and the spans are gone)."""

    text_spans: tuple[tuple[int, int], ...] = ()

    def __new__(cls, text: str, text_spans=()):
        prompt = super().__new__(cls, text)
        prompt.text_spans = tuple(text_spans)
        return prompt

    def segments(self) -> list[tuple[str, bool]]:
        """[(piece, is_message_text)] covering the prompt in order."""
        out, at = [], 0
        for start, end in self.text_spans:
            if start > at:
                out.append((self[at:start], False))
            out.append((self[start:end], True))
            at = end
        if at < len(self):
            out.append((self[at:], False))
        return out


def _with_sentinels(messages: list[dict], nonce: str) -> tuple[list[dict], list[str]]:
    """Messages whose text (string content, text parts) is replaced by numbered sentinels."""
    texts: list[str] = []

    def mark(text: str) -> str:
        texts.append(text)
        return f"\ue000{nonce}{len(texts) - 1}\ue001"

    out = []
    for m in messages:
        m = dict(m)
        content = m.get("content")
        if isinstance(content, str):
            m["content"] = mark(content)
        elif isinstance(content, list):
            m["content"] = [dict(part, text=mark(part["text"])) if isinstance(part, dict)
                            and isinstance(part.get("text"), str) else part for part in content]
        out.append(m)
    return out, texts


def message_texts(messages: list[dict]) -> list[str]:
    """Every text of the messages (string contents and text parts), in order."""
    return _with_sentinels([m for m in messages if isinstance(m, dict)], "")[1]


def render_with_text_spans(messages: list[dict], template: str | None = None, *, add_generation_prompt: bool = True,
                           **kwargs) -> ChatPrompt | None:
    """The prompt render_chat_template gives, as a ChatPrompt with the spans of message text in it;
    None when the template changes message text on the way (trims it, say), so spans are unknown."""
    plain = render_chat_template(messages, template, add_generation_prompt=add_generation_prompt, **kwargs)
    nonce = secrets.token_hex(8)
    marked, texts = _with_sentinels([m for m in messages if isinstance(m, dict)], nonce)
    rendered = render_chat_template(marked, template, add_generation_prompt=add_generation_prompt, **kwargs)
    pieces, spans, at, length = [], [], 0, 0
    for m in re.finditer(f"\ue000{nonce}(\\d+)\ue001", rendered):
        text = texts[int(m.group(1))]
        pieces.append(rendered[at:m.start()])
        length += m.start() - at
        spans.append((length, length + len(text)))
        pieces.append(text)
        length += len(text)
        at = m.end()
    pieces.append(rendered[at:])
    if "".join(pieces) != plain:
        return None
    return ChatPrompt(plain, [s for s in spans if s[1] > s[0]])


# ---------------------------------------------------------------------------------------- placeholders

def expand_vision_placeholders(text: str, image_token_counts, video_token_counts, image_token: str = IMAGE_TOKEN,
                               video_token: str = VIDEO_TOKEN) -> str:
    """Replaces the i-th image (video) pad token by image_token_counts[i] copies, in order.

    N = prod(grid_thw) / merge_size**2 per item (SPEC 1.5). A count mismatch is an error, never a
    silently truncated prompt.
    """
    streams = {}
    for kind, token, counts in (("image", image_token, image_token_counts), ("video", video_token, video_token_counts)):
        counts = [int(n) for n in counts]
        if text.count(token) != len(counts):
            raise ValueError(f"the text holds {text.count(token)} {kind} placeholder(s) {token} but "
                             f"{len(counts)} {kind}(s) were given")
        streams[token] = iter(counts)
    # One left-to-right pass over both tokens, like transformers' single regex.
    pattern = "|".join(re.escape(t) for t in streams)
    return re.sub(pattern, lambda m: m.group() * next(streams[m.group()]), text)
