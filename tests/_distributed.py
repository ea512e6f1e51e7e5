"""The worker side of the multi-process tests (``tests.helpers.Workers`` starts them): the
arguments every worker takes and joining the ``jax.distributed`` job on 127.0.0.1 (gloo).

Imports nothing heavy at module level: a worker must set its device count before JAX starts.
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def worker_parser(description: str | None) -> argparse.ArgumentParser:
    """A parser with the arguments ``Workers`` passes to every worker; add your own to it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--coordinator", required=True, help="host:port of process 0")
    parser.add_argument("--local-devices", type=int, required=True)
    return parser


def join(args: argparse.Namespace) -> Any:
    """Starts JAX on ``args.local_devices`` CPU devices with gloo collectives and joins the
    job (bounded: 120 s to meet the other processes). Returns the ``jax`` module; the caller
    calls ``jax.distributed.shutdown()`` when done."""
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id,
                               initialization_timeout=120)
    return jax
