"""Multi-process (multi-host) start-up: every process runs the same command.

    python -m qwenvl_jax.infer ... --distributed                  # TPU VM pods, SLURM, k8s: auto
    python -m qwenvl_jax.infer ... --coordinator 10.0.0.2:1234 --num-processes 2 --process-id 0

On a TPU VM `jax.distributed.initialize()` finds the coordinator, process count and index by
itself. Elsewhere (CPU tests, GPU clusters without a scheduler) they are given explicitly; on CPU
the cross-process collectives use gloo. Only process 0 prints results.
"""

from __future__ import annotations

import argparse
import os

import jax


class DistributedError(ValueError):
    """Inconsistent multi-process settings."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-host (every process runs the same command)")
    group.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() with auto-detection (TPU VM pods, SLURM)")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0's coordinator (default: $JAX_COORDINATOR_ADDRESS)")
    group.add_argument("--num-processes", type=int, metavar="N",
                       help="number of processes (with --process-id and --coordinator; default: auto-detected "
                            "with --distributed)")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 to N-1")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               auto: bool = False) -> bool:
    """Starts jax.distributed when asked to; returns whether it did. Call before any jax array exists."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    explicit = [v is not None for v in (num_processes, process_id)]
    if any(explicit) and not all(explicit):
        raise DistributedError("--num-processes and --process-id go together")
    if not auto and not any(explicit):
        return False
    if any(explicit):
        if not coordinator:
            raise DistributedError("--coordinator HOST:PORT is needed with --num-processes/--process-id")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    # Cross-process collectives on the CPU backend (no effect on TPU/GPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True


def initialize_from_args(args: argparse.Namespace) -> bool:
    return initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)


def is_main_process() -> bool:
    return jax.process_index() == 0
