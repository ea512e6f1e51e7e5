"""SIGKILL during saves: the latest complete checkpoint restores exactly; nothing is damaged."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from optstate import checkpoint

from tests.checkpoint._crash_worker import make_state

WORKER = Path(__file__).parent / "_crash_worker.py"
START_TIMEOUT = 120.0  # JAX and Orbax imports on a loaded 2-core machine


def _bits(tree):
    out = []
    for x in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        host = np.asarray(x)
        out.append((str(host.dtype), host.shape, host.tobytes()))
    return out


def _run_until(directory: Path, mode: str, wanted: str, extra_delay: float) -> list[str]:
    """Starts the worker, waits for the line ``wanted``, waits ``extra_delay`` seconds more
    (reading lines), SIGKILLs it and returns the lines it printed."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen([sys.executable, str(WORKER), str(directory), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                            text=True, bufsize=1)
    lines: list[str] = []
    try:
        deadline, kill_at = time.monotonic() + START_TIMEOUT, None
        while True:
            now = time.monotonic()
            if kill_at is not None and now >= kill_at:
                break
            if now >= deadline:
                pytest.fail(f"worker ({mode}) did not print {wanted!r} in time; got {lines}")
            wait = (kill_at if kill_at is not None else deadline) - now
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, min(wait, 1.0)))
            if ready:
                line = proc.stdout.readline()
                if not line:
                    pytest.fail(f"worker ({mode}) exited with {proc.wait()}; got {lines}")
                lines.append(line.strip())
                if line.strip() == wanted and kill_at is None:
                    kill_at = time.monotonic() + extra_delay
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        # lines already written before the kill
        rest = proc.stdout.read()
        lines.extend(x.strip() for x in rest.splitlines() if x.strip())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdout.close()
    return lines


def _check_all_visible_steps_exact(directory: Path, at_least: int) -> int:
    steps = checkpoint.all_steps(directory)
    assert steps and steps[-1] >= at_least, (steps, at_least)
    target = jax.eval_shape(lambda: make_state(0))
    for step in steps:
        restored = checkpoint.restore(directory, step, target=target)
        assert _bits(restored) == _bits(make_state(step)), f"step {step} restored wrongly"
        assert checkpoint.read_metadata(directory, step) == {"step": step}
    return steps[-1]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_during_a_save_loop_leaves_exact_checkpoints(tmp_path, mode):
    delay = random.Random(mode).uniform(0.05, 0.4)  # lands anywhere in a save, reproducibly
    lines = _run_until(tmp_path, mode, "committed 3", delay)
    committed = max(int(line.split()[1]) for line in lines if line.startswith("committed"))
    latest = _check_all_visible_steps_exact(tmp_path, committed)
    assert checkpoint.latest_step(tmp_path) == latest
    assert len(checkpoint.all_steps(tmp_path)) <= 4  # keep=3, plus one whose removal was cut
    # the directory stays usable: the next save (the step the worker was writing) commits and
    # replaces the dead worker's temporary directory
    checkpoint.save(tmp_path, latest + 1, make_state(latest + 1), metadata={"step": latest + 1})
    assert checkpoint.incomplete_saves(tmp_path) == []
    _check_all_visible_steps_exact(tmp_path, latest + 1)


def test_sigkill_just_before_the_commit_rename(tmp_path):
    lines = _run_until(tmp_path, "hang", "about to commit 3", 0.0)
    assert "committed 2" in lines
    # step 3 was fully written (arrays and sidecar) but not renamed: it is invisible
    leftovers = checkpoint.incomplete_saves(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith("step_3.orbax-checkpoint-tmp")
    assert (tmp_path / leftovers[0] / "optstate" / "metadata").is_file()
    assert checkpoint.all_steps(tmp_path) == [1, 2]
    assert checkpoint.latest_step(tmp_path) == 2
    _check_all_visible_steps_exact(tmp_path, 2)
    # saving step 3 again works and replaces the dead process's temporary directory
    checkpoint.save(tmp_path, 3, make_state(3), metadata={"step": 3})
    assert checkpoint.incomplete_saves(tmp_path) == []
    _check_all_visible_steps_exact(tmp_path, 3)


def test_resume_example_trajectories_coincide(tmp_path):
    """examples/resume.py (fp32 moments, short run): killed child, resumed run, same bits."""
    example = Path(__file__).resolve().parents[2] / "examples" / "resume.py"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run(
        [sys.executable, str(example), "--format", "fp32", "--steps", "30", "--save-every", "5",
         "--kill-after", "17", "--step-time", "0.1", "--dir", str(tmp_path / "ckpt")],
        env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "losses identical to the uninterrupted run: True" in result.stdout
    assert "final parameters and optimizer state bit-identical: True" in result.stdout
    restored_from = int(result.stdout.split("restored step ")[1].split()[0])
    assert 5 <= restored_from < 30 and restored_from % 5 == 0  # resumed mid-run


def test_an_observer_listing_during_saves_sees_only_complete_steps(tmp_path):
    """While a worker saves in a loop (asynchronously, keep=3), this process lists the
    directory and restores what it lists: every listed step restores exactly, or has been
    removed by keep= meanwhile (then it is no longer listed); never a partial step."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), "async"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    target = jax.eval_shape(lambda: make_state(0))
    checked: set[int] = set()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while len(checked) < 4:
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail(f"observed only steps {sorted(checked)} (worker: {proc.poll()})")
            for step in checkpoint.all_steps(tmp_path):
                try:
                    restored = checkpoint.restore(tmp_path, step, target=target)
                except checkpoint.CheckpointError:
                    assert step not in checkpoint.all_steps(tmp_path), step
                    continue
                assert _bits(restored) == _bits(make_state(step)), f"step {step}"
                checked.add(step)
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(timeout=30)
