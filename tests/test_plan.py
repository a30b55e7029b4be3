"""The memory planner (qwenvl_jax.plan): exact parts against real shards / published counts, and the CLI."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax import plan
from qwenvl_jax.config import Qwen25VLConfig

ROOT = Path(__file__).resolve().parent.parent


def _layout(model: str, mesh: str):
    config = Qwen25VLConfig.from_preset(model)
    return config, plan.abstract_layout(config, plan.resolve_mesh(mesh, None))


MESH = "data=1,fsdp=2,tensor=4"  # tiny has 2 kv heads and 2 vision heads: tensor=4 replicates both


def _device0_bytes(params) -> dict[str, int]:
    """path -> nbytes of each real array's shard on device 0."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    device0 = jax.devices()[0]
    return {plan._dotted(path): next(s.data.nbytes for s in var.get_value().addressable_shards
                                     if s.device == device0) for path, var in flat}


needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason=f"needs 8 devices for a real {MESH} mesh")


@needs_8
def test_param_bytes_match_real_shards():
    """Real arrays placed by the model's real Layout over a real 8-device Mesh (what init_model and
    load_pretrained do), vs the planner's AbstractMesh arithmetic."""
    from qwenvl_jax.sharding import Layout, param_shardings
    from qwenvl_jax.weights.load import abstract_model

    config, layout = _layout("tiny", MESH)
    _, abstract = abstract_model(config)
    shardings = param_shardings(abstract, Layout.create(MESH).for_model(config))
    real = jax.tree.map(lambda a, s: a.replace(jax.device_put(np.zeros(a.shape, np.float32), s.get_value())),
                        abstract, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    planned = plan.param_bytes(plan.model_params(config), layout, itemsize=4)
    assert planned == _device0_bytes(real)
    assert sum(planned.values()) < sum(4 * math.prod(p.shape) for p in plan.model_params(config))


@needs_8
@pytest.mark.slow  # init_model compiles the random init: ~10 s on CPU
def test_param_bytes_match_init_model():
    from qwenvl_jax.pretrained import init_model

    config, layout = _layout("tiny", MESH)
    planned = plan.param_bytes(plan.model_params(config), layout, itemsize=4)
    assert planned == _device0_bytes(init_model(config, mesh=MESH, dtype="float32").params)


@pytest.mark.parametrize("model,published", [("3b", 3.75e9), ("7b", 8.29e9), ("72b", 73.4e9)])
def test_total_params_match_published(model, published):
    """Text + vision + lm_head, unsharded: the published Qwen2.5-VL sizes (7B is 8.29B with the ViT).
    (Exactly equal to transformers' Qwen2_5_VLForConditionalGeneration on the meta device.)"""
    n = sum(math.prod(p.shape) for p in plan.model_params(Qwen25VLConfig.from_preset(model)))
    assert abs(n - published) / published < 0.01


def test_adamw_state_is_two_f32_copies_of_the_params():
    config, layout = _layout("7b", "data=1,fsdp=8,tensor=4")
    params = plan.model_params(config)
    f32 = sum(plan.param_bytes(params, layout, 4).values())
    extra = plan.adamw_state_bytes(params, layout) - 2 * f32
    assert 0 <= extra <= 16  # plus the replicated int32 step count(s)
    r = plan.plan(plan.Request(model="7b", mesh="data=1,fsdp=8,tensor=4", seq_len=8192, batch=8))
    b = r["bytes_per_chip"]
    assert b["params"] == b["gradients"] == f32 and b["optimizer"] == 2 * f32 + extra
    # 8.29B params / 32 chips in f32, plus ~6%: the fused ViT qkv (vision_qkv) and norms are not
    # split over tensor.
    assert 1.0 <= f32 / (4 * 8.29e9 / 32) < 1.07


def test_kv_cache_bytes_and_kv_head_replication():
    """layers x B x S x kv_heads_local x head_dim x (k, v) x 2 bytes; 72B has 8 kv heads, so tensor=16
    replicates them (the rules keep whole heads) and the cache is 8x larger per chip than with 8."""
    t = Qwen25VLConfig.from_preset("72b").text

    def cache(mesh):
        r = plan.plan(plan.Request(model="72b", mesh=mesh, seq_len=8192, batch=1, mode="infer"))
        return r["bytes_per_chip"]["kv_cache"]

    assert cache("fsdp=4,tensor=4") == t.num_hidden_layers * 8192 * 2 * t.head_dim * 2 * 2
    assert cache("fsdp=1,tensor=8") == cache("fsdp=1,tensor=16") / 8


def test_train_activations_follow_the_stated_model():
    r = plan.plan(plan.Request(model="72b", mesh="fsdp=64,tensor=4", seq_len=32768, batch=64, loss_chunk=0))
    acts = r["activation_breakdown"]
    assert r["batch_per_shard"] == 1 and r["chips"] == 256
    assert acts["saved_layer_inputs"] == 80 * 32768 * 8192 * 2  # 40 GiB: [L, D] bf16 per layer
    assert acts["phase_logits"] >= 2 * 32768 * (152064 // 4) * 4  # f32 logits + their gradient
    chunked = plan.plan(plan.Request(model="72b", mesh="fsdp=64,tensor=4", seq_len=32768, batch=64,
                                     loss_chunk=4096))["activation_breakdown"]
    assert chunked["phase_logits"] < acts["phase_logits"]
    dense = plan.plan(plan.Request(model="72b", mesh="fsdp=64,tensor=4", seq_len=32768, batch=64,
                                   attention="dense", loss_chunk=0))
    scores = 16 * 32768**2 * 4  # f32 [heads/tensor, L, L]
    assert dense["activation_breakdown"]["phase_decoder_layer"] > acts["phase_decoder_layer"] + scores


def test_slice_names_count_tensorcores():
    assert plan.parse_tpu("v5p-64") == ("v5p", 32)
    assert plan.parse_tpu("v5litepod-8") == ("v5e", 8)
    assert plan.parse_tpu("v6e") == ("v6e", None)
    r = plan.plan(plan.Request(model="72b", mesh="fsdp=-1,tensor=4", seq_len=8192, tpu="v5p-32",
                               mode="infer"))
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 4}


def test_cli_table_and_json(capsys):
    assert plan.main(["--model", "7b", "--mesh", "fsdp=2,tensor=4", "--tpu", "v5e", "--mode", "infer"]) == 0
    out = capsys.readouterr().out
    assert "fits: yes (" in out and "GiB HBM per chip" in out and "estimate" in out
    assert plan.main(["--model", "72b", "--mesh", "fsdp=8", "--seq-len", "32768", "--batch", "8",
                      "--tpu", "v5e", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["fits"] is False and r["total_bytes_per_chip"] == sum(r["bytes_per_chip"].values())
    assert set(r["bytes_per_chip"]) == {"params", "optimizer", "gradients", "update_temporaries", "activations"}


@pytest.mark.parametrize("argv,needle", [
    (["--model", "13b", "--mesh", "fsdp=2"], "13b"),
    (["--model", "7b", "--mesh", "fsdp=-1,tensor=4"], "--devices"),
    (["--model", "7b", "--mesh", "fsdp=3,tensor=4", "--devices", "8"], "needs 12 devices"),
    (["--model", "7b", "--mesh", "fsdp=2", "--tpu", "v5p-8"], "4 chips"),  # v5p-8 = 4 chips, mesh says 2
    (["--model", "7b", "--mesh", "fsdp=2", "--seq-len", "-5"], "--seq-len"),
    (["--model", "7b", "--mesh", "fsdp=4,tensor=2", "--batch", "2"], "divisible"),
    (["--model", "7b", "--mesh", "fsdp=2", "--tpu", "v9"], "--tpu"),
    (["--model", "7b", "--mesh", "fsdp=2", "--seq-len", "abc"], "--seq-len"),
    (["--mesh", "fsdp=2"], "--model"),
    (["--model", "tiny", "--mesh", "fsdp=3", "--batch", "3", "--tpu", "v5p", "--compile"], "power-of-two"),
])
def test_cli_errors_are_one_line(capsys, argv, needle):
    assert plan.main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and "\n" not in err and err.startswith("error: ") and needle in err


def test_module_entry_point_errors_without_traceback():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "qwenvl_jax.plan", "--model", "7b", "--mesh", "fsdp=2",
                           "--batch", "3"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_compile_reports_xla_per_chip_memory(capsys, mode):
    """--compile compiles the real program(s) for 4 v5p chips (no TPU) and reports XLA's numbers
    beside the estimate; the exact parts of the estimate (state, weights, KV cache) are what the
    compiled program takes as arguments (TPU tiling pads tiny arrays, so >=)."""
    argv = ["--model", "tiny", "--mesh", "fsdp=2,tensor=2", "--tpu", "v5p-8", "--seq-len", "256", "--batch", "4",
            "--mode", mode, "--compile", "--json"]
    assert plan.main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    c, parts = r["compiled"], r["bytes_per_chip"]
    names = [p["name"] for p in c["programs"]]
    if mode == "train":
        assert names == ["train_step[all]"] and c["programs"][0]["mosaic_kernels"] >= 6
        assert c["programs"][0]["argument_bytes"] >= parts["params"] + parts["optimizer"]
    else:
        assert names == ["prefill", "decode"] and c["programs"][0]["mosaic_kernels"] >= 3
        assert c["programs"][1]["argument_bytes"] >= parts["params"] + parts["kv_cache"]
    assert c["peak_bytes"] == max(p["peak_bytes"] for p in c["programs"]) > 0
    assert 0 < c["mfu_ceiling"] <= 1 and c["step_time_lower_bound_s"] > 0
    table = plan.format_table(r)
    assert "compiled for TPU v5p x 4 chips" in table and "MFU ceiling" in table
