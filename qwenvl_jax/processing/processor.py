"""Processor: prompts + images + videos -> the numpy batch transformers' Qwen2.5-VL processor returns.

    processor = Processor.from_pretrained("Qwen2.5-VL-7B-Instruct")
    prompt = processor.apply_chat_template(messages)
    batch = processor(text=prompt, images=["cat.jpg"])   # input_ids, attention_mask, mm_token_type_ids,
                                                         # pixel_values, image_grid_thw

Same key names, dtypes and orderings as transformers 5.x: images (videos) are consumed across the
batch in row-major order; each pad token becomes prod(grid_thw)/merge_size**2 copies; rows are
padded with the pad token (left by default, for generation).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from qwenvl_jax.processing.image import CLIP_MEAN, CLIP_STD, check_pixel_budget, preprocess_image
from qwenvl_jax.processing.text import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    ChatPrompt,
    Tokenizer,
    expand_vision_placeholders,
    load_chat_template,
    message_texts,
    render_chat_template,
    render_with_text_spans,
)
from qwenvl_jax.processing.video import preprocess_video

# transformers' class defaults, used only when preprocessor_config.json names no limits (SPEC 1.1)
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _pixel_limits(config: dict) -> tuple[int, int]:
    # Released checkpoints write min_pixels/max_pixels; transformers 5.x writes size={shortest_edge,
    # longest_edge} (4.x: size={min_pixels, max_pixels}). Top-level keys win, as in transformers.
    size = config.get("size") or {}
    lo = config.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or DEFAULT_MIN_PIXELS
    hi = config.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or DEFAULT_MAX_PIXELS
    return int(lo), int(hi)


def _image_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        return [images]
    flat = []  # a list, or a list of per-row lists
    for item in images:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    return flat


def _video_list(videos) -> list:
    # A video is a list of frames or a [F, H, W, 3] array; a bare list of frames is one video.
    if videos is None:
        return []
    if isinstance(videos, np.ndarray) and videos.ndim == 4:
        return [videos]
    videos = list(videos)
    if videos and (isinstance(videos[0], Image.Image) or (isinstance(videos[0], np.ndarray) and videos[0].ndim == 3)):
        return [videos]
    return videos


def _check_count(kind: str, token: str, found: int, given: int):
    if found != given:
        raise ValueError(f"the text holds {found} {kind} placeholder(s) {token} but {given} {kind}(s) were given")


class Processor:
    """Tokenizer + chat template + image/video preprocessing of one checkpoint."""

    def __init__(self, tokenizer: Tokenizer, *, chat_template: str | None = None,
                 min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
                 video_min_pixels: int | None = None, video_max_pixels: int | None = None,
                 patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2,
                 image_mean=CLIP_MEAN, image_std=CLIP_STD):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        # transformers' video processor reads preprocessor_config.json when no video config exists (SPEC 2.2)
        self.video_min_pixels = min_pixels if video_min_pixels is None else video_min_pixels
        self.video_max_pixels = max_pixels if video_max_pixels is None else video_max_pixels
        self.patch_size, self.merge_size, self.temporal_patch_size = patch_size, merge_size, temporal_patch_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

        self.image_token, self.video_token = IMAGE_TOKEN, VIDEO_TOKEN
        tid = tokenizer.token_to_id
        self.image_token_id, self.video_token_id = tid(IMAGE_TOKEN), tid(VIDEO_TOKEN)
        self.vision_start_token_id, self.vision_end_token_id = tid("<|vision_start|>"), tid("<|vision_end|>")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token else tid("<|endoftext|>")
        self.eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token else tid("<|im_end|>")
        # generation stops on either, as in the checkpoints' generation_config.json (SPEC 5)
        self.eos_token_ids = list(dict.fromkeys([self.eos_token_id, tid("<|im_end|>"), tid("<|endoftext|>")]))

    @classmethod
    def from_pretrained(cls, path) -> Processor:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {path} does not exist")
        pre_file = path / "preprocessor_config.json"
        if not pre_file.is_file():
            raise FileNotFoundError(f"no image preprocessing config: {pre_file} does not exist")
        pre = _read_json(pre_file)
        min_pixels, max_pixels = _pixel_limits(pre)
        check_pixel_budget(min_pixels, max_pixels, f"{pre_file}: ")
        video_file = path / "video_preprocessor_config.json"
        video_min, video_max = _pixel_limits(_read_json(video_file)) if video_file.is_file() else (None, None)
        return cls(Tokenizer.from_pretrained(path), chat_template=load_chat_template(path),
                   min_pixels=min_pixels, max_pixels=max_pixels, video_min_pixels=video_min,
                   video_max_pixels=video_max, patch_size=int(pre.get("patch_size", 14)),
                   merge_size=int(pre.get("merge_size", 2)),
                   temporal_patch_size=int(pre.get("temporal_patch_size", 2)),
                   image_mean=pre.get("image_mean", CLIP_MEAN), image_std=pre.get("image_std", CLIP_STD))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """HF messages -> prompt text with one <|image_pad|> / <|video_pad|> per image / video.

        Message text (any role) that spells a special token ("<|im_start|>", "<|image_pad|>", ...)
        comes back as a ChatPrompt, whose message text this processor tokenizes as plain text: a
        user cannot forge a turn or a vision placeholder, while the template's own markers stay
        control tokens. (transformers tokenizes the whole rendered string, specials included.)"""
        kwargs = {**self.tokenizer.special_tokens_map, **kwargs}
        prompt = render_chat_template(messages, self.chat_template, add_generation_prompt=add_generation_prompt,
                                      **kwargs)
        forged = sorted({t for text in message_texts(messages) for t in self.tokenizer.special_in(text)})
        if not forged:
            return prompt
        marked = render_with_text_spans(messages, self.chat_template, add_generation_prompt=add_generation_prompt,
                                        **kwargs)
        if marked is None:
            raise ValueError(f"message text holds control token strings {forged}, and this chat template "
                             "changes message text, so it cannot be kept apart as plain text: remove them")
        return marked

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _vision(self, items, fn, limits, raw=False):
        outs = [fn(x, min_pixels=lo, max_pixels=hi, patch_size=self.patch_size,
                   merge_size=self.merge_size, temporal_patch_size=self.temporal_patch_size,
                   image_mean=self.image_mean, image_std=self.image_std, raw=raw) for x, (lo, hi) in zip(items, limits)]
        pixel_values = np.concatenate([pv for pv, _ in outs])  # [P, C*T*p*p]
        grid_thw = np.stack([g for _, g in outs])  # [n, 3]
        return pixel_values, grid_thw, (grid_thw.prod(1) // self.merge_size**2).tolist()

    def __call__(self, text: str | list[str], images=None, videos=None, *, fps: float | list[float] = 2.0,
                 padding_side: str = "left", min_pixels: int | None = None,
                 max_pixels: int | None = None, raw_pixels: bool = False, video_min_pixels: int | None = None,
                 video_max_pixels: int | None = None, image_limits=None) -> dict[str, np.ndarray]:
        """Prompts (with one pad token per image/video) + media -> dict of numpy arrays, HF key names.

        images: one image or a list (path / PIL / uint8 [H, W, 3]), in row-major order over the batch.
        videos: one video or a list; a video is a list of frames or uint8 [F, H, W, 3].
        fps: the frame rate of the given frames, one value or one per video; it only sets
        second_per_grid_ts = temporal_patch_size / fps.
        min_pixels / max_pixels override the checkpoint's limits for this call (images, and videos
        unless video_min_pixels / video_max_pixels are given: frames read by read_video with a budget
        of their own, as qwen-vl-utils does, then keep the checkpoint's video limits).
        image_limits: one entry per image, None or (min_pixels, max_pixels) with None for a side it
        leaves to the call (an image's own budget, as a message part gives it to qwen-vl-utils).
        raw_pixels: uint8 patches, not normalized (normalized on device by the model).
        """
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("text must be a string or a non-empty list of strings")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        images, videos = _image_list(images), _video_list(videos)
        # [(piece, is_message_text)] per row: message text of a ChatPrompt is plain text (no
        # control tokens, no vision placeholders); everything else is template markup.
        rows_segments = [t.segments() if isinstance(t, ChatPrompt) else [(t, False)] for t in texts]
        n_img = [sum(p.count(self.image_token) for p, plain in row if not plain) for row in rows_segments]
        n_vid = [sum(p.count(self.video_token) for p, plain in row if not plain) for row in rows_segments]
        _check_count("image", self.image_token, sum(n_img), len(images))
        _check_count("video", self.video_token, sum(n_vid), len(videos))

        out, img_tokens, vid_tokens = {}, [], []
        if images:  # budgets checked before any image is resized (a huge one would fill memory)
            own = [None] * len(images) if image_limits is None else list(image_limits)
            if len(own) != len(images):
                raise ValueError(f"image_limits has {len(own)} entries for {len(images)} images")
            base = (min_pixels or self.min_pixels, max_pixels or self.max_pixels)
            limits = [base if o is None else (o[0] or base[0], o[1] or base[1]) for o in own]
            for i, (lo, hi) in enumerate(limits):
                check_pixel_budget(lo, hi, "image " if image_limits is None else f"image {i}: ")
            pv, grid, img_tokens = self._vision(images, preprocess_image, limits, raw_pixels)
            out.update(pixel_values=pv, image_grid_thw=grid)
        if videos:
            lo = video_min_pixels or min_pixels or self.video_min_pixels
            hi = video_max_pixels or max_pixels or self.video_max_pixels
            check_pixel_budget(lo, hi, "video ")
            pv, grid, vid_tokens = self._vision(videos, preprocess_video, [(lo, hi)] * len(videos), raw_pixels)
            fps = [fps] * len(videos) if np.isscalar(fps) else list(fps)
            if len(fps) != len(videos):
                raise ValueError(f"fps has {len(fps)} values for {len(videos)} videos")
            second_per_grid_ts = np.array([self.temporal_patch_size / f for f in fps], np.float32)
            out.update(pixel_values_videos=pv, video_grid_thw=grid, second_per_grid_ts=second_per_grid_ts)

        rows, i, j = [], 0, 0
        for row in rows_segments:  # row-major: each placeholder takes the next image / video
            ids = []
            for piece, plain in row:
                if plain:
                    ids += self.tokenizer.encode_plain(piece)
                    continue
                a, b = piece.count(self.image_token), piece.count(self.video_token)
                expanded = expand_vision_placeholders(piece, img_tokens[i:i + a], vid_tokens[j:j + b],
                                                      self.image_token, self.video_token)
                ids += self.tokenizer.encode(expanded)
                i, j = i + a, j + b
            rows.append(ids)

        length = max(len(r) for r in rows)
        input_ids = np.full((len(rows), length), self.pad_token_id, np.int64)  # [B, L]
        attention_mask = np.zeros((len(rows), length), np.int64)  # [B, L]
        for r, ids in enumerate(rows):
            at = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
            input_ids[r, at], attention_mask[r, at] = ids, 1
        real = attention_mask == 1
        mm_token_type_ids = np.where(real & (input_ids == self.image_token_id), 1,  # [B, L]: 0 text, 1 image, 2 video
                                     np.where(real & (input_ids == self.video_token_id), 2, 0)).astype(np.int64)
        return dict(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids, **out)
