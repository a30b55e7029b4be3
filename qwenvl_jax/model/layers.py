"""Basic layers: Linear, RMSNorm, SwiGLU MLP, Embed.

Parameters are stored in `param_dtype`; each layer computes in `dtype` (None: the params' dtype),
casting parameters at use so f32 master weights with bf16 compute work unchanged.
Kernels are [in, out] (HF stores [out, in]; weights/hf_keys.py transposes).
Every parameter carries its logical axis names (`axes` metadata, see sharding.py).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx


def _cast(x, dtype):
    return x if dtype is None else x.astype(dtype)


class Linear(nnx.Module):
    def __init__(self, din: int, dout: int, *, bias: bool, axes: tuple[str, str], rngs: nnx.Rngs,
                 param_dtype=jnp.float32, dtype=None, init_std: float = 0.02):
        self.kernel = nnx.Param(init_std * jax.random.normal(rngs.params(), (din, dout), param_dtype),
                                axes=tuple(axes))
        self.bias = nnx.Param(jnp.zeros((dout,), param_dtype), axes=(axes[1],)) if bias else None
        self.dtype = dtype

    def __call__(self, x):  # [..., din] -> [..., dout]
        dtype = self.dtype or self.kernel.value.dtype
        y = jnp.dot(_cast(x, dtype), self.kernel.value.astype(dtype))
        if self.bias is not None:
            y = y + self.bias.value.astype(dtype)
        return y


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) in f32, cast back to the input dtype, then times the weight."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32, dtype=None):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        dtype = self.dtype or self.weight.value.dtype
        x = _cast(x, dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight.value.astype(dtype) * y.astype(dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Biases in the vision tower, none in the LLM."""

    def __init__(self, dim: int, hidden: int, *, bias: bool, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 dtype=None, axes: tuple[str, str] = ("embed", "mlp")):
        kw = dict(bias=bias, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.gate_proj = Linear(dim, hidden, axes=axes, **kw)
        self.up_proj = Linear(dim, hidden, axes=axes, **kw)
        self.down_proj = Linear(hidden, dim, axes=axes[::-1], **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        self.embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (vocab, dim), param_dtype),
                                   axes=("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, ids):  # [B, L] -> [B, L, D]
        return _cast(jnp.take(self.embedding.value, ids, axis=0), self.dtype)

    def attend(self, x):  # tied lm_head: [B, L, D] -> [B, L, V]
        dtype = self.dtype or self.embedding.value.dtype
        return jnp.dot(_cast(x, dtype), self.embedding.value.astype(dtype).T)


def stack_layers(make_layer, num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """`num_layers` copies of a layer module whose parameters are stacked on a leading axis.

    Applied with `scan_layers`; one compiled layer body regardless of depth (compile time and
    rematerialisation on 80-layer models).
    """
    keys = jax.random.split(rngs.params(), num_layers)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make_layer(nnx.Rngs(0))))
    states = jax.vmap(lambda k: nnx.state(make_layer(nnx.Rngs(k))))(keys)

    def add_layer_axis(var):
        return var.replace(var.value, axes=("layers", *var.get_metadata()["axes"]))

    states = jax.tree.map(add_layer_axis, states, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, states)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}
_REMAT = contextvars.ContextVar("qwenvl_remat", default="none")


@contextlib.contextmanager
def remat_policy(name: str):
    """Rematerialisation of each scanned layer while tracing inside this context (training)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {list(REMAT_POLICIES)}, got {name!r}")
    token = _REMAT.set(name)
    try:
        yield
    finally:
        _REMAT.reset(token)


def scan_layers(layers: nnx.Module, body, carry, xs=None):
    """Runs `body(layer, carry, x) -> (carry, y)` over the stacked layers and per-layer `xs`.

    Returns (carry, ys) with ys stacked on a leading layer axis (e.g. the updated KV cache).
    Under `remat_policy(...)` each layer step is a jax.checkpoint with that policy.
    """
    graphdef, state = nnx.split(layers)

    def step(c, inp):
        layer_state, x = inp
        return body(nnx.merge(graphdef, layer_state), c, x)

    name = _REMAT.get()
    if name != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[name], prevent_cse=False)
    return jax.lax.scan(step, carry, (state, xs))
