"""Logits parity with transformers' PyTorch Qwen2.5-VL on tiny random checkpoints (float32).

Criterion: max |diff| / std(reference) <= 1e-4 on logits; 1e-5 for the vision tower alone.
Video cases pass our training-rule position ids to HF explicitly (SPEC 6: transformers 5.x's own
get_rope_index resumes text at max(h, w) after a video, which the released weights never saw).
"""

import copy

import jax
import numpy as np
import pytest
import torch
from hf_reference import TOKENS, hf_logits, rel_err

from qwenvl_jax.model.vision_layout import stack_rows, vision_inputs
from qwenvl_jax.pretrained import load_pretrained
from qwenvl_jax.processing.rope_index import get_rope_index

IMG, VID, VS, VE = (TOKENS[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                        "vision_end_token_id"))
TOL = 1e-4


@pytest.fixture(params=["xla", "pallas"])
def models(tiny_checkpoint, shape, request):
    """Ours with the XLA attention and with the Pallas kernels (interpret mode on CPU)."""
    path, hf = tiny_checkpoint(shape)
    return load_pretrained(path, dtype="float32", attention_impl=request.param), hf


def _text(rng, n):
    return list(rng.integers(0, 400, n))


def _vision(tok, grid):
    return [VS] + [tok] * (int(np.prod(grid)) // 4) + [VE]


def _pixels(rng, grids):
    return rng.standard_normal((int(sum(np.prod(g) for g in grids)), 1176)).astype(np.float32)


def _mm_types(ids):
    return (ids == IMG).astype(np.int64) + 2 * (ids == VID).astype(np.int64)


def test_text_only(models):
    ours, hf = models
    ids = np.random.default_rng(0).integers(0, 500, (2, 17))
    assert rel_err(ours(input_ids=ids), hf_logits(hf, input_ids=ids)) <= TOL


@pytest.mark.parametrize("grids", [[(1, 10, 14)], [(1, 14, 10), (1, 4, 6)]], ids=["one_image", "two_images"])
def test_images(models, grids):
    ours, hf = models
    rng = np.random.default_rng(1)
    seq = _text(rng, 4)
    for g in grids:
        seq += _vision(IMG, g) + _text(rng, 3)
    ids = np.array([seq])
    batch = dict(input_ids=ids, pixel_values=_pixels(rng, grids), image_grid_thw=np.array(grids))
    ref = hf_logits(hf, **batch, mm_token_type_ids=_mm_types(ids))  # HF's own positions (agree for images)
    assert rel_err(ours(**batch), ref) <= TOL


def test_image_and_video(models):
    """A picture then a 4-slice video at 1.5 s per temporal patch, then text."""
    ours, hf = models
    rng = np.random.default_rng(2)
    img, vid = (1, 6, 8), (4, 8, 12)
    ids = np.array([_text(rng, 3) + _vision(IMG, img) + _text(rng, 2) + _vision(VID, vid) + _text(rng, 6)])
    batch = dict(input_ids=ids, pixel_values=_pixels(rng, [img]), image_grid_thw=np.array([img]),
                 pixel_values_videos=_pixels(rng, [vid]), video_grid_thw=np.array([vid]),
                 second_per_grid_ts=np.array([1.5], np.float32))
    pos, _ = get_rope_index(ids, image_token_id=IMG, video_token_id=VID, image_grid_thw=[img],
                            video_grid_thw=[vid], second_per_grid_ts=[1.5])
    # The temporal axis really is stretched: slices 0..3 at 0, 3, 6, 9 steps past the video start.
    video_t = pos[0, 0][ids[0] == VID].reshape(4, -1)[:, 0]
    assert list(np.diff(video_t)) == [3, 3, 3]
    ref = hf_logits(hf, **batch, position_ids=pos.astype(np.int64))
    assert rel_err(ours(**batch), ref) <= TOL


def test_left_padded_batch(models):
    """Row 0: text + image + text; row 1: shorter text, left-padded. HF computes positions itself."""
    ours, hf = models
    rng = np.random.default_rng(3)
    grid = (1, 8, 8)
    row0 = _text(rng, 5) + _vision(IMG, grid) + _text(rng, 4)
    row1 = _text(rng, 9)
    pad = len(row0) - len(row1)
    ids = np.array([row0, [0] * pad + row1])
    mask = np.ones_like(ids)
    mask[1, :pad] = 0
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(rng, [grid]),
                 image_grid_thw=np.array([grid]))
    ref = hf_logits(hf, **batch, mm_token_type_ids=_mm_types(ids))
    got = ours(**batch)
    assert rel_err(got, ref, mask) <= TOL
    # Padding changes nothing: row 1 alone gives the same logits.
    alone = ours(input_ids=np.array([row1]))
    np.testing.assert_allclose(np.asarray(got)[1, pad:], np.asarray(alone)[0], atol=1e-5)


def test_vision_tower_alone(models):
    """Two images and a video through the tower; output in raster order equals HF's pooler_output."""
    ours, hf = models
    rng = np.random.default_rng(4)
    grids = np.array([(1, 10, 14), (1, 4, 4), (2, 12, 8)])
    pv = _pixels(rng, grids)
    with torch.no_grad():
        ref = hf.model.visual(torch.tensor(pv), grid_thw=torch.tensor(grids)).pooler_output.numpy()
    vi = stack_rows([vision_inputs(pv, grids, ours.config.vision)])
    got = jax.jit(lambda v: ours.module.visual(v))(vi)[0]
    assert rel_err(got, ref) <= 1e-5


def test_bfloat16_error_no_worse_than_transformers(tiny_checkpoint):
    """bf16 has no exact reference: our bf16 logits must be as close to the f32 reference as
    transformers' own bf16 run is (within 1.5x of its error)."""
    path, hf = tiny_checkpoint("untied_w112")
    rng = np.random.default_rng(5)
    grid = (1, 10, 14)
    ids = np.array([_text(rng, 3) + _vision(IMG, grid) + _text(rng, 4)])
    batch = dict(input_ids=ids, pixel_values=_pixels(rng, [grid]), image_grid_thw=np.array([grid]))
    ref32 = hf_logits(hf, **batch, mm_token_type_ids=_mm_types(ids))
    ref16 = hf_logits(copy.deepcopy(hf).to(torch.bfloat16), **batch, mm_token_type_ids=_mm_types(ids))
    ours16 = np.asarray(load_pretrained(path, dtype="bfloat16")(**batch), np.float32)
    assert rel_err(ours16, ref32) <= 1.5 * rel_err(ref16, ref32)


def test_pallas_impl_runs_the_kernels(tiny_checkpoint):
    """attention_impl='pallas' really puts Pallas calls in the forward (vision + decoder); 'xla' none."""
    path, _ = tiny_checkpoint("untied_w112")
    rng = np.random.default_rng(6)
    grid = (1, 8, 8)
    ids = np.array([_text(rng, 3) + _vision(IMG, grid) + _text(rng, 4)])
    counts = {}
    for impl in ("xla", "pallas"):
        model = load_pretrained(path, dtype="float32", attention_impl=impl)
        inputs = model.prepare(input_ids=ids, pixel_values=_pixels(rng, [grid]), image_grid_thw=np.array([grid]))
        jaxpr = jax.make_jaxpr(lambda p, i: model.module(i.input_ids, i.position_ids, i.segment_ids, i.vision,
                                                         i.vision_token_index))(model.params, inputs)
        counts[impl] = str(jaxpr).count("pallas_call")
    assert counts["xla"] == 0 and counts["pallas"] >= 3  # full + window ViT kernels, splash in the decoder
