"""Checkpoints of a 2-process x 4-device job (jax.distributed on 127.0.0.1, gloo).

The worker (``_multiprocess_worker.py``) saves collectively; this process (8 emulated devices)
and a 4-device subprocess restore. Every subprocess is bounded in time and killed in a
``finally``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from optstate import checkpoint
from optstate.checkpoint import CheckpointError
from tests import helpers
from tests.checkpoint import _multiprocess_worker as worker

WORKER = Path(__file__).with_name("_multiprocess_worker.py")
ROOT = Path(__file__).resolve().parents[2]
PROCESSES, LOCAL_DEVICES = 2, 4
TIMEOUT_S = 240  # per worker launch (imports and compiles on a loaded 2-core machine)
LOOP_TIMEOUT_S = 10  # checkpoint timeout of the survivor in the kill test


def _start(directory: Path, mode: str) -> helpers.Workers:
    return helpers.Workers(WORKER, ["--dir", str(directory), "--mode", mode, "--timeout",
                                    str(LOOP_TIMEOUT_S)],
                           processes=PROCESSES, local_devices=LOCAL_DEVICES,
                           log_dir=directory.parent, name=mode)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """Steps 3 and 5 of stage-1 int8 AdamW (stochastic rounding), saved by 2 processes."""
    directory = tmp_path_factory.mktemp("two_process") / "ckpt"
    with _start(directory, "train") as workers:
        workers.wait(TIMEOUT_S)
    return directory


@pytest.mark.timeout(TIMEOUT_S * 2)
def test_two_process_save_restores_bit_identically_on_8_devices(saved):
    assert checkpoint.all_steps(saved) == [3, 5]
    description = checkpoint.describe(saved, 3)
    sharded = [leaf for leaf in description["leaves"] if leaf.get("sharding", {}).get("spec")
               and leaf["sharding"]["spec"][0] == "data"]
    assert sharded and all(leaf["sharding"]["mesh"] == {"data": 8} for leaf in sharded)
    assert checkpoint.read_metadata(saved, 3) == {"step": 3}
    assert worker.restore_and_continue(str(saved)) == []


@pytest.mark.timeout(TIMEOUT_S * 2)
def test_two_process_save_restores_bit_identically_on_4_devices(saved):
    code = ("import sys; from tests.checkpoint._multiprocess_worker import "
            "restore_and_continue as r; p = r(sys.argv[1]); print(p or 'OK'); "
            "sys.exit(1 if p else 0)")
    result = subprocess.run([sys.executable, "-c", code, str(saved)], cwd=ROOT,
                            env=helpers.worker_env(4), capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), (
        result.stdout + result.stderr[-3000:])


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_data_file_of_a_two_process_checkpoint_is_detected(saved, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    files = [p for p in (copy / "step_3" / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 2]
    biggest.write_bytes(bytes(data))
    _, p_sh, s_sh, _, tx, params_np, _ = worker._setup()
    abstract = jax.eval_shape(lambda: {"params": params_np, "opt": tx.init(params_np)})
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, {"params": p_sh, "opt": s_sh})
    with pytest.raises(CheckpointError, match=r"step 3(, leaf .*: checksum mismatch|.*damaged)"):
        checkpoint.restore(copy, 3, target=target)
    # the intact original still restores
    assert checkpoint.restore(saved, 3, target=target) is not None


def _bits(tree) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


@pytest.mark.timeout(TIMEOUT_S * 2)
@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_losing_one_process_during_saves_bounds_the_survivor(tmp_path, how):
    """Process 1 is killed (its sockets close: gloo fails at once) or stopped (it holds its
    sockets open and never answers: only the time bound helps) during a loop of saves:
    process 0 reports a CheckpointError within its timeout (10 s here) instead of waiting at
    a barrier for minutes, and every visible step restores bit for bit."""
    directory = tmp_path / "ckpt"
    with _start(directory, "loop") as workers:
        procs = workers.procs
        deadline = time.monotonic() + TIMEOUT_S
        while "committed 2" not in workers.tail(0):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                pytest.fail(f"the save loop did not reach step 2:\n{workers.tail(0)}")
            time.sleep(0.1)
        time.sleep(0.3)  # somewhere in a later save
        os.kill(procs[1].pid, getattr(signal, how))
        killed_at = time.monotonic()
        try:
            code = procs[0].wait(timeout=LOOP_TIMEOUT_S + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the survivor still waits {LOOP_TIMEOUT_S + 60} s after the kill:\n"
                        f"{workers.tail(0)}")
        waited = time.monotonic() - killed_at
        out = workers.tail(0)
    errors = [line for line in out.splitlines() if "CheckpointError:" in line]
    assert code == 3 and errors, out
    assert "step" in errors[0] and str(directory) in errors[0]
    assert "process 0 of 2" in errors[0], errors[0]
    if how == "SIGSTOP":
        assert f"did not finish within {LOOP_TIMEOUT_S} s" in errors[0], errors[0]
        assert waited >= LOOP_TIMEOUT_S - 1, waited
    assert waited < LOOP_TIMEOUT_S + 45, (waited, errors[0])
    steps = checkpoint.all_steps(directory)
    assert steps and steps[-1] >= 2 and len(steps) <= 3, steps
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    for step in steps:
        want = worker.loop_state(step, mesh)
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), want)
        assert _bits(checkpoint.restore(directory, step, target=target)) == _bits(want), step
