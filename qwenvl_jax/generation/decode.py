"""Batched generation: one prefill into a preallocated KV cache, then an on-device decode loop.

    out = generate(model, model.prepare(**processor(text=prompts, images=...)),
                   max_new_tokens=64, eos_token_ids=processor.eos_token_ids, pad_token_id=...)

* Prompts are left-padded to a length bucket (4 buckets per octave) and the cache to a slot
  bucket, so a new prompt length rarely means a new compile.
* The decode loop is a `lax.while_loop` on device that stops when every row has hit a stop token
  or the step budget; with streaming it runs one token per call (same executable).
* MRoPE positions continue from the prompt: the i-th generated token sits at max prompt position
  + 1 + i on all three axes (SPEC 6.1), per row.
* Executables are compiled ahead of time per input signature and cached, so compile time and the
  number of compilations are measured, not guessed.
* Everything runs in the model's layout (sharding.py): inputs are placed as global arrays, both
  steps are jitted with explicit in/out shardings (KV cache split over batch and kv heads), and
  results are gathered to every process, so the same call works on one device or a pod.
* The decode state is donated: each step writes one slot of each layer's cache buffer in place
  (model/decoder.py), so a step reads the weights and the filled cache once and copies neither
  (tests/generation/test_decode_program.py checks the compiled program).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from qwenvl_jax.batch import ModelInputs
from qwenvl_jax.buckets import bucket
from qwenvl_jax.compiled import CompiledCache, auto_formats, placement, shape_spec
from qwenvl_jax.generation.sampling import SamplingParams, sample
from qwenvl_jax.model.decoder import K_CACHE_AXES, V_CACHE_AXES, KVCache, unstack_layers
from qwenvl_jax.model.vision_layout import bucket_rows
from qwenvl_jax.pretrained import put_optional, put_vision
from qwenvl_jax.sharding import Layout, active, to_host


class ContextLengthError(ValueError):
    """Prompt plus requested new tokens do not fit the model's context."""


@struct.dataclass
class DecodeState:
    cache: KVCache
    last_token: jax.Array  # [B] the token to feed next
    next_position: jax.Array  # [B] its MRoPE position (all three axes)
    done: jax.Array  # [B] bool: row has produced a stop token
    tokens: jax.Array  # [B, N] generated tokens (pad after a row is done)
    step: jax.Array  # [] number of tokens generated so far
    seen: jax.Array  # [B, V] bool, for the repetition penalty
    key: jax.Array


@dataclasses.dataclass
class GenerationOutput:
    token_ids: list[list[int]]  # per row: generated ids up to and including the stop token
    prompt_tokens: list[int]  # per row: real (unpadded) prompt length
    prefill_s: float
    decode_s: float
    decode_steps: int
    compile_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced per second of decoding, over all rows of the batch."""
        n = sum(max(len(t) - 1, 0) for t in self.token_ids)  # the first token comes from prefill
        return n / self.decode_s if self.decode_s > 0 else 0.0


def check_context(prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    if prompt_tokens + max_new_tokens > context:
        raise ContextLengthError(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                                 f"the context length ({context})")


def cache_shardings(layout: Layout, cfg, batch: int, slots: int) -> KVCache:
    """Where a KV cache lives: rows over the batch axes, heads over kv_heads (each layer's buffer)."""
    k_shape, v_shape = KVCache.layer_shapes(cfg, batch, slots)
    k, v = layout.sharding(K_CACHE_AXES, k_shape), layout.sharding(V_CACHE_AXES, v_shape)
    n = cfg.num_hidden_layers
    return KVCache(k=(k,) * n, v=(v,) * n, segment_ids=layout.sharding(("batch", "length"), (batch, slots)),
                   index=layout.replicated)


def _state_shardings(layout: Layout, cfg, batch: int, slots: int, max_new: int) -> DecodeState:
    """Where each part of the decode state lives: rows over the batch axes, cache heads over kv_heads."""
    rows = layout.sharding(("batch",), (batch,))
    return DecodeState(
        cache=cache_shardings(layout, cfg, batch, slots),
        last_token=rows, next_position=rows, done=rows,
        tokens=layout.sharding(("batch", "length"), (batch, max_new)), step=layout.replicated,
        seen=layout.sharding(("batch", "vocab"), (batch, cfg.vocab_size)), key=layout.replicated)


@functools.lru_cache(maxsize=64)
def state_spec(cfg, batch: int, slots: int, max_new: int, dtype, shardings: DecodeState) -> DecodeState:
    """The decode state's shapes, dtypes and shardings (what prefill returns), without running it
    (memoized: tracing it costs ~10 ms per generate call)."""
    def empty():
        rows = jnp.zeros(batch, jnp.int32)
        return DecodeState(cache=KVCache.empty(cfg, batch, slots, dtype), last_token=rows, next_position=rows,
                           done=jnp.zeros(batch, bool), tokens=jnp.zeros((batch, max_new), jnp.int32),
                           step=jnp.zeros((), jnp.int32), seen=jnp.zeros((batch, cfg.vocab_size), bool),
                           key=jax.random.key(0))

    return shape_spec(jax.eval_shape(empty), shardings)


def _layers(model, layer_states):
    """The decoder layers as separate modules, from states sliced outside the program (CPU) or here."""
    return unstack_layers(model.language_model.layers, layer_states)


def prompt_seen(input_ids, segment_ids, vocab: int):
    """[B, V] bool: the tokens each row's prompt holds (padding excluded), for the repetition penalty."""
    b = input_ids.shape[0]
    return jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], input_ids].max(segment_ids > 0)


def next_positions(position_ids, segment_ids):
    """[B] int32: the MRoPE position of each row's first new token, one past the largest position of
    its prompt (padding holds position 0 and does not count)."""
    return (jnp.max(jnp.where(segment_ids > 0, position_ids.max(0), -1), axis=1) + 1).astype(jnp.int32)


def _prefill(graphdef, layout, slots, max_new, params, layer_states, input_ids, position_ids, segment_ids, vision,
             token_index, seed, sampling, eos, pad_id):
    with active(layout):
        model = nnx.merge(graphdef, params)
        b = input_ids.shape[0]
        dtype = jax.tree.leaves(params)[0].dtype
        cache = KVCache.empty(model.config.text, b, slots, dtype)
        logits, cache = model.prefill(input_ids, position_ids, segment_ids, vision, token_index, cache,
                                      layers=_layers(model, layer_states))
        seen = prompt_seen(input_ids, segment_ids, logits.shape[-1])
        key, sub = jax.random.split(jax.random.key(seed))
        first = sample(logits, sub, seen, **sampling)
        done = jnp.isin(first, eos)
        next_pos = next_positions(position_ids, segment_ids)
        tokens = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(first)
        return DecodeState(cache=cache, last_token=first, next_position=next_pos, done=done,
                           tokens=tokens, step=jnp.ones((), jnp.int32),
                           seen=seen.at[jnp.arange(b), first].set(True), key=key)


def _decode(graphdef, layout, params, layer_states, state: DecodeState, n_steps, sampling, eos, pad_id):
    with active(layout):
        model = nnx.merge(graphdef, params)
        return _decode_loop(model, _layers(model, layer_states), state, n_steps, sampling, eos, pad_id)


def _decode_loop(model, layers, state: DecodeState, n_steps, sampling, eos, pad_id):
    limit = jnp.minimum(state.step + n_steps, state.tokens.shape[1])

    def cond(s):
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: DecodeState):
        pos = jnp.broadcast_to(s.next_position[None, :, None], (3, *s.last_token.shape, 1))
        logits, cache = model.decode(s.last_token[:, None], pos, s.cache, layers=layers)
        key, sub = jax.random.split(s.key)
        tok = sample(logits[:, -1], sub, s.seen, **sampling)
        tok = jnp.where(s.done, pad_id, tok)
        b = tok.shape[0]
        return DecodeState(cache=cache, last_token=tok, next_position=s.next_position + 1,
                           done=s.done | jnp.isin(tok, eos),
                           tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, tok[:, None], s.step, axis=1),
                           step=s.step + 1, seen=s.seen.at[jnp.arange(b), tok].set(True), key=key)

    return jax.lax.while_loop(cond, body, state)


# How the programs are jitted, here and by aot's deviceless compiles of them
PREFILL_ARGNUMS = dict(static_argnums=(0, 1, 2, 3))
DECODE_ARGNUMS = dict(static_argnums=(0, 1), donate_argnums=(4,))
_PREFILL = CompiledCache(_prefill, **PREFILL_ARGNUMS)
# The decode loop picks its params' and state's layouts (compiled.py); generate places them there.
_DECODE = CompiledCache(_decode, **DECODE_ARGNUMS, auto_layouts=(2, 4))


def compiled_programs() -> dict[str, list]:
    """The compiled prefill and decode executables so far (tests inspect their buffers)."""
    return {"prefill": _PREFILL.executables(), "decode": _DECODE.executables()}


def compile_stats() -> dict:
    """Programs compiled and loaded from disk (compiled.py) so far, and the seconds both took."""
    return {"compiles": _PREFILL.compiles + _DECODE.compiles, "loads": _PREFILL.loads + _DECODE.loads,
            "compile_s": _PREFILL.compile_s + _DECODE.compile_s}


def put_prompt(layout: Layout, inputs: ModelInputs, pad_token_id: int, columns: int | None = None) -> tuple:
    """Prefill's inputs placed in the layout: (input_ids, position_ids, segment_ids, vision,
    vision_token_index), left-padded to `columns` (default: the length bucket; padding is segment 0
    at position 0), and the vision rows to their buckets, so new prompt lengths and image sizes
    rarely recompile."""
    length = inputs.input_ids.shape[1]
    pad = max(columns or bucket(length), length) - length
    ids = np.pad(inputs.input_ids, ((0, 0), (pad, 0)), constant_values=pad_token_id)
    seg = np.pad(inputs.segment_ids, ((0, 0), (pad, 0)))
    pos = np.pad(inputs.position_ids, ((0, 0), (0, 0), (pad, 0)))
    index = None if inputs.vision_token_index is None else np.pad(inputs.vision_token_index, ((0, 0), (pad, 0)),
                                                                  constant_values=-1)
    vision = None if inputs.vision is None else bucket_rows(inputs.vision)
    rows = ("batch", "length")
    return (layout.put(ids, rows), layout.put(pos, (None, *rows)), layout.put(seg, rows), put_vision(layout, vision),
            put_optional(layout, index, rows))


def generate(model, inputs: ModelInputs, *, max_new_tokens: int, eos_token_ids, pad_token_id: int,
             sampling: SamplingParams = SamplingParams(), seed: int = 0,
             on_tokens: Callable[[np.ndarray], None] | None = None) -> GenerationOutput:
    """Generates up to `max_new_tokens` per row. `on_tokens([B] ids)` streams each step's tokens."""
    sampling.validate()
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = model.config.text
    b = inputs.input_ids.shape[0]
    real = inputs.segment_ids.sum(1)
    if int(real.min()) == 0:
        raise ValueError("empty prompt: every row needs at least one token")
    check_context(int(real.max()), max_new_tokens, cfg.max_position_embeddings)
    lay = model.layout
    put = lay.put
    prompt = put_prompt(lay, inputs, pad_token_id)
    slots = bucket(prompt[0].shape[1] + max_new_tokens)
    args = (*prompt, put(np.uint32(seed)),
            {k: put(v) for k, v in sampling.as_arrays().items()}, put(np.asarray(list(eos_token_ids), np.int32)),
            put(np.int32(pad_token_id)))
    sampling_args, eos, pad_arg = args[6:]
    state_shardings = _state_shardings(lay, cfg, b, slots, max_new_tokens)
    state_formats = auto_formats(state_shardings)
    compile_before = compile_stats()["compile_s"]

    t = time.perf_counter()
    layer_states = model.decoder_layer_states()

    def decode(state, n):
        return _DECODE(model.graphdef, lay, model.params, layer_states, state, put(np.int32(n)), sampling_args, eos,
                       pad_arg, out_shardings=state_formats)

    # The decode program first: the params go where it wants them (once per model), and prefill
    # writes the state in the layouts the loop reads, so no call relays either out.
    dtype = jax.tree.leaves(model.params)[0].dtype
    spec = state_spec(cfg, b, slots, max_new_tokens, dtype, state_shardings)
    params_formats, _, spec_formats = _DECODE.input_formats(model.graphdef, lay, model.params, layer_states, spec,
                                                            put(np.int32(1)), sampling_args, eos, pad_arg,
                                                            out_shardings=state_formats)[:3]
    spec_formats = placement(spec_formats, spec)
    model.place_params(params_formats)
    layer_states = model.decoder_layer_states()
    state = _PREFILL(model.graphdef, lay, slots, max_new_tokens, model.params, layer_states, *args,
                     out_shardings=spec_formats)
    jax.block_until_ready(state.last_token)
    compiled_prefill = compile_stats()["compile_s"] - compile_before
    prefill_s = time.perf_counter() - t - compiled_prefill
    if on_tokens is not None:
        on_tokens(to_host(state.last_token))

    t = time.perf_counter()
    steps = 1

    if on_tokens is None:
        state = decode(state, max_new_tokens)
        steps = int(to_host(state.step))
    else:
        while steps < max_new_tokens and not bool(np.all(to_host(state.done))):
            state = decode(state, 1)
            on_tokens(to_host(state.last_token))
            steps += 1
    compile_total = compile_stats()["compile_s"] - compile_before
    decode_s = time.perf_counter() - t - (compile_total - compiled_prefill)

    tokens = to_host(state.tokens)[:, :steps]
    eos_set = set(int(e) for e in eos_token_ids)
    token_ids = []
    for row in tokens.tolist():
        stop = next((i for i, x in enumerate(row) if x in eos_set), None)
        token_ids.append(row if stop is None else row[:stop + 1])
    return GenerationOutput(token_ids=token_ids, prompt_tokens=[int(x) for x in real], prefill_s=prefill_s,
                            decode_s=decode_s, decode_steps=steps - 1, compile_s=compile_total)
