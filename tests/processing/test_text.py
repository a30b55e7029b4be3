"""Tokenizer, chat template and placeholder expansion against transformers' tokenizers and renderer."""

import json
import time

import numpy as np
import pytest
from PIL import Image
from tiny_tokenizer import NAMED_IDS, PLAIN_ADDED_TOKENS, SPECIAL_TOKENS, make_tiny_tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from qwenvl_jax.processing.text import (
    DEFAULT_CHAT_TEMPLATE,
    Tokenizer,
    expand_vision_placeholders,
    load_chat_template,
    render_chat_template,
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tok")
    make_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def hf_fast(tok_dir):
    return PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_qwen2(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)  # Qwen2Tokenizer: rebuilds Qwen2's pipeline in 5.x


TEXTS = [
    "Describe this image.",
    "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>What is in the picture?<|im_end|>\n",
    "  leading spaces,\ttabs\n\n\nand  double  spaces   ",
    "Numbers 12345 and 3.14159, don't we'll they're I'M",
    "Unicode: café naïve 中文字符 emoji 🐕🚗 e\u0301 (NFC)",
    "<tool_call>{\"name\": \"f\"}</tool_call><|box_start|>(1,2),(3,4)<|box_end|><|endoftext|>",
    "",
]


def test_tiny_tokenizer_is_small_fast_and_deterministic(tmp_path):
    start = time.perf_counter()
    ids = make_tiny_tokenizer(tmp_path / "a")
    assert time.perf_counter() - start < 1.0
    make_tiny_tokenizer(tmp_path / "b")
    assert (tmp_path / "a/tokenizer.json").read_text() == (tmp_path / "b/tokenizer.json").read_text()
    assert 300 <= ids["vocab_size"] < 512
    tok = Tokenizer.from_pretrained(tmp_path / "a")
    added = [tok.token_to_id(t) for t in SPECIAL_TOKENS + PLAIN_ADDED_TOKENS]
    assert added == list(range(added[0], added[0] + 22)) and added[-1] == ids["vocab_size"] - 1  # Qwen's order
    assert {k: ids[k] for k in NAMED_IDS} == {k: tok.token_to_id(t) for k, t in NAMED_IDS.items()}
    assert (tmp_path / "a/chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok_dir, hf_fast, hf_qwen2, text):
    tok = Tokenizer.from_pretrained(tok_dir)
    ids = tok.encode(text)
    assert ids == hf_fast.encode(text, add_special_tokens=False)
    assert ids == hf_qwen2.encode(text, add_special_tokens=False)  # our tiny tokenizer is Qwen2's pipeline
    assert tok.decode(ids) == hf_qwen2.decode(ids) == text.replace("e\u0301", "\u00e9")  # NFC
    assert tok.decode(ids, skip_special_tokens=True) == hf_qwen2.decode(ids, skip_special_tokens=True)
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]


def test_no_bos_and_special_tokens(tok_dir, hf_qwen2):
    tok = Tokenizer.from_pretrained(tok_dir)
    assert tok.encode("hi")[0] == hf_qwen2.encode("hi")[0] != tok.token_to_id("<|endoftext|>")
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tok.eos_token_id == hf_qwen2.eos_token_id and tok.pad_token_id == hf_qwen2.pad_token_id
    assert set(SPECIAL_TOKENS) <= set(tok.special_tokens) and "<tool_call>" not in tok.special_tokens
    with pytest.raises(KeyError, match="nope"):
        tok.token_to_id("<|nope|>")


# ------------------------------------------------------------------------------------ chat template

IMAGE = Image.new("RGB", (8, 8))
CONVERSATIONS = {
    "text_only": [{"role": "user", "content": "Hello there!"}],
    "image_text": [{"role": "user", "content": [{"type": "image", "image": IMAGE},
                                                 {"type": "text", "text": "Describe this image."}]}],
    "system_prompt": [{"role": "system", "content": "You are a terse assistant."},
                      {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                   {"type": "image", "image": "a.jpg"}]}],
    "multi_turn": [
        {"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A black square."}]},
        {"role": "user", "content": [{"type": "video", "video": ["f0.jpg", "f1.jpg"]}, {"image_url": "u"},
                                     {"type": "text", "text": "And these?"}]},
        {"role": "assistant", "content": "Frames.", "tool_calls": None},
    ],
}


@pytest.mark.parametrize("add_vision_id", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_matches_transformers(hf_qwen2, name, add_generation_prompt, add_vision_id):
    messages = CONVERSATIONS[name]
    ours = render_chat_template(messages, DEFAULT_CHAT_TEMPLATE, add_generation_prompt=add_generation_prompt,
                                add_vision_id=add_vision_id)
    ref = hf_qwen2.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       chat_template=DEFAULT_CHAT_TEMPLATE, add_vision_id=add_vision_id)
    assert ours == ref


def test_chat_template_spec_example():
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert render_chat_template(CONVERSATIONS["image_text"]) == expected


def test_chat_template_whitespace_control_like_transformers(hf_qwen2):
    # trim_blocks / lstrip_blocks and HF's tojson matter for templates written over many lines.
    template = ("{% for m in messages %}\n  {{ m['role'] }}: {{ m['content'] | tojson }}\n{% endfor %}\n"
                "{% if add_generation_prompt %}{{ eos_token }}{% endif %}")
    messages = [{"role": "user", "content": "é <b>"}]
    ours = render_chat_template(messages, template, eos_token="<|im_end|>")
    assert ours == hf_qwen2.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                chat_template=template)


def test_load_chat_template_priority(tmp_path):
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from tokenizer_config"}))
    assert load_chat_template(tmp_path) == "from tokenizer_config"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    assert load_chat_template(tmp_path) == "from json"
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert load_chat_template(tmp_path) == "from jinja"


# ------------------------------------------------------------------------------------ placeholders

def _hf_rule(text, image_counts, video_counts):
    # transformers' rule, written out: the i-th pad token of each kind becomes counts[i] copies.
    out, images, videos = [], iter(image_counts), iter(video_counts)
    for piece in text.split("<|"):
        if piece.startswith("image_pad|>"):
            piece = "image_pad|>" + "<|image_pad|>" * (next(images) - 1) + piece[len("image_pad|>"):]
        elif piece.startswith("video_pad|>"):
            piece = "video_pad|>" + "<|video_pad|>" * (next(videos) - 1) + piece[len("video_pad|>"):]
        out.append(piece)
    return "<|".join(out)


def test_expand_vision_placeholders_in_order():
    text = "a<|image_pad|>b<|video_pad|>c<|image_pad|><|video_pad|>"
    ours = expand_vision_placeholders(text, [2, 3], np.array([1, 4]))
    assert ours == _hf_rule(text, [2, 3], [1, 4])
    assert ours == ("a" + "<|image_pad|>" * 2 + "b<|video_pad|>c" + "<|image_pad|>" * 3 + "<|video_pad|>" * 4)
    assert expand_vision_placeholders("no media", [], []) == "no media"


def test_expand_vision_placeholders_count_mismatch():
    with pytest.raises(ValueError, match=r"2 image placeholder.*1 image"):
        expand_vision_placeholders("<|image_pad|><|image_pad|>", [4], [])
    with pytest.raises(ValueError, match=r"0 video placeholder.*1 video"):
        expand_vision_placeholders("<|image_pad|>", [4], [8])
