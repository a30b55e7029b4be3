"""Grain pipeline: conversations -> encoded samples -> packed rows -> model batches.

    source (JSONL / ArrayRecord) -> shuffle (seeded) -> this process's shard -> encode (chat
    template, tokens, loss labels, uint8 patches, MRoPE positions) -> grain's first-fit / best-fit
    packer (text tokens, patches, ViT slots and items each have a budget) -> row layout (segment
    ids, per-row vision layout, feature index of every placeholder token) -> batch

Every sample keeps its own MRoPE positions (from 0) and its own segment id, shared by all its
features, so attention never crosses samples in either tower and each image's windows and
frames stay intact. A bad sample (missing/corrupt media, malformed line, too long) becomes an
empty "skip" sample that carries its reason code through packing, so skip counts are exact
whatever the worker count, and survive checkpoint/resume with the iterator state.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections import Counter
from pathlib import Path

import grain
import numpy as np

from qwenvl_jax.config import ConfigError, Qwen25VLConfig
from qwenvl_jax.data.formats import BAD_FORMAT, REASONS, TOO_LONG, DataError, assistant_labels
from qwenvl_jax.data.sources import ArrayRecordSource, JsonlSource, open_media, resolve_data_root, to_conversation
from qwenvl_jax.model.vision_layout import VisionInputs, empty_row, pad_row, vision_inputs, window_index
from qwenvl_jax.processing.image import CLIP_MEAN, CLIP_STD, MAX_BUDGET_PIXELS, check_pixel_budget
from qwenvl_jax.processing.rope_index import get_rope_index

IGNORE = -100
TEXT_FEATURES = ("input_ids", "labels", "positions", "vision_token_index")
PACKERS = ("first_fit", "best_fit")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    seq_len: int = 8192  # text tokens per row
    patch_budget: int | None = None  # ViT patches per row (default 2 x seq_len)
    slot_budget: int | None = None  # ViT slots per row: patches + window padding (default 1.5 x patches)
    max_items: int = 64  # images + videos per row
    # Static bound on one image's (or video frame group's) ViT slots: the full-attention blocks
    # cost O(row slots x this). None: the slot budget (always safe, slowest). Longer items skip.
    max_item_slots: int | None = None
    batch_size: int = 1  # rows per batch on this process
    min_pixels: int | None = None  # per image (default: the checkpoint's preprocessor config)
    max_pixels: int | None = None
    video_fps: float = 2.0
    packer: str = "first_fit"
    packing_bins: int = 64  # rows open at once in the packer (64: >= 97% token efficiency, bench/packing.py)
    shuffle: bool = True
    seed: int = 0
    epochs: int | None = 1  # None: repeat forever (training)
    on_bad_sample: str = "skip"  # or "raise"
    workers: int = 0  # grain worker processes

    def item_slots(self, window_patches: int) -> int:
        _, slots = self.budgets(window_patches)
        return min(slots, -(-self.max_item_slots // window_patches) * window_patches) if self.max_item_slots else slots

    def budgets(self, window_patches: int) -> tuple[int, int]:
        patches = self.patch_budget or 2 * self.seq_len
        patches -= patches % 4
        slots = self.slot_budget or patches + patches // 2
        return patches, -(-slots // window_patches) * window_patches

    def validate(self) -> None:
        for name in ("seq_len", "batch_size", "max_items", "packing_bins"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.packer not in PACKERS:
            raise ConfigError(f"data.packer must be one of {list(PACKERS)}, got {self.packer!r}")
        if self.on_bad_sample not in ("skip", "raise"):
            raise ConfigError(f"data.on_bad_sample must be 'skip' or 'raise', got {self.on_bad_sample!r}")
        if self.workers < 0:
            raise ConfigError(f"data.workers must be >= 0, got {self.workers}")
        if self.min_pixels is not None or self.max_pixels is not None:
            try:
                check_pixel_budget(self.min_pixels or 1, self.max_pixels or MAX_BUDGET_PIXELS, "data.")
            except ValueError as e:
                raise ConfigError(str(e)) from None


def open_source(path: str | Path):
    """A .jsonl/.json file -> JsonlSource; anything else -> ArrayRecordSource."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    if path.suffix in (".jsonl", ".json"):
        return JsonlSource(path)
    return ArrayRecordSource([str(path)])


class SampleEncoder:
    """raw record -> dict of per-sample numpy features (or a skip sample). Picklable: it runs in
    grain worker processes.

    data_root: the directory relative image/video paths resolve against. None: make_dataset uses
    the JSONL file's own directory (`resolve_data_root`); called directly on a record, the current
    directory.
    """

    def __init__(self, processor, config: Qwen25VLConfig, data: DataConfig, data_root=None):
        self.processor, self.config, self.data = processor, config, data
        self.data_root = None if data_root is None else os.path.abspath(os.fspath(data_root))
        self.patch_budget, self.slot_budget = data.budgets(config.vision.window_patches)
        self.item_slots = data.item_slots(config.vision.window_patches)
        for name in ("image_token_id", "video_token_id"):
            if getattr(processor, name) != getattr(config, name):
                raise ConfigError(f"{name}: the tokenizer has {getattr(processor, name)}, the model config "
                                  f"{getattr(config, name)}; they must come from the same checkpoint")
        tok = processor.tokenizer
        self.im_start, self.im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
        self.assistant_prefix = tok.encode("assistant\n")
        # uint8 patches normalized on device need the CLIP constants the model uses.
        self.raw_pixels = (tuple(processor.image_mean), tuple(processor.image_std)) == (CLIP_MEAN, CLIP_STD)

    def for_source(self, source) -> SampleEncoder:
        """This encoder, or a copy whose data_root is the JSONL source's directory when none was given."""
        if self.data_root is not None or not isinstance(source, JsonlSource):
            return self
        encoder = copy.copy(self)
        encoder.data_root = resolve_data_root(source.path)
        return encoder

    def __call__(self, raw) -> dict:
        try:
            return self.encode(raw)
        except DataError as e:
            if self.data.on_bad_sample == "raise":
                raise
            return skip_sample(e.reason, self.config.vision.patch_dim)
        except (ValueError, OSError, TypeError, KeyError, RecursionError) as e:  # counted, never a crash
            if self.data.on_bad_sample == "raise":
                raise DataError(BAD_FORMAT, f"cannot encode record: {e}") from e
            return skip_sample(BAD_FORMAT, self.config.vision.patch_dim)

    def encode(self, raw) -> dict:
        cfg, v = self.config, self.config.vision
        conv = to_conversation(raw, self.data_root)
        # data.min/max_pixels are each image's and each frame's budget (as infer's --min/--max-pixels);
        # frames are sized once, by read_video, and pass the processor's video limits unchanged
        media = open_media(conv, fps=self.data.video_fps, min_pixels=self.data.min_pixels,
                           max_pixels=self.data.max_pixels)
        prompt = self.processor.apply_chat_template(conv.messages, add_generation_prompt=False)
        batch = self.processor(text=prompt, images=media.images or None, videos=media.videos or None,
                               fps=media.fps or self.data.video_fps, min_pixels=self.data.min_pixels,
                               max_pixels=self.data.max_pixels, raw_pixels=self.raw_pixels,
                               image_limits=media.image_limits or None,
                               video_min_pixels=self.processor.video_min_pixels,
                               video_max_pixels=self.processor.video_max_pixels)
        ids = batch["input_ids"][0]
        n = len(ids)
        grids = [g for g in (batch.get("image_grid_thw"), batch.get("video_grid_thw")) if g is not None]
        grids = np.concatenate(grids).astype(np.int32) if grids else np.zeros((0, 3), np.int32)
        pixels = [p for p in (batch.get("pixel_values"), batch.get("pixel_values_videos")) if p is not None]
        patches = np.concatenate(pixels) if pixels else np.zeros((0, v.patch_dim), np.uint8)
        slots = item_slots = 0
        if len(grids):
            _, unit_window = window_index(grids, v)
            slots = (int(unit_window.max()) + 1) * v.window_patches
            vw = v.window_size // (v.patch_size * v.spatial_merge_size)
            m = v.spatial_merge_size
            item_slots = max(-(-(h // m) // vw) * -(-(w // m) // vw) for _, h, w in grids.tolist()) * v.window_patches
        if n > self.data.seq_len or len(patches) > self.patch_budget or slots > self.slot_budget \
                or len(grids) > self.data.max_items or item_slots > self.item_slots:
            raise DataError(TOO_LONG, f"sample needs {n} tokens, {len(patches)} patches, {slots} ViT slots "
                                      f"({item_slots} for its largest item), {len(grids)} items; budgets "
                                      f"{self.data.seq_len}, {self.patch_budget}, {self.slot_budget} "
                                      f"({self.item_slots}), {self.data.max_items}")
        positions, _ = get_rope_index(
            ids[None], image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
            image_grid_thw=batch.get("image_grid_thw"), video_grid_thw=batch.get("video_grid_thw"),
            second_per_grid_ts=batch.get("second_per_grid_ts"), spatial_merge_size=v.spatial_merge_size,
            tokens_per_second=v.tokens_per_second)
        image_units = 0 if batch.get("image_grid_thw") is None else \
            int(np.prod(batch["image_grid_thw"], axis=1).sum()) // v.merge_unit
        is_img, is_vid = ids == cfg.image_token_id, ids == cfg.video_token_id
        index = np.where(is_img, np.cumsum(is_img) - 1, np.where(is_vid, np.cumsum(is_vid) - 1 + image_units, -1))
        labels = assistant_labels(ids, self.im_start, self.im_end, self.assistant_prefix, IGNORE,
                                  mask_ids={cfg.image_token_id, cfg.video_token_id})
        return {"input_ids": ids.astype(np.int32), "labels": labels.astype(np.int32),
                "positions": positions[:, 0].T.astype(np.int32), "vision_token_index": index.astype(np.int32),
                "patches": patches, "grids": grids, "slots": np.zeros(slots, np.int8),
                "skips": np.zeros(0, np.int32)}


def skip_sample(reason: str, patch_dim: int) -> dict:
    """An empty sample whose only content is its skip reason (code = index in REASONS, + 1)."""
    return {"input_ids": np.zeros(0, np.int32), "labels": np.zeros(0, np.int32),
            "positions": np.zeros((0, 3), np.int32), "vision_token_index": np.zeros(0, np.int32),
            "patches": np.zeros((0, patch_dim), np.uint8), "grids": np.zeros((0, 3), np.int32),
            "slots": np.zeros(0, np.int8), "skips": np.array([REASONS.index(reason) + 1], np.int32)}


class RowLayout:
    """A packed row (grain's output) -> the model's row: segment ids, [3, L] positions, labels,
    the feature index of every placeholder token, and the row's vision layout at fixed budgets."""

    def __init__(self, config: Qwen25VLConfig, data: DataConfig):
        self.vision = config.vision
        self.patches, self.slots = data.budgets(config.vision.window_patches)

    def __call__(self, row: dict) -> dict:
        v, mu = self.vision, self.vision.merge_unit
        seg = row["input_ids_segment_ids"].astype(np.int32)
        patch_seg = row["patches_segment_ids"]
        # Feature index: sample-local index + the merged units of the earlier samples in the row.
        units_before = np.concatenate([[0], np.cumsum(np.bincount(patch_seg[patch_seg > 0],
                                                                  minlength=seg.max() + 1) // mu)])
        local = row["vision_token_index"]
        index = np.where((local >= 0) & (seg > 0), local + units_before[seg], -1)
        grids = row["grids"][row["grids_segment_ids"] > 0]
        patches = row["patches"][patch_seg > 0]
        layout = vision_inputs(patches, grids, v) if len(grids) else empty_row(v)
        vis = pad_vision_row(layout, self.patches, self.slots, mu)
        skips = row["skips"][row["skips_segment_ids"] > 0]
        return {"input_ids": np.where(seg > 0, row["input_ids"], 0).astype(np.int32), "segment_ids": seg,
                "position_ids": row["positions"].T.astype(np.int32),
                "labels": np.where(seg > 0, row["labels"], IGNORE).astype(np.int32),
                "vision_token_index": index.astype(np.int32), **vis,
                "num_samples": np.int32(len(set(seg[seg > 0].tolist()))),
                "skip_counts": np.bincount(skips, minlength=len(REASONS) + 1)[1:].astype(np.int32)}


def pad_vision_row(vi: VisionInputs, patches: int, slots: int, mu: int) -> dict:
    """One row's layout at the budgets, pixels kept uint8 (normalized on device)."""
    row = pad_row(vi, patches, slots, mu)
    row["pixel_values"] = row["pixel_values"].astype(np.uint8, copy=False)
    return row


VISION_KEYS = ("pixel_values", "unit_index", "reverse_index", "rotary_pos", "window_segment_ids", "full_segment_ids")


def batch_vision(batch: dict, config: Qwen25VLConfig, data: DataConfig) -> VisionInputs:
    """The VisionInputs (one row per batch row) of a batch from `make_dataset`."""
    return VisionInputs(**{k: batch[k] for k in VISION_KEYS}, window_len=config.vision.window_patches,
                        max_full_len=data.item_slots(config.vision.window_patches))


def record_order(source, data: DataConfig, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """The records this process reads, in order: seeded shuffle of the whole source, then every
    process_count-th record, repeated for data.epochs (None: forever)."""
    ds = grain.MapDataset.source(source)
    if data.shuffle:
        ds = ds.shuffle(seed=data.seed)
    ds = ds[process_index::process_count]
    return ds.repeat(data.epochs) if data.epochs != 1 else ds


def make_dataset(source, encoder: SampleEncoder, config: Qwen25VLConfig, data: DataConfig, *,
                 process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """The whole pipeline as a grain IterDataset of batches (dicts of numpy arrays, leading dim
    data.batch_size). Each process reads every process_count-th record of the shuffled order.
    Relative media paths resolve against encoder.data_root, or when it is None the JSONL file's
    directory."""
    data.validate()
    patches, slots = data.budgets(config.vision.window_patches)
    encoder = encoder.for_source(source)
    ds = record_order(source, data, process_index, process_count).map(encoder).to_iter_dataset()
    length = {"input_ids": data.seq_len, "labels": data.seq_len, "positions": data.seq_len,
              "vision_token_index": data.seq_len, "patches": patches, "grids": data.max_items,
              "slots": slots, "skips": data.seq_len}
    packer = grain.experimental.FirstFitPackIterDataset if data.packer == "first_fit" else \
        grain.experimental.BestFitPackIterDataset
    ds = packer(ds, length_struct=length, num_packing_bins=data.packing_bins, seed=data.seed,
                meta_features=("labels", "positions", "vision_token_index"))
    ds = ds.map(RowLayout(config, data)).batch(data.batch_size, drop_remainder=False)
    if data.workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's multiprocessing reads absl flags
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.workers))
    return ds


def skip_report(batches) -> Counter:
    """Skip counts by reason over batches (each batch carries its rows' counts)."""
    total = Counter()
    for b in batches:
        for reason, n in zip(REASONS, np.asarray(b["skip_counts"]).sum(0).tolist()):
            if n:
                total[reason] += n
    return total
