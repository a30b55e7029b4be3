"""The compiled decode loop updates the KV cache in place, on one device and on a mesh: the
donated cache is aliased to the output, and no instruction but the in-place update produces an
array of the cache's shape (a copy of the cache, stacked or per layer, or a transposed copy for
attention, would)."""

import math
import re

import numpy as np
import pytest

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.generation import decode
from qwenvl_jax.model.decoder import K_CACHE_AXES, KVCache
from qwenvl_jax.pretrained import init_model


@pytest.fixture(scope="module", params=[(None, 1), ("data=2,fsdp=2,tensor=2", 4)], ids=["one_device", "mesh"])
def compiled_decode(request):
    """The decode program of a long cache, with XLA's per-device sizes of one layer's k buffer
    and of the whole cache."""
    mesh, batch = request.param
    config = Qwen25VLConfig.from_preset("tiny")
    model = init_model(config, dtype="float32", mesh=mesh)
    prompt = np.repeat(np.arange(3, 11)[None], batch, 0)
    new_tokens = config.text.max_position_embeddings - 64  # a long cache: a copy of it cannot hide
    before = decode.compiled_programs()["decode"]
    # every id stops: one prefill, no decode step runs, but the decode program is compiled
    out = decode.generate(model, model.prepare(input_ids=prompt), max_new_tokens=new_tokens,
                          eos_token_ids=range(config.text.vocab_size), pad_token_id=0)
    assert [len(t) for t in out.token_ids] == [1] * batch
    programs = [p for p in decode.compiled_programs()["decode"] if all(p is not q for q in before)]
    assert len(programs) == 1
    slots = decode.bucket(decode.bucket(prompt.shape[1]) + new_tokens)
    k_shape, _ = KVCache.layer_shapes(config.text, batch, slots)
    local = model.layout.sharding(K_CACHE_AXES, k_shape).shard_shape(k_shape)
    layer_bytes = math.prod(local) * 4
    assert local[3] == slots
    return programs[0], layer_bytes, 2 * config.text.num_hidden_layers * layer_bytes, slots, local[2]


def test_cache_is_donated_and_aliased(compiled_decode):
    program, _, cache_bytes, _, _ = compiled_decode
    assert program.memory_analysis().alias_size_in_bytes >= cache_bytes


def test_nothing_moves_the_cache_but_the_in_place_update(compiled_decode):
    """Every instruction whose result has the cache's slot and head_dim axes is the cache itself
    (parameter, tuple element, bitcast, loop) or an in-place dynamic-update-slice: no copy,
    transpose, gather or fusion produces one; and the temporaries stay under two layers' k buffer
    (a copy of the cache, per layer or stacked, needs at least one)."""
    program, layer_bytes, _, slots, head_dim = compiled_decode
    cache_shaped = re.compile(r"= \S+\[([^\]]*)\]\S* ([\w-]+)\(")
    allowed = {"parameter", "get-tuple-element", "tuple", "bitcast", "while", "dynamic-update-slice"}
    moved = []
    for line in program.as_text().splitlines():
        m = cache_shaped.search(line)
        if not m:
            continue
        dims = [int(d) for d in m.group(1).split(",") if d.strip().isdigit()]
        op = m.group(2)
        if slots in dims and head_dim in dims and op not in allowed:
            if not (op == "fusion" and "dynamic-update-slice" in line.split("=")[0]):
                moved.append(line.strip()[:160])
    assert not moved, moved[:3]
    temps = program.memory_analysis().temp_size_in_bytes
    assert temps < 2 * layer_bytes, f"decode temporaries {temps} B vs one layer's k buffer {layer_bytes} B"


def test_the_ordering_dependency_adds_an_exact_zero_whatever_the_read_holds():
    """The write's dependency on attention's output adds nothing, even where that output is NaN or
    inf in one row (0 * inf would be NaN in every row's cache)."""
    import jax

    from qwenvl_jax.model.decoder import after

    x = np.arange(-3.0, 3.0, dtype=np.float32).reshape(2, 3)
    for e in (np.nan, np.inf, -np.inf, 1.5, -0.0):
        dep = np.full((2, 4), e, np.float32)
        np.testing.assert_array_equal(jax.jit(after)(x, dep), x)
