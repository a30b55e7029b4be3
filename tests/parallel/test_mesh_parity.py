"""The same checkpoint on a (data, fsdp, tensor) mesh of 8 CPU devices gives the single-device
logits (within 1e-5) and the same greedy tokens, and its parameters really are split."""

import numpy as np
import pytest
from hf_reference import TOKENS

from qwenvl_jax.generation.decode import generate
from qwenvl_jax.pretrained import load_pretrained

IMG, VS, VE = TOKENS["image_token_id"], TOKENS["vision_start_token_id"], TOKENS["vision_end_token_id"]
MESHES = ["data=8,fsdp=1,tensor=1", "data=1,fsdp=8,tensor=1", "data=2,fsdp=2,tensor=2", "data=1,fsdp=2,tensor=4"]


def _batch(rows: int):
    """Left-padded rows, the first with an image: exercises the vision tower, padding and MRoPE."""
    rng = np.random.default_rng(0)
    grid = (1, 8, 12)
    lens = [5 + 3 * i for i in range(rows)]
    seqs = [list(rng.integers(0, 400, n)) for n in lens]
    seqs[0] = seqs[0][:2] + [VS] + [IMG] * (int(np.prod(grid)) // 4) + [VE] + seqs[0][2:]
    width = max(map(len, seqs))
    ids = np.array([[0] * (width - len(s)) + s for s in seqs])
    mask = np.array([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    pixels = rng.standard_normal((int(np.prod(grid)), 1176)).astype(np.float32)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=np.array([grid]))


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    path, _ = tiny_checkpoint("untied_w112")
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Single-device logits and greedy tokens for batches of 8 and 2 rows."""
    model = load_pretrained(checkpoint, dtype="float32")
    assert model.layout.size == 1
    out = {}
    for rows in (8, 2):
        batch = _batch(rows)
        out[rows] = (np.asarray(model(**batch)), _greedy(model, batch))
    return out


def _greedy(model, batch):
    return generate(model, model.prepare(**batch), max_new_tokens=6, eos_token_ids=[], pad_token_id=0).token_ids


@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_matches_single_device(checkpoint, reference, mesh):
    model = load_pretrained(checkpoint, dtype="float32", mesh=mesh)
    sizes = dict(zip(model.layout.mesh.axis_names, model.layout.mesh.devices.shape))
    assert model.layout.size == 8
    # Parameters are split over fsdp x tensor (each device holds 1/(fsdp*tensor) of the big ones).
    gate = model.params["language_model"]["layers"]["mlp"]["gate_proj"]["kernel"].value
    shard = gate.addressable_shards[0].data.shape
    assert np.prod(shard) * sizes["fsdp"] * sizes["tensor"] == np.prod(gate.shape)
    for rows, (logits_ref, tokens_ref) in reference.items():
        batch = _batch(rows)
        logits = model(**batch)
        if rows == 8:  # a batch that divides the data axes is split over them
            assert len(logits.sharding.device_set) == 8
            assert logits.addressable_shards[0].data.shape[0] == rows // (sizes["data"] * sizes["fsdp"])
        err = np.abs(np.asarray(logits) - logits_ref).max()
        assert err <= 1e-5, (mesh, rows, err)
        assert _greedy(model, batch) == tokens_ref, (mesh, rows)


@pytest.mark.parametrize("mesh", ["data=2,fsdp=1,tensor=4"])
def test_pallas_kernels_per_shard_match_single_device(checkpoint, reference, mesh):
    """attention_impl='pallas' on 8 CPU devices (kernels interpreted, each inside shard_map on its
    rows and heads) gives the single-device XLA logits."""
    model = load_pretrained(checkpoint, dtype="float32", mesh=mesh, attention_impl="pallas")
    logits_ref, _ = reference[8]
    err = np.abs(np.asarray(model(**_batch(8))) - logits_ref).max()
    assert err <= 1e-5, (mesh, err)
