"""A tiny Qwen2-style tokenizer checkpoint, built offline in milliseconds (tests, tiny training runs).

Byte-level BPE with Qwen2's exact pipeline (NFC, Qwen2 split regex, ByteLevel without prefix space),
trained on the small fixed corpus below, plus Qwen's 22 added tokens (SPEC section 5) appended after
the merges in Qwen's order. The whole vocabulary stays under 512 ids so a tiny model covers it.

    ids = make_tiny_tokenizer(tmp_path)          # tokenizer.json, tokenizer_config.json, chat_template.jinja
    write_preprocessor_config(tmp_path, 3136, 50176)
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from qwenvl_jax.processing.image import CLIP_MEAN, CLIP_STD
from qwenvl_jax.processing.text import DEFAULT_CHAT_TEMPLATE

# transformers' Qwen2Tokenizer PRETOKENIZE_REGEX
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

# Qwen2.5-VL's added tokens in id order (151643...); the first 14 are special, the rest are not.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
PLAIN_ADDED_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
NAMED_IDS = {  # returned name -> token
    "pad_token_id": "<|endoftext|>", "im_start_token_id": "<|im_start|>", "eos_token_id": "<|im_end|>",
    "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
    "vision_token_id": "<|vision_pad|>", "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
}
TRAIN_VOCAB = 468  # an upper bound: this corpus stops at 256 bytes + 148 merges; + 22 added = 426 ids

CORPUS = """\
You are a helpful assistant. Describe this image in detail. What is in the picture?
The picture shows a small brown dog sitting on a green lawn in front of a white house.
A red car is parked on the street, and two children are playing with a ball near the trees.
The sky is blue with a few white clouds, and the sun is shining over the hills in the distance.
There is a cat on the window of the house, looking at the birds on the roof.
Please describe the video. The video shows a person walking along the beach at sunset.
The waves are rolling onto the sand, and a boat is sailing far away on the water.
How many people are there in the image? There are three people standing next to the table.
Read the text in the image and answer the question. The sign says: Welcome to the park!
Where is the red ball? The red ball is under the chair, on the left side of the room.
Find the bounding box of the dog. The dog is in the lower right part of the picture.
Is the light on or off? The light in the kitchen is on, but the light in the hall is off.
What color is the shirt of the man? The man is wearing a blue shirt and black shoes.
Count the apples on the plate: one, two, three, four, five. There are 5 apples in 2024.
The quick brown fox jumps over the lazy dog. The weather today is sunny and warm.
Thank you for the question. I think the answer is yes, because the image shows it clearly.
"""


def _train(corpus: str, train_vocab: int, split: str) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=train_vocab, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS])
    return tok


def make_tiny_tokenizer(out_dir, corpus: str = CORPUS, train_vocab: int = TRAIN_VOCAB,
                        split: str = QWEN2_SPLIT) -> dict[str, int]:
    """Writes tokenizer.json, tokenizer_config.json and chat_template.jinja; returns special ids by name.
    corpus / train_vocab: the BPE training text and its vocabulary bound; split: the pre-tokenizer
    regex (Qwen2's by default; the shapes demo passes one that keeps numbers of up to 3 digits whole)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train(corpus, train_vocab, split)
    tok.save(str(out / "tokenizer.json"))
    decoder = {
        str(tok.token_to_id(t)): dict(content=t, lstrip=False, normalized=False, rstrip=False,
                                      single_word=False, special=t in SPECIAL_TOKENS)
        for t in SPECIAL_TOKENS + PLAIN_ADDED_TOKENS
    }
    config = dict(
        add_bos_token=False, add_prefix_space=False, added_tokens_decoder=decoder,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]), bos_token=None,
        clean_up_tokenization_spaces=False, eos_token="<|im_end|>", errors="replace",
        model_max_length=32768, pad_token="<|endoftext|>", split_special_tokens=False,
        # transformers 5.x's Qwen2Tokenizer rebuilds Qwen2's split regex and ignores tokenizer.json's;
        # with another split only the generic fast class tokenizes as this file says.
        tokenizer_class="Qwen2Tokenizer" if split == QWEN2_SPLIT else "PreTrainedTokenizerFast", unk_token=None,
    )
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "chat_template.jinja").write_text(DEFAULT_CHAT_TEMPLATE)
    ids = {name: tok.token_to_id(t) for name, t in NAMED_IDS.items()}
    ids["vocab_size"] = tok.get_vocab_size(with_added_tokens=True)
    return ids


def write_preprocessor_config(out_dir, min_pixels: int, max_pixels: int, form: str = "old") -> Path:
    """preprocessor_config.json as the released checkpoints ("old": min/max_pixels) or 5.x saves it ("new": size)."""
    if form not in ("old", "new"):
        raise ValueError(f"form must be 'old' or 'new', got {form!r}")
    limits = (dict(min_pixels=min_pixels, max_pixels=max_pixels) if form == "old"
              else dict(size=dict(shortest_edge=min_pixels, longest_edge=max_pixels)))
    config = dict(**limits, patch_size=14, temporal_patch_size=2, merge_size=2,
                  image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_rescale=True,
                  rescale_factor=1 / 255, do_normalize=True, do_resize=True, resample=3,
                  do_convert_rgb=True, image_processor_type="Qwen2VLImageProcessor",
                  processor_class="Qwen2_5_VLProcessor")
    path = Path(out_dir) / "preprocessor_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    return path
