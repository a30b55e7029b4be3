"""Request parsing and streamed text against what a client must see: every delta concatenated is
the answer cut before its first stop string, whatever the token boundaries."""

import itertools
import random

import pytest

from qwenvl_jax.generation.sampling import SamplingParams
from qwenvl_jax.serve.protocol import APIError, TextStream, parse_chat_request

# A byte-level fake tokenizer: token i is byte i; ids decode as UTF-8 with replacement, as a
# byte-level BPE decodes a partial character.
EOS = 999


def _decode(ids):
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _stream(text: str, stop: list[str], cuts) -> tuple[str, bool]:
    stream = TextStream(_decode, stop, skip_ids={EOS})
    data = text.encode()
    out = []
    for i, b in enumerate(data):
        out.append(stream.add(b))
        if stream.stopped:
            break
        if i in cuts:
            out.append(stream.add(EOS))  # special ids never show
    out.append(stream.finish())
    return "".join(out), stream.stopped


@pytest.mark.parametrize("text", ["plain words here", "naïve café — ünïcode ✓ 日本語", "abcabcab"])
def test_deltas_add_up_to_the_answer_before_the_first_stop(text):
    rng = random.Random(0)
    stops = [[], ["c"], ["ab", "zz"], ["é —"], ["語"], ["never"], ["e h", "ords"]]
    for stop in stops:
        expected = text
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            expected = text[:min(hits)]
        cuts = set(rng.sample(range(len(text.encode())), 3))
        got, stopped = _stream(text, stop, cuts)
        assert got == expected and stopped == bool(hits), (text, stop)


def test_no_delta_holds_a_partial_character_or_a_stop_prefix():
    stream = TextStream(_decode, ["END"], skip_ids=())
    seen = []
    for b in "x✓yEN".encode():
        seen.append(stream.add(b))
    assert all("\ufffd" not in d for d in seen) and "".join(seen) == "x✓y"  # "EN" may begin "END"
    assert stream.finish() == "EN"


def _body(**kw):
    return {"model": "m", "messages": [{"role": "user", "content": "Hi"}], **kw}


DEFAULTS = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)


def test_defaults_come_from_the_checkpoint_and_request_values_override_them():
    req = parse_chat_request(_body(), DEFAULTS, "m")
    assert req.sampling == DEFAULTS and req.max_tokens is None and req.stop == [] and not req.stream
    req = parse_chat_request(_body(temperature=0, top_k=-1, top_p=1, max_completion_tokens=5, max_tokens=9, seed=-1,
                                   stop="x", stream=True, stream_options={"include_usage": True}), DEFAULTS, "m")
    assert req.sampling == SamplingParams(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.05)
    assert (req.max_tokens, req.seed, req.stop, req.stream, req.include_usage) == (5, 2**32 - 1, ["x"], True, True)


@pytest.mark.parametrize("key,values", [
    ("temperature", [-0.1, 2.5, "1", None.__class__, float("nan")]),
    ("top_p", [0, 1.5, True]), ("top_k", [-2, 2.5]), ("repetition_penalty", [0, -1]),
    ("max_tokens", [0, 1.5, "10"]), ("n", [2, 0]), ("seed", [1.5, "7"]), ("stop", [["a"] * 5, [""], 3]),
    ("stream", ["yes"]), ("presence_penalty", [0.5]), ("logprobs", [True]),
])
def test_each_bad_value_names_its_field(key, values):
    for value in values:
        if value is None.__class__:
            value = {"a": 1}
        with pytest.raises(APIError) as info:
            parse_chat_request(_body(**{key: value}), DEFAULTS, "m")
        assert info.value.status == 400 and info.value.param == key, (key, value)


@pytest.mark.parametrize("messages,param", [
    ([], "messages"), ("Hi", "messages"), ([{"role": "tool", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0].image_url"),
    ([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
      {"role": "user", "content": "Hi"}], "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}], "messages[1].role"),
])
def test_bad_messages_name_the_part(messages, param):
    with pytest.raises(APIError) as info:
        parse_chat_request({"messages": messages}, DEFAULTS, "m")
    assert info.value.param == param


def test_media_parts_keep_their_order_and_the_wrong_model_is_a_404():
    parts = [{"type": "video_url", "video_url": {"url": "data:v"}}, {"type": "text", "text": "and"},
             {"type": "image_url", "image_url": "data:i"}]
    req = parse_chat_request({"messages": [{"role": "user", "content": parts}]}, DEFAULTS, "m")
    assert [(m.kind, m.url) for m in req.media] == [("video", "data:v"), ("image", "data:i")]
    assert [p["type"] for p in req.messages[0]["content"]] == ["video", "text", "image"]
    with pytest.raises(APIError) as info:
        parse_chat_request(_body(model="other"), DEFAULTS, "m")
    assert info.value.status == 404 and info.value.code == "model_not_found"


def test_stop_search_is_not_fooled_by_a_stop_string_split_over_tokens():
    for a, b in itertools.combinations(range(1, 7), 2):
        text = "hello world"
        stream = TextStream(_decode, ["o w"], skip_ids=())
        data = text.encode()
        out = [stream.add(x) for x in data[:a]] + [stream.add(x) for x in data[a:]] + [stream.finish()]
        assert "".join(out) == "hell" and stream.stopped
