"""Continuous batching: a fixed set of decode slots, one jitted decode step for all of them, and
requests prefilled alone and inserted into free slots between steps.

    engine = Engine(model, max_batch=8, max_seq_len=4096, eos_token_ids=..., pad_token_id=...)
    engine.start()                                      # the scheduling thread
    engine.submit(Request(inputs, max_tokens=64, sampling=..., on_token=..., on_finish=...))

The KV cache is the generation cache (model/decoder.py, one in-place buffer per layer) used as a
ring of `max_seq_len` slots shared by every row: each step writes all rows at the same slot
(index mod S), so the decode program is generation's own, copy-free step. A request's prompt is
prefilled alone (bucketed length, vision tower inside) into a cache of its own and copied into its
row so that its last prompt token sits just before the ring's write slot; the row's other slots
are cleared. Attention sees a row's filled slots in any order (RoPE is already applied to the
keys), and a request never wraps onto itself because prompt + max_tokens <= max_seq_len.
Per-row MRoPE positions, sampling values and keys live in the state, so rows never wait for
each other: a finished, stopped or cancelled request frees its slot at the next step. A decode
call runs the rows up to the last busy slot (a few row counts, one program each): the idle rows'
cache is neither read nor written.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from qwenvl_jax.batch import ModelInputs
from qwenvl_jax.compiled import CompiledCache, auto_formats, placement, shape_spec
from qwenvl_jax.generation.decode import (
    ContextLengthError,
    cache_shardings,
    next_positions,
    prompt_seen,
    put_prompt,
)
from qwenvl_jax.generation.sampling import SamplingParams, sample
from qwenvl_jax.model.decoder import KVCache, unstack_layers
from qwenvl_jax.serve.plan import Admission, Plan, broadcast_plan
from qwenvl_jax.sharding import Layout, active, to_host


@struct.dataclass
class SlotState:
    """Every slot's decoding state; rows are slots."""

    cache: KVCache  # per layer k [B, K, hd, S], v [B, K, S, hd]; index = next ring slot to write
    last_token: jax.Array  # [B] the token to feed next
    next_position: jax.Array  # [B] its MRoPE position (all three axes)
    seen: jax.Array  # [B, V] bool: prompt and generated tokens (repetition penalty)
    keys: jax.Array  # [B] PRNG keys, one stream per request
    temperature: jax.Array  # [B] float32
    top_k: jax.Array  # [B] int32
    top_p: jax.Array  # [B] float32
    repetition_penalty: jax.Array  # [B] float32


def _sampling_values(state, rows: int) -> dict:
    return dict(temperature=state.temperature[:rows], top_k=state.top_k[:rows], top_p=state.top_p[:rows],
                repetition_penalty=state.repetition_penalty[:rows])


def _state_shardings(layout: Layout, cfg, batch: int, slots: int) -> SlotState:
    rows = layout.sharding(("batch",), (batch,))
    return SlotState(
        cache=cache_shardings(layout, cfg, batch, slots),
        last_token=rows, next_position=rows, seen=layout.sharding(("batch", "vocab"), (batch, cfg.vocab_size)),
        keys=rows, temperature=rows, top_k=rows, top_p=rows, repetition_penalty=rows)


def _empty_state(cfg, batch: int, slots: int, dtype) -> SlotState:
    return SlotState(cache=KVCache.empty(cfg, batch, slots, dtype), last_token=jnp.zeros(batch, jnp.int32),
                     next_position=jnp.zeros(batch, jnp.int32), seen=jnp.zeros((batch, cfg.vocab_size), bool),
                     keys=jax.random.split(jax.random.key(0), batch), temperature=jnp.zeros(batch, jnp.float32),
                     top_k=jnp.zeros(batch, jnp.int32), top_p=jnp.ones(batch, jnp.float32),
                     repetition_penalty=jnp.ones(batch, jnp.float32))


def _new_state(cfg, layout, batch, slots, dtype):
    with active(layout):
        return _empty_state(cfg, batch, slots, dtype)


def _prefill(graphdef, layout, params, layer_states, input_ids, position_ids, segment_ids, vision, token_index,
             seed, temperature, top_k, top_p, repetition_penalty):
    """One request alone -> (its cache [1, ..., P], first token [1], next position [1], seen [1, V], key)."""
    with active(layout):
        model = nnx.merge(graphdef, params)
        length = input_ids.shape[1]
        dtype = jax.tree.leaves(params)[0].dtype
        cache = KVCache.empty(model.config.text, 1, length, dtype)
        logits, cache = model.prefill(input_ids, position_ids, segment_ids, vision, token_index, cache,
                                      layers=unstack_layers(model.language_model.layers, layer_states))
        seen = prompt_seen(input_ids, segment_ids, logits.shape[-1])
        key, sub = jax.random.split(jax.random.key(seed))
        first = sample(logits, sub[None], seen, temperature=temperature[None], top_k=top_k[None],
                       top_p=top_p[None], repetition_penalty=repetition_penalty[None])
        return cache, first, next_positions(position_ids, segment_ids), seen.at[0, first[0]].set(True), key


def _insert(state: SlotState, prompt: KVCache, row, first, next_position, seen, key, temperature, top_k, top_p,
            repetition_penalty) -> SlotState:
    """Copies a prefilled request into slot `row`: its P cache columns end just before the ring's
    write slot, the row's other slots are cleared, and its sampling values and key replace the row's."""
    cache = state.cache
    slots = cache.segment_ids.shape[1]
    length = prompt.segment_ids.shape[1]
    columns = (cache.index - length + jnp.arange(length)) % slots
    k = tuple(ck.at[row, :, :, columns].set(pk[0].transpose(2, 0, 1)) for ck, pk in zip(cache.k, prompt.k))
    v = tuple(cv.at[row, :, columns, :].set(pv[0].transpose(1, 0, 2)) for cv, pv in zip(cache.v, prompt.v))
    segment_ids = cache.segment_ids.at[row].set(0).at[row, columns].set(prompt.segment_ids[0])
    return SlotState(cache=KVCache(k=k, v=v, segment_ids=segment_ids, index=cache.index),
                     last_token=state.last_token.at[row].set(first[0]),
                     next_position=state.next_position.at[row].set(next_position[0]),
                     seen=state.seen.at[row].set(seen[0]), keys=state.keys.at[row].set(key),
                     temperature=state.temperature.at[row].set(temperature),
                     top_k=state.top_k.at[row].set(top_k), top_p=state.top_p.at[row].set(top_p),
                     repetition_penalty=state.repetition_penalty.at[row].set(repetition_penalty))


def _step(graphdef, layout, n_steps, rows, params, layer_states, state: SlotState):
    """`n_steps` decode steps for the first `rows` slots (rows <= B: the busy ones and idle ones
    below them) -> (state, tokens [rows, n_steps]). The other slots are neither read nor written:
    a lone request in a large ring reads its own row of the cache, not all of them."""
    with active(layout):
        model = nnx.merge(graphdef, params)
        layers = unstack_layers(model.language_model.layers, layer_states)
        slots = state.cache.segment_ids.shape[1]
        r = jnp.arange(rows)

        def body(i, carry):
            s, tokens = carry
            cache = s.cache.replace(index=s.cache.index % slots)
            pos = jnp.broadcast_to(s.next_position[None, :rows, None], (3, rows, 1))
            logits, cache = model.decode(s.last_token[:rows, None], pos, cache, layers=layers)
            split = jax.vmap(jax.random.split)(s.keys[:rows])  # [rows, 2]
            tok = sample(logits[:, -1], split[:, 1], s.seen[:rows], **_sampling_values(s, rows))
            s = s.replace(cache=cache, last_token=s.last_token.at[r].set(tok),
                          next_position=s.next_position.at[r].add(1), seen=s.seen.at[r, tok].set(True),
                          keys=s.keys.at[r].set(split[:, 0]))
            return s, tokens.at[:, i].set(tok)

        return jax.lax.fori_loop(0, n_steps, body, (state, jnp.zeros((rows, n_steps), jnp.int32)))


# How the step is jitted, here and by aot's deviceless compile of it
STEP_ARGNUMS = dict(static_argnums=(0, 1, 2, 3), donate_argnums=(6,))


@dataclasses.dataclass
class Request:
    """One generation request. Callbacks run on the engine's thread and must be quick."""

    inputs: ModelInputs  # batch 1, from model.prepare
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    seed: int | None = None
    on_token: Callable[[int], None] = lambda token: None  # each generated token, stop token included
    on_finish: Callable[[str], None] = lambda reason: None  # "stop" (a stop token), "length", "cancelled"
    on_error: Callable[[BaseException], None] = lambda error: None
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    generated: int = 0

    def cancel(self) -> None:
        """Ends the request at the next step (a client gone, a stop string found); frees its slot."""
        self.cancelled.set()


class Engine:
    """The scheduling loop: admit waiting requests into free slots, then one decode call for all."""

    def __init__(self, model, *, max_batch: int, max_seq_len: int, eos_token_ids, pad_token_id: int,
                 steps_per_call: int = 1):
        cfg = model.config.text
        if max_batch < 1 or steps_per_call < 1:
            raise ValueError(f"max_batch and steps_per_call must be >= 1, got {max_batch}, {steps_per_call}")
        if not 2 <= max_seq_len <= cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len must be in [2, {cfg.max_position_embeddings}] (the model's context), "
                             f"got {max_seq_len}")
        self.model, self.max_batch, self.max_seq_len = model, max_batch, max_seq_len
        self.eos = frozenset(int(e) for e in eos_token_ids)
        self.pad_token_id, self.steps_per_call = pad_token_id, steps_per_call
        self.dtype = jax.tree.leaves(model.params)[0].dtype
        self._shardings = _state_shardings(model.layout, cfg, max_batch, max_seq_len)
        self._prefill = CompiledCache(_prefill, static_argnums=(0, 1))
        self._insert = CompiledCache(_insert, donate_argnums=(0,))
        # The step picks its params' and state's layouts: compiled first, the params placed where it
        # wants them and the state made and kept there, so no call relays weights or cache out.
        self._step = CompiledCache(_step, **STEP_ARGNUMS, auto_layouts=(4, 6))
        self._step_out = (auto_formats(self._shardings), model.layout.replicated)
        spec = shape_spec(jax.eval_shape(lambda: _empty_state(cfg, max_batch, max_seq_len, self.dtype)),
                          self._shardings)
        formats = self._step.input_formats(model.graphdef, model.layout, steps_per_call, max_batch, model.params,
                                           model.decoder_layer_states(), spec, out_shardings=self._step_out)
        self._params_formats = formats[0]
        model.place_params(self._params_formats)
        self._layer_states = model.decoder_layer_states()
        self._state_formats = placement(formats[2], spec)
        # Steps over fewer rows (the busy slots, a power of two) take the params and state where the
        # full step placed them. Only while rows are not split over devices: a prefix of a sharded
        # batch axis would gather the state onto a few devices.
        self._step_rows = CompiledCache(_step, **STEP_ARGNUMS)
        self._step_rows_out = (self._state_formats, model.layout.replicated)
        self._row_buckets = self._shardings.last_token.is_fully_replicated
        self._state = self._fresh_state()
        self._slots: list[Request | None] = [None] * max_batch
        self._queue: queue.Queue[Request] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0
        # several processes: process 0 decides each iteration and broadcasts it (plan.py)
        self._multi = jax.process_count() > 1
        self._followers_released = False

    # ------------------------------------------------------------------ public
    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """ContextLengthError unless the request fits a slot (prompt + max_tokens <= max_seq_len)."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if prompt_tokens + max_tokens > self.max_seq_len:
            raise ContextLengthError(f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds "
                                     f"--max-seq-len ({self.max_seq_len})")

    def submit(self, request: Request) -> None:
        self.check(int(request.inputs.segment_ids.sum()), request.max_tokens)
        request.sampling.validate()
        self._queue.put(request)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="qwenvl_jax-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the loop (and, on several processes, releases the followers)."""
        self._stop.set()
        self._queue.put(None)  # wakes an idle loop
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._multi and not self._followers_released:
            broadcast_plan(Plan(stop=True))
            self._followers_released = True

    def prompt_columns(self, length: int) -> int:
        """The columns a prompt of `length` tokens is prefilled in: the next power of two (at least
        16), so that few prefill programs cover every length (warm_up compiles them), but never past
        the ring (padding columns would wrap onto the prompt)."""
        return max(min(max(16, 1 << (length - 1).bit_length()), self.max_seq_len), length)

    def row_counts(self) -> list[int]:
        """The row counts a decode call may run (one program each): powers of two up to a quarter
        of the slots, then all of them. Fewer rows read (and on XLA:CPU first copy out) their prefix
        of each layer's cache: at most a quarter keeps that below reading the whole ring. Rows split
        over devices always decode whole (a prefix would gather the state onto a few devices)."""
        if not self._row_buckets:
            return [self.max_batch]
        return [1 << i for i in range(self.max_batch.bit_length()) if 4 << i <= self.max_batch] + [self.max_batch]

    def decode_rows(self) -> int:
        """The rows the next decode call runs: the fewest of row_counts that hold every busy slot
        (requests take the lowest free slot)."""
        busy = [row for row, request in enumerate(self._slots) if request is not None]
        return next(n for n in self.row_counts() if not busy or n > busy[-1])

    def compile_steps(self) -> None:
        """Compiles the decode program of every row count (warm_up: none compiles while serving)."""
        lay = self.model.layout
        self.model.place_params(self._params_formats)
        for rows in self.row_counts()[:-1]:
            self._step_rows.program(self.model.graphdef, lay, self.steps_per_call, rows, self.model.params,
                                    self._layer_states, self._state, out_shardings=self._step_rows_out)

    @property
    def busy_slots(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def run_until_idle(self) -> None:
        """Serves every queued request to its end on the calling thread (tests, warm-up)."""
        while not self._queue.empty() or self.busy_slots:
            self._iterate(block=False)

    # ------------------------------------------------------------------ the loop
    def _fresh_state(self) -> SlotState:
        lay = self.model.layout
        return jax.jit(_new_state, static_argnums=(0, 1, 2, 3, 4), out_shardings=self._state_formats)(
            self.model.config.text, lay, self.max_batch, self.max_seq_len, self.dtype)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._iterate(block=True)

    def _iterate(self, block: bool) -> None:
        """Process 0's iteration: admit waiting requests into free slots, then one decode call
        (the plan is broadcast first when several processes run the engine)."""
        admit = []
        block = block and not self.busy_slots
        while None in self._slots:
            try:
                request = self._queue.get(timeout=0.5) if block else self._queue.get_nowait()
            except queue.Empty:
                break
            block = False
            if request is None or request.cancelled.is_set():
                if request is not None:
                    request.on_finish("cancelled")
                continue
            row = self._slots.index(None)
            self._slots[row] = request  # reserved; freed again if its prefill fails
            seed = request.seed if request.seed is not None else int(np.random.default_rng().integers(2**32))
            admit.append(Admission(row, request.inputs, seed, request.sampling))
        plan = Plan(admit=tuple(admit), decode=self.busy_slots > 0, rows=self.decode_rows())
        if self._multi:
            broadcast_plan(plan)
        self._run_plan(plan)

    def follow(self) -> None:
        """Every process but 0: runs process 0's plans, the same programs in the same order,
        until it stops. Process 0's warm_up compiles the fewer-rows steps without running them:
        compiled here too, before following."""
        self.compile_steps()
        while not (plan := broadcast_plan(None)).stop:
            self._run_plan(plan)

    def _run_plan(self, plan: Plan) -> None:
        for a in plan.admit:
            try:
                first = self._prefill_into(a)
            except Exception as e:  # noqa: BLE001 - one request's failure is its own (500), the slot is freed
                request, self._slots[a.row] = self._slots[a.row], None
                if request is not None:
                    request.on_error(e)
                continue
            if self._slots[a.row] is not None:  # followers hold no requests
                self._deliver(a.row, [first])
        if plan.decode:
            self._decode(plan.rows)

    def _prefill_into(self, a: Admission) -> int:
        lay = self.model.layout
        self.model.place_params(self._params_formats)  # free unless generate() moved them since
        prompt = put_prompt(lay, a.inputs, self.pad_token_id, columns=self.prompt_columns(a.inputs.input_ids.shape[1]))
        values = [lay.put(v) for v in a.sampling.as_arrays().values()]  # temperature, top_k, top_p, penalty
        out_shardings = (cache_shardings(lay, self.model.config.text, 1, prompt[0].shape[1]),
                         *(lay.replicated,) * 4)
        cache, first, next_pos, seen, key = self._prefill(
            self.model.graphdef, lay, self.model.params, self._layer_states, *prompt, lay.put(np.uint32(a.seed)),
            *values, out_shardings=out_shardings)
        self._state = self._insert(self._state, cache, lay.put(np.int32(a.row)), first, next_pos, seen, key,
                                   *values, out_shardings=self._state_formats)
        return int(to_host(first)[0])

    def _decode(self, rows: int) -> None:
        lay = self.model.layout
        self.model.place_params(self._params_formats)
        step, out = ((self._step, self._step_out) if rows == self.max_batch
                     else (self._step_rows, self._step_rows_out))
        try:
            self._state, tokens = step(self.model.graphdef, lay, self.steps_per_call, rows, self.model.params,
                                       self._layer_states, self._state, out_shardings=out)
            tokens = to_host(tokens)
        except Exception as e:  # noqa: BLE001 - the shared step failed: every running request fails, state rebuilt
            for row, request in enumerate(self._slots):
                if request is not None:
                    request.on_error(e)
                    self._slots[row] = None
            self._state = self._fresh_state()
            return
        self.steps += self.steps_per_call
        for row, request in enumerate(self._slots):
            if request is not None:
                self._deliver(row, tokens[row].tolist())

    def _deliver(self, row: int, tokens: list[int]) -> None:
        """Hands a slot's new tokens to its request until it ends; an ended request frees the slot."""
        request = self._slots[row]
        for token in tokens:
            if request.cancelled.is_set():
                return self._finish(row, "cancelled")
            request.generated += 1
            request.on_token(token)
            if token in self.eos:
                return self._finish(row, "stop")
            if request.generated >= request.max_tokens:
                return self._finish(row, "length")
        if request.cancelled.is_set():
            self._finish(row, "cancelled")

    def _finish(self, row: int, reason: str) -> None:
        request, self._slots[row] = self._slots[row], None
        request.on_finish(reason)


def warm_up(engine: Engine, inputs: ModelInputs, n_requests: int | None = None, max_prompt: int = 0) -> float:
    """Compiles prefill, insert and step by serving `inputs` greedily (a few tokens, several slots),
    the step of every row count, then the prefill and insert of text prompts of every
    prompt_columns size up to `max_prompt` tokens (`inputs`' tokens repeated); returns the seconds
    it took."""
    t = time.perf_counter()
    engine.compile_steps()
    for _ in range(n_requests or min(2, engine.max_batch)):
        engine.submit(Request(inputs, max_tokens=min(engine.steps_per_call + 1,
                                                     engine.max_seq_len - int(inputs.segment_ids.sum()))))
    engine.run_until_idle()
    ids = inputs.input_ids[0]
    sizes = sorted({engine.prompt_columns(n) for n in range(1, min(max_prompt, engine.max_seq_len - 1) + 1)})
    for columns in sizes:
        if columns != engine.prompt_columns(ids.shape[0]):  # a prompt filling them, and one new token
            prompt = engine.model.prepare(input_ids=np.resize(ids, min(columns, engine.max_seq_len - 1))[None])
            engine.submit(Request(prompt, max_tokens=1))
            engine.run_until_idle()
    return time.perf_counter() - t


