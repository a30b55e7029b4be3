"""What the engine does in one iteration, and how process 0 tells every other process.

On several hosts every process must run the same jitted programs in the same order with the same
host inputs. Process 0 (which serves HTTP) decides each iteration: the requests it admits (slot,
prepared inputs, seed, sampling values) and whether a decode call follows. It broadcasts that plan;
the others run it. A plan is sent every iteration, idle ones too, so followers never sit long in a
collective.
"""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np

from qwenvl_jax.batch import ModelInputs
from qwenvl_jax.buckets import bucket
from qwenvl_jax.generation.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class Admission:
    """A request entering slot `row`: everything its prefill needs, identical on every process."""

    row: int
    inputs: ModelInputs
    seed: int
    sampling: SamplingParams


@dataclasses.dataclass(frozen=True)
class Plan:
    admit: tuple[Admission, ...] = ()
    decode: bool = False
    rows: int = 0  # the rows the decode call runs (Engine.decode_rows)
    stop: bool = False  # the leader is shutting down: followers return


def broadcast_plan(plan: Plan | None) -> Plan:
    """Process 0's `plan` on every process (others pass None). A fixed header first (stop, decode,
    rows, payload bytes), then the pickled admissions only when there are any, padded to a bucketed size
    so the broadcast compiles for a few sizes only."""
    import jax
    from jax.experimental import multihost_utils

    leader = jax.process_index() == 0
    payload = pickle.dumps(plan.admit) if leader and plan.admit else b""
    header = np.array([plan.stop, plan.decode, plan.rows, len(payload)] if leader else [0, 0, 0, 0], np.int32)
    stop, decode, rows, n = (int(x) for x in multihost_utils.broadcast_one_to_all(header))
    admit: tuple[Admission, ...] = ()
    if n:
        buf = np.zeros(bucket(n, 4096), np.uint8)
        if leader:
            buf[:n] = np.frombuffer(payload, np.uint8)
        buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
        admit = pickle.loads(buf[:n].tobytes())  # noqa: S301 - bytes from process 0 of this same job
    return Plan(admit=admit, decode=bool(decode), rows=rows, stop=bool(stop))
