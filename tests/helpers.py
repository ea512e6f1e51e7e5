"""The helpers every test module shares: tree comparisons and the Optax-parity runner.

* :func:`assert_trees_close` (tolerance, built on ``chex.assert_trees_all_close``) and
  :func:`assert_trees_identical` (bit for bit, for checkpoints and skipped steps): the one
  place tests compare trees, so a failure always names the leaf path.
* The Optax-parity fixtures of ``test_aliases.py`` and ``transforms/test_transforms.py``: a
  small three-leaf parameter tree, a fixed random gradient-noise sequence, a gradient with
  per-leaf curvature and a jitted runner that steps an optstate transform and an Optax
  transform on the same gradient sequence. Each test file passes its own seeds, so its tests
  see the same data they always did.

Import it as ``from tests import helpers``.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

STEPS = 40
#: The Optax-parity tolerance: optstate's and Optax's float32 arithmetic may differ in the
#: order of operations, never by more than this after 40 steps.
RTOL, ATOL = 2e-5, 2e-6


# --- tree comparisons ----------------------------------------------------------------------


def _paths(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def assert_trees_close(got: Any, want: Any, what: str = "trees", *, rtol: float = RTOL,
                       atol: float = ATOL, check_dtype: bool = True,
                       check_structure: bool = True) -> None:
    """Asserts ``|got - want| <= atol + rtol * |want|`` leaf by leaf, compared in float32.

    Args:
      got, want: pytrees of arrays (or numbers) with the same number of leaves.
      what: named in the failure message.
      rtol, atol: tolerances (default: the Optax-parity tolerance :data:`RTOL`, :data:`ATOL`).
      check_dtype: the leaf dtypes must match too.
      check_structure: the tree structures must be equal; with ``False`` only the leaves are
        paired, in order (e.g. optstate's state against Optax's, whose NamedTuple classes
        differ).

    A NaN in either tree fails (NaN is never close to anything). A failure names the path of
    the first differing leaf (as ``jax.tree_util.keystr`` writes it, taken from ``got``).
    """
    if check_structure:
        chex.assert_trees_all_equal_structs(got, want)
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves), (
        f"{what}: {len(got_leaves)} leaves, expected {len(want_leaves)}")
    paths = _paths(got)
    if check_dtype:
        for path, g, w in zip(paths, got_leaves, want_leaves):
            assert jnp.result_type(g) == jnp.result_type(w), (
                f"{what}: dtype {jnp.result_type(g)} at {path}, expected {jnp.result_type(w)}")
    got32 = {p: np.asarray(x, np.float32) for p, x in zip(paths, got_leaves)}
    want32 = {p: np.asarray(x, np.float32) for p, x in zip(paths, want_leaves)}
    for path in paths:
        assert not (np.isnan(got32[path]).any() or np.isnan(want32[path]).any()), (
            f"{what}: NaN at {path}")
    chex.assert_trees_all_close(got32, want32, rtol=rtol, atol=atol, custom_message=what)


def _bits(x: Any) -> tuple[str, tuple[int, ...], bytes, bool]:
    """dtype, shape, raw bytes and weak type of a leaf (PRNG keys by their key data)."""
    if jax.dtypes.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
        return (str(x.dtype), tuple(x.shape), np.asarray(jax.random.key_data(x)).tobytes(),
                False)
    host = np.asarray(x)
    return (str(host.dtype), tuple(host.shape), host.tobytes(),
            bool(getattr(x, "weak_type", False)))


def assert_trees_identical(got: Any, want: Any, what: str = "trees") -> None:
    """Asserts equal tree structures and every leaf with the same dtype, shape, weak type and
    bytes (NaN payloads and the sign of zero included; PRNG keys by their key data)."""
    chex.assert_trees_all_equal_structs(got, want)
    for path, g, w in zip(_paths(got), jax.tree.leaves(got), jax.tree.leaves(want)):
        assert _bits(g) == _bits(w), f"{what}: leaf {path} differs"


# --- Optax parity --------------------------------------------------------------------------


def params(*, seed: int):
    """``{"w": (8, 6), "b": (6,), "s": ()}`` float32 parameters drawn from ``key(seed)``."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "w": jax.random.normal(k1, (8, 6), jnp.float32),
        "b": jax.random.normal(k2, (6,), jnp.float32) * 0.1,
        "s": jnp.asarray(0.5, jnp.float32),
    }


def noise(steps: int = STEPS, *, seed: int):
    """A ``steps``-long gradient-noise sequence per leaf of :func:`params`, from ``key(seed)``."""
    ks = jax.random.split(jax.random.key(seed), 3)
    return {
        "w": jax.random.normal(ks[0], (steps, 8, 6), jnp.float32),
        "b": jax.random.normal(ks[1], (steps, 6), jnp.float32),
        "s": jax.random.normal(ks[2], (steps,), jnp.float32),
    }


# Per-leaf curvature two orders of magnitude apart: the gradient depends on the parameters
# (so the two trajectories feed back) and on a fixed random sequence (so it is not constant).
CURVATURE = {"w": 1.0, "b": 0.02, "s": 3.0}


def grads(params, noise):
    """The gradient of a per-leaf quadratic around 0.3 plus ``0.1 * noise``."""
    return {k: CURVATURE[k] * (params[k] - 0.3) + 0.1 * noise[k] for k in params}


@functools.partial(jax.jit, static_argnums=(0, 1))
def run_pair(ours, theirs, params, noise):
    """One step per row of ``noise`` for both transforms on the same gradient sequence, in one
    program; returns ``(params, state)`` for ``ours`` and for ``theirs``."""

    def run(tx):
        def step(carry, n):
            p, s = carry
            u, s = tx.update(grads(p, n), s, p)
            return (optax.apply_updates(p, u), s), None

        (p, s), _ = jax.lax.scan(step, (params, tx.init(params)), noise)
        return p, s

    return run(ours), run(theirs)


def jit_traced_once(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``jax.jit(fn)`` that fails (``chex.assert_max_traces``) if ``fn`` is traced twice, e.g. a
    step that recompiles at a reset boundary or on restored arrays. The trace counters are
    cleared first: chex keys them by the definition site, which repeats across test cases."""
    chex.clear_trace_counter()
    return jax.jit(chex.assert_max_traces(fn, n=1))


# --- shared problems and workers -------------------------------------------------------------


def least_squares(make_tx: Callable[[], Any], *, n: int = 4096, batch: int = 64,
                  steps: int = 300) -> tuple[float, Any]:
    """Mini-batch least squares with a 512 x 64 weight: ``mean((x w - y)^2)`` on the full data
    after ``steps`` updates on random batches (the same batches for every transform), and the
    final state. One ``lax.scan``."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, 512)) / np.sqrt(512), jnp.float32)
    w_true = jnp.asarray(rng.standard_normal((512, 64)), jnp.float32)
    y = x @ w_true + 0.1 * jnp.asarray(rng.standard_normal((n, 64)), jnp.float32)
    batches = jnp.asarray(rng.integers(0, n, (steps, batch)))
    tx = make_tx()

    def loss(w, xb, yb):
        return jnp.mean((xb @ w - yb) ** 2)

    def step(carry, idx):
        w, state = carry
        updates, state = tx.update(jax.grad(loss)(w, x[idx], y[idx]), state, w)
        return (optax.apply_updates(w, updates), state), None

    def run(w):  # init under the same jit: eager init of quantized state compiles op by op
        return jax.lax.scan(step, (w, tx.init(w)), batches)[0]

    w, state = jax.jit(run)(jnp.zeros((512, 64)))
    return float(loss(w, x, y)), state


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a ``jax.distributed`` coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(devices: int) -> dict[str, str]:
    """Environment of a worker process: ``devices`` emulated CPU devices, and this checkout
    first on the import path (so workers import this optstate and ``tests``)."""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = os.pathsep.join([root] + env.get("PYTHONPATH", "").split(os.pathsep))
    return env


class Workers:
    """The processes of one ``jax.distributed`` job on 127.0.0.1 (``processes`` copies of a
    worker script, each with ``local_devices`` emulated CPU devices and its output in a log
    file). Use as a context manager: on exit, any process still running is killed and the logs
    are closed, so no test leaves a worker behind.

    Each worker is started as ``python SCRIPT --process-id I --num-processes N --coordinator
    HOST:PORT --local-devices D *args``.
    """

    def __init__(self, script: str | os.PathLike, args: list[str], *, processes: int,
                 local_devices: int, log_dir: Path, name: str = "worker") -> None:
        coordinator = f"127.0.0.1:{free_port()}"
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Any] = []
        for pid in range(processes):
            log = open(Path(log_dir) / f"{name}{pid}.log", "w+")  # noqa: SIM115 (closed in exit)
            self.logs.append(log)
            self.procs.append(subprocess.Popen(
                [sys.executable, str(script), "--process-id", str(pid), "--num-processes",
                 str(processes), "--coordinator", coordinator, "--local-devices",
                 str(local_devices), *args],
                env=worker_env(local_devices), stdout=log, stderr=subprocess.STDOUT))

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        for log in self.logs:
            log.close()

    def tail(self, pid: int, lines: int = 60) -> str:
        """The last ``lines`` of worker ``pid``'s output, without absl's I/W log lines."""
        log = self.logs[pid]
        log.flush()
        log.seek(0)
        return "".join(line for line in log.readlines()[-lines:]
                       if not line.startswith(("I1", "W1")))

    def wait(self, timeout_s: float) -> None:
        """Waits until every worker has exited with status 0; fails the test at once when one
        exits otherwise, or after ``timeout_s`` seconds, showing that worker's output."""
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in self.procs):
            failed = [pid for pid, p in enumerate(self.procs) if p.poll() not in (None, 0)]
            if failed:
                pid = failed[0]
                pytest.fail(f"worker {pid} exited with {self.procs[pid].returncode}:\n"
                            f"{self.tail(pid)}")
            if time.monotonic() > deadline:
                pid = next(pid for pid, p in enumerate(self.procs) if p.poll() is None)
                pytest.fail(f"worker {pid} did not finish within {timeout_s} s:\n"
                            f"{self.tail(pid)}")
            time.sleep(0.2)
        for pid, proc in enumerate(self.procs):
            if proc.returncode != 0:
                pytest.fail(f"worker {pid} exited with {proc.returncode}:\n{self.tail(pid)}")
