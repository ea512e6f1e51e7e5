"""optstate.checkpoint: exact round trips and resumes, integrity, versioning, layout, CLI."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optstate
from optstate import checkpoint
from optstate.checkpoint import CheckpointError, encoding
from optstate.checkpoint.sidecar import _MIGRATIONS, _seal
from tests import helpers

# -------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------


class Pair(NamedTuple):
    first: Any
    second: Any


assert_identical = helpers.assert_trees_identical


def mixed_state() -> dict[str, Any]:
    """A state with every kind of leaf a checkpoint must carry exactly."""
    key = jax.random.key(42)
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "f32": jax.random.normal(k1, (7, 5), jnp.float32),
        "bf16": jax.random.normal(k2, (9,), jnp.bfloat16),
        "fp8": jax.random.normal(k3, (6,), jnp.float32).astype(jnp.float8_e4m3fn),
        "e4m3": jnp.linspace(-3, 3, 7).astype(jnp.float8_e4m3),  # not native to Orbax
        "uint4": jnp.arange(11).astype(jnp.uint4),  # not native to Orbax
        "int4": (jnp.arange(6) - 3).astype(jnp.int4),
        "count": jnp.asarray(17, jnp.int32),
        "uint32": jnp.asarray([0, 2**32 - 1], jnp.uint32),
        "keys": jax.random.split(jax.random.key(7), 3),
        "single_key": jax.random.key(1, impl="rbg"),
        "weak": jnp.asarray(0.25),  # weakly typed, as Python floats become
        "nan_inf": jnp.asarray([np.nan, -np.inf, np.inf, -0.0], jnp.float32),
        "empty": jnp.zeros((0, 3), jnp.float32),
        "numpy": np.arange(4, dtype=np.int32),
        "nested": Pair(first=[jnp.ones((2, 2)), None], second={"z": jnp.zeros((1,), jnp.int8)}),
    }


def abstract(tree: Any) -> Any:
    return jax.eval_shape(lambda: tree)


# -------------------------------------------------------------------------------------------
# round trip, steps, layout
# -------------------------------------------------------------------------------------------


def test_round_trip_is_bit_exact_for_every_leaf_kind(tmp_path):
    state = mixed_state()
    path = checkpoint.save(tmp_path, 3, state, metadata={"note": "mixed"})
    assert path == tmp_path / "step_3" and path.is_dir()
    restored = checkpoint.restore(tmp_path, target=abstract(state))
    expected = jax.tree.map(jnp.asarray, state)  # numpy leaves come back as jax arrays
    assert_identical(restored, expected)
    assert isinstance(restored["nested"], Pair)
    assert restored["nested"].first[1] is None
    assert restored["weak"].weak_type and not restored["f32"].weak_type
    assert str(jax.random.key_impl(restored["single_key"])) == "rbg"
    # a concrete tree works as a target too
    assert_identical(checkpoint.restore(tmp_path, 3, target=state), expected)


def test_weak_arrays_restore_weak_with_their_values_and_sharding(tmp_path):
    """Weak types are restored through public JAX: a weak vector and a weak int scalar."""
    state = {"v": jnp.broadcast_to(jnp.asarray(1.5), (6,)) + 0.25, "i": jnp.asarray(7)}
    assert state["v"].weak_type and state["i"].weak_type
    checkpoint.save(tmp_path, 1, state)
    restored = checkpoint.restore(tmp_path, target=state)
    assert restored["v"].weak_type and restored["i"].weak_type
    assert_identical(restored, state)


def test_weak_type_that_cannot_be_restored_is_an_error_naming_the_leaf(tmp_path):
    """A weakly typed bf16 leaf (JAX makes them internally; no Python scalar gives one) must
    not come back strongly typed silently."""
    from jax._src.lax.lax import _convert_element_type  # only to build such a leaf

    weak_bf16 = _convert_element_type(jnp.ones(3), jnp.dtype(jnp.bfloat16),
                                      weak_type=True)
    assert weak_bf16.weak_type
    checkpoint.save(tmp_path, 1, {"weak": weak_bf16, "f32": jnp.zeros(2)})
    with pytest.raises(CheckpointError,
                       match=r"step 1, leaf \['weak'\]: .*weakly typed.*bfloat16"):
        checkpoint.restore(tmp_path, target={"weak": weak_bf16, "f32": jnp.zeros(2)})


def test_scalar_state_and_state_without_arrays(tmp_path):
    checkpoint.save(tmp_path / "a", 0, jnp.asarray(1.5, jnp.bfloat16))
    got = checkpoint.restore(tmp_path / "a", target=jax.ShapeDtypeStruct((), jnp.bfloat16))
    assert got.dtype == jnp.bfloat16 and float(got) == 1.5
    empty = (optstate.EmptyState(), {"x": None})
    checkpoint.save(tmp_path / "b", 1, empty)
    assert checkpoint.restore(tmp_path / "b", target=empty) == empty


def test_steps_listing_and_selection(tmp_path):
    assert checkpoint.all_steps(tmp_path / "missing") == []
    assert checkpoint.latest_step(tmp_path / "missing") is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        checkpoint.restore(tmp_path / "missing", target={"x": jnp.zeros(2)})
    for step in (3, 7, 10):
        checkpoint.save(tmp_path, step, {"x": jnp.full((2,), step, jnp.int32)})
    (tmp_path / "step_99").mkdir()  # no sidecar: not a checkpoint
    (tmp_path / "notes").mkdir()
    assert checkpoint.all_steps(tmp_path) == [3, 7, 10]
    assert checkpoint.latest_step(tmp_path) == 10
    target = {"x": jax.ShapeDtypeStruct((2,), jnp.int32)}
    assert checkpoint.restore(tmp_path, target=target)["x"].tolist() == [10, 10]
    assert checkpoint.restore(tmp_path, 7, target=target)["x"].tolist() == [7, 7]
    with pytest.raises(CheckpointError, match=r"no complete checkpoint for step 5.*\[3, 7, 10\]"):
        checkpoint.restore(tmp_path, 5, target=target)
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(CheckpointError, match="non-negative integer"):
            checkpoint.save(tmp_path, bad, {"x": jnp.zeros(2)})
    with pytest.raises(CheckpointError, match="only local or POSIX-mounted filesystems"):
        checkpoint.save("gs://bucket/run", 1, {"x": jnp.zeros(2)})


def test_a_step_below_the_latest_is_refused_and_keep_never_deletes_the_new_step(tmp_path):
    """A new run saving step 3 with keep=1 beside an old run's step 5 must not lose step 3
    (today's rule: steps of one directory increase; a lower one is refused, loudly)."""
    checkpoint.save(tmp_path, 5, {"x": jnp.zeros(2)})
    with pytest.raises(CheckpointError, match=r"step 3: the directory already holds step 5, "
                                              r"above 3; steps of one directory must increase"):
        checkpoint.save(tmp_path, 3, {"x": jnp.ones(2)}, keep=1)
    assert checkpoint.all_steps(tmp_path) == [5]
    path = checkpoint.save(tmp_path, 6, {"x": jnp.ones(2)}, keep=1)
    assert path.is_dir() and checkpoint.all_steps(tmp_path) == [6]


def test_existing_step_is_never_overwritten(tmp_path):
    checkpoint.save(tmp_path, 1, {"x": jnp.arange(3.0)})
    with pytest.raises(CheckpointError, match="step 1.*already exists"):
        checkpoint.save(tmp_path, 1, {"x": jnp.zeros(3)})
    got = checkpoint.restore(tmp_path, 1, target={"x": jax.ShapeDtypeStruct((3,), jnp.float32)})
    assert got["x"].tolist() == [0.0, 1.0, 2.0]
    assert checkpoint.incomplete_saves(tmp_path) == []


def test_keep_removes_only_the_oldest_complete_steps(tmp_path):
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, {"x": jnp.full((2,), step)}, keep=2)
        assert checkpoint.all_steps(tmp_path) == list(range(max(1, step - 1), step + 1))
    assert sorted(os.listdir(tmp_path)) == ["step_4", "step_5"]
    with pytest.raises(CheckpointError, match="keep must be a positive integer"):
        checkpoint.save(tmp_path, 6, {"x": jnp.zeros(2)}, keep=0)


def test_filesystem_failures_are_checkpoint_errors_naming_the_path(tmp_path, monkeypatch):
    state = {"x": jnp.zeros(2)}
    (tmp_path / "file").write_text("not a directory")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    cases = [
        (tmp_path / "file", r"step 1: .*file' exists and is not a directory"),
        (tmp_path / "file" / "sub", r"step 1: cannot create .*: Not a directory"),
        (tmp_path / "loop", r"step 1: .*loop' is a symbolic link that does not resolve"),
        (tmp_path / ("x" * 300), r"step 1: cannot create .*: File name too long"),
    ]
    for path, pattern in cases:
        with pytest.raises(CheckpointError, match=pattern):
            checkpoint.save(path, 1, state)
    with pytest.raises(CheckpointError, match=r"loop': Too many levels of symbolic links"):
        checkpoint.all_steps(tmp_path / "loop")
    with pytest.raises(CheckpointError, match=r"file' is not a directory"):
        checkpoint.latest_step(tmp_path / "file")

    def read_only(self, *args, **kwargs):  # (tests run as root, for whom chmod is no barrier)
        raise OSError(30, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(CheckpointError, match=r"step 1: cannot create or write the checkpoint "
                                              r"directory: Read-only file system"):
        checkpoint.save(tmp_path / "ro", 1, state)


def test_metadata_round_trip_and_validation(tmp_path):
    meta = {"lr": 0.001, "run": "exp-1", "sizes": [1, 2], "nested": {"ok": True}}
    checkpoint.save(tmp_path, 2, {"x": jnp.zeros(1)}, metadata=meta)
    assert checkpoint.read_metadata(tmp_path) == meta
    assert checkpoint.read_metadata(tmp_path, 2) == meta
    with pytest.raises(CheckpointError, match="step 3: metadata must be JSON-serializable"):
        checkpoint.save(tmp_path, 3, {"x": jnp.zeros(1)}, metadata={"bad": object()})
    with pytest.raises(CheckpointError, match=r"step 3: metadata must be a mapping .*got list"):
        checkpoint.save(tmp_path, 3, {"x": jnp.zeros(1)}, metadata=[1, 2])
    with pytest.raises(CheckpointError, match=r"step 3: metadata keys must be strings .*int key "
                                              r"1 at metadata\['outer'\]"):
        checkpoint.save(tmp_path, 3, {"x": jnp.zeros(1)}, metadata={"outer": {1: "a"}})
    assert checkpoint.all_steps(tmp_path) == [2]
    assert checkpoint.incomplete_saves(tmp_path) == []


def test_non_array_leaf_is_rejected_with_its_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"step 0, leaf \['opt'\]\['name'\].*got str"):
        checkpoint.save(tmp_path, 0, {"opt": {"name": "adam", "x": jnp.zeros(1)}})
    assert checkpoint.all_steps(tmp_path) == []


def test_deleted_buffer_is_reported_with_its_path(tmp_path):
    x = jnp.ones(4)
    x.delete()
    with pytest.raises(CheckpointError, match=r"leaf \['w'\]: cannot read the array"):
        checkpoint.save(tmp_path, 0, {"w": x})
    assert checkpoint.all_steps(tmp_path) == [] and checkpoint.incomplete_saves(tmp_path) == []


def test_sidecar_records_versions_and_tree_description(tmp_path):
    state = {"mu": jnp.zeros((4, 2), jnp.bfloat16), "count": jnp.zeros((), jnp.int32)}
    checkpoint.save(tmp_path, 5, state)
    sidecar = json.loads((tmp_path / "step_5" / "optstate" / "metadata").read_text())
    assert sidecar["format_version"] == checkpoint.FORMAT_VERSION
    assert sidecar["optstate_version"] == optstate.__version__
    assert sidecar["step"] == 5
    described = [(leaf["path"], leaf["shape"], leaf["dtype"], leaf["format"], leaf["nbytes"])
                 for leaf in sidecar["leaves"]]
    assert described == [("['count']", [], "int32", "int32", 4),
                         ("['mu']", [4, 2], "bfloat16", "bf16", 16)]
    assert sidecar["total_bytes"] == 20
    assert _seal(sidecar) == sidecar  # sealed with its own checksum
    assert checkpoint.describe(tmp_path) == sidecar


# -------------------------------------------------------------------------------------------
# integrity
# -------------------------------------------------------------------------------------------


def _corruptible_state():
    return {
        "big": jax.random.normal(jax.random.key(0), (6000,), jnp.float32),
        "small": jnp.arange(5, dtype=jnp.int32),
        "count": jnp.asarray(3, jnp.int32),
    }


def test_flipped_byte_in_the_array_data_names_step_and_leaf(tmp_path):
    state = _corruptible_state()
    checkpoint.save(tmp_path, 3, state)
    files = [p for p in (tmp_path / "step_3" / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)  # holds the random 24 kB leaf
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0x01
    biggest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step 3, leaf \['big'\]") as info:
        checkpoint.restore(tmp_path, target=abstract(state))
    assert "Traceback" not in str(info.value)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_any_damaged_file_raises_or_restores_exact_values(tmp_path, damage):
    """Whatever file of the checkpoint is damaged, restore never returns altered values."""
    state = _corruptible_state()
    checkpoint.save(tmp_path / "orig", 3, state)
    files = sorted(p.relative_to(tmp_path / "orig")
                   for p in (tmp_path / "orig").rglob("*") if p.is_file())
    assert any(f.parts[-2:] == ("optstate", "metadata") for f in files)
    raised = 0
    for rel in files:
        copy = tmp_path / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(tmp_path / "orig", copy)
        data = bytearray((copy / rel).read_bytes())
        if not data:
            continue
        if damage == "flip":
            data[len(data) // 2] ^= 0x20
        else:
            data = data[: len(data) // 2]
        (copy / rel).write_bytes(bytes(data))
        try:
            got = checkpoint.restore(copy, target=abstract(state))
        except CheckpointError as e:
            assert "step 3" in str(e), (rel, str(e))
            raised += 1
        else:
            assert_identical(got, state)
    assert raised >= 3  # at least the sidecar, the manifest and the data file


def test_tampered_checksum_and_missing_arrays(tmp_path):
    state = _corruptible_state()
    checkpoint.save(tmp_path, 4, state)
    sidecar_path = tmp_path / "step_4" / "optstate" / "metadata"
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["leaves"][2]["checksum"] = "0" * 16  # ['small']
    sidecar_path.write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match=r"step 4: optstate/metadata does not match its"):
        checkpoint.restore(tmp_path, target=abstract(state))
    sidecar_path.write_text(json.dumps(_seal(sidecar)))  # a consistent forgery
    with pytest.raises(CheckpointError, match=r"step 4, leaf \['small'\]: checksum mismatch"):
        checkpoint.restore(tmp_path, target=abstract(state))
    # verify=False skips the comparison (and returns the stored values)
    got = checkpoint.restore(tmp_path, target=abstract(state), verify=False)
    assert_identical(got, state)
    shutil.rmtree(tmp_path / "step_4" / "state")
    with pytest.raises(CheckpointError, match=r"step 4"):
        checkpoint.restore(tmp_path, target=abstract(state))
    sidecar_path.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"step 4: cannot read optstate/metadata"):
        checkpoint.restore(tmp_path, target=abstract(state))


def test_target_mismatches_name_the_first_differing_path(tmp_path):
    state = {"opt": {"mu": jnp.zeros((4, 3)), "nu": jnp.zeros((4, 3))},
             "count": jnp.zeros((), jnp.int32), "key": jax.random.key(0)}
    checkpoint.save(tmp_path, 8, state)
    t = abstract(state)

    def bad(**changes):
        tree = {**t, "opt": {**t["opt"]}}
        for name, value in changes.items():
            if name in ("mu", "nu"):
                tree["opt"][name] = value
            else:
                tree[name] = value
        return tree

    cases = [
        (bad(mu=jax.ShapeDtypeStruct((4, 4), jnp.float32)),
         r"step 8: .*leaf \['opt'\]\['mu'\]: shape was saved as \(4, 3\), the target has \(4, 4\)"),
        (bad(nu=jax.ShapeDtypeStruct((4, 3), jnp.bfloat16)),
         r"leaf \['opt'\]\['nu'\]: dtype was saved as float32, the target has bfloat16"),
        (bad(count=jax.ShapeDtypeStruct((), jnp.float32)),
         r"leaf \['count'\]: dtype was saved as int32"),
        (bad(key=jax.eval_shape(lambda: jax.random.key(0, impl="rbg"))),
         r"leaf \['key'\]: dtype was saved as key<fry>, the target has key<rbg>"),
        ({**t, "extra": jax.ShapeDtypeStruct((1,), jnp.float32)},
         r"leaf #1 is \['key'\] in the checkpoint but \['extra'\] in the target"),
        ({**t, "opt": {"mu": t["opt"]["mu"]}},
         r"first missing leaf in the target: \['opt'\]\['nu'\]"),
        ({**t, "zz": jax.ShapeDtypeStruct((1,), jnp.float32)},
         r"first extra leaf in the target: \['zz'\]"),
        ({**t, "opt": Pair(t["opt"]["mu"], t["opt"]["nu"])},
         r"\['opt'\]\['mu'\] in the checkpoint but \['opt'\]\.first in the target"),
        ({**t, "count": "int32"}, r"target leaf \['count'\] is str"),
    ]
    for target, pattern in cases:
        with pytest.raises(CheckpointError, match=pattern):
            checkpoint.restore(tmp_path, target=target)


def test_nothing_is_unpickled(tmp_path, monkeypatch):
    state = mixed_state()
    checkpoint.save(tmp_path, 1, state, metadata={"a": 1})

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling during restore")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    got = checkpoint.restore(tmp_path, target=abstract(state))
    assert_identical(got, jax.tree.map(jnp.asarray, state))
    for path in (tmp_path / "step_1").rglob("*"):
        if path.is_file():
            assert not path.read_bytes().startswith(b"\x80"), f"{path} looks like a pickle"


# -------------------------------------------------------------------------------------------
# versioning
# -------------------------------------------------------------------------------------------


def _set_format_version(directory: Path, step: int, version: int, **extra) -> None:
    path = directory / f"step_{step}" / "optstate" / "metadata"
    sidecar = json.loads(path.read_text())
    sidecar["format_version"] = version
    sidecar.update(extra)
    if version < 1:
        del sidecar["sidecar_sha256"]  # version 0 (fabricated) had no self-checksum
    else:
        sidecar = _seal(sidecar)
    path.write_text(json.dumps(sidecar))


def test_older_format_without_migration_fails_clearly(tmp_path):
    state = {"x": jnp.arange(3.0)}
    checkpoint.save(tmp_path, 2, state)
    _set_format_version(tmp_path, 2, 0, optstate_version="0.0.1")
    with pytest.raises(CheckpointError,
                       match=r"step 2: written with checkpoint format version 0 \(optstate 0\.0\.1"
                             r"\).*no migration from version 0"):
        checkpoint.restore(tmp_path, target=abstract(state))


def test_older_format_is_migrated(tmp_path, monkeypatch):
    """A fabricated older sidecar (leaf key "checksums" instead of "checksum") is migrated."""
    old_version = checkpoint.FORMAT_VERSION - 1
    state = {"x": jnp.arange(3.0), "n": jnp.asarray(4, jnp.int32)}
    checkpoint.save(tmp_path, 2, state)
    path = tmp_path / "step_2" / "optstate" / "metadata"
    sidecar = json.loads(path.read_text())
    for leaf in sidecar["leaves"]:
        leaf["checksums"] = {"mix": leaf.pop("checksum")}
    sidecar["format_version"] = old_version
    path.write_text(json.dumps(_seal(sidecar)))

    def upgrade(old):
        new = dict(old, format_version=old_version + 1)
        new["leaves"] = [
            {k: v for k, v in dict(leaf, checksum=leaf["checksums"]["mix"]).items()
             if k != "checksums"} for leaf in old["leaves"]
        ]
        return new

    with pytest.raises(CheckpointError, match=f"no migration from version {old_version}"):
        checkpoint.restore(tmp_path, target=abstract(state))

    monkeypatch.setitem(_MIGRATIONS, old_version, upgrade)
    assert_identical(checkpoint.restore(tmp_path, target=abstract(state)), state)

    monkeypatch.setitem(_MIGRATIONS, old_version, lambda old: dict(old))  # forgets the bump
    with pytest.raises(CheckpointError, match=f"did not produce version {old_version + 1}"):
        checkpoint.restore(tmp_path, target=abstract(state))


def test_checkpoints_of_format_version_1_are_refused_clearly(tmp_path):
    """Format 1 (before Orbax's CheckpointManager): step_<N>/optstate.json beside arrays/."""
    (tmp_path / "step_4" / "arrays").mkdir(parents=True)
    (tmp_path / "step_4" / "optstate.json").write_text('{"format_version": 1}')
    assert checkpoint.all_steps(tmp_path) == []
    for step in (None, 4):
        with pytest.raises(CheckpointError, match=r"format version 1 .*restore them with the "
                                                  r"optstate version that wrote them"):
            checkpoint.restore(tmp_path, step, target={"x": jnp.zeros(2)})


def test_newer_format_asks_for_an_upgrade(tmp_path):
    state = {"x": jnp.arange(3.0)}
    checkpoint.save(tmp_path, 1, state)
    _set_format_version(tmp_path, 1, checkpoint.FORMAT_VERSION + 1)
    with pytest.raises(CheckpointError, match="Upgrade optstate"):
        checkpoint.restore(tmp_path, target=abstract(state))


def test_edited_or_renamed_checkpoint_is_detected(tmp_path):
    state = {"x": jnp.arange(3.0)}
    checkpoint.save(tmp_path, 1, state, metadata={"lr": 0.5})
    path = tmp_path / "step_1" / "optstate" / "metadata"
    path.write_text(path.read_text().replace("0.5", "0.7"))  # metadata silently edited
    with pytest.raises(CheckpointError, match="does not match its own checksum"):
        checkpoint.read_metadata(tmp_path)
    path.write_text(path.read_text().replace("0.7", "0.5"))
    shutil.copytree(tmp_path / "step_1", tmp_path / "step_2")
    with pytest.raises(CheckpointError, match="step_2 holds a checkpoint saved as step 1"):
        checkpoint.restore(tmp_path, target=abstract(state))


# -------------------------------------------------------------------------------------------
# crash leftovers, async
# -------------------------------------------------------------------------------------------


def test_saves_in_progress_are_invisible_and_never_removed_by_listing(tmp_path):
    """Orbax's temporary directories (a save in flight here or on another host, or killed)
    are not steps; listing, describing and saving other steps leave them alone."""
    checkpoint.save(tmp_path, 1, {"x": jnp.zeros(2)})
    shutil.copytree(tmp_path / "step_1", tmp_path / "step_2.orbax-checkpoint-tmp")
    shutil.copytree(tmp_path / "step_1", tmp_path / "step_9.orbax-checkpoint-tmp-1234")
    leftovers = ["step_2.orbax-checkpoint-tmp", "step_9.orbax-checkpoint-tmp-1234"]
    assert checkpoint.all_steps(tmp_path) == [1] and checkpoint.latest_step(tmp_path) == 1
    assert checkpoint.incomplete_saves(tmp_path) == leftovers
    checkpoint.describe(tmp_path)
    checkpoint.save(tmp_path, 5, {"x": jnp.ones(2)})
    assert checkpoint.all_steps(tmp_path) == [1, 5]
    assert checkpoint.incomplete_saves(tmp_path) == leftovers


def test_async_save_commits_in_the_background(tmp_path):
    state = {"w": jax.random.normal(jax.random.key(1), (256, 64)), "n": jnp.asarray(2, jnp.int32)}
    expected = jax.tree.map(lambda x: np.asarray(x).copy(), state)
    path = checkpoint.save(tmp_path, 1, state, asynchronous=True, metadata={"m": 1})
    for x in jax.tree.leaves(state):
        x.delete()  # the train step may donate the buffers right away
    checkpoint.wait_until_finished()
    assert path.is_dir() and checkpoint.all_steps(tmp_path) == [1]
    got = checkpoint.restore(tmp_path, target=jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), expected))
    assert_identical(got, jax.tree.map(jnp.asarray, expected))
    # consecutive async saves: each waits for the previous one; keep applies
    for step in (2, 3, 4):
        checkpoint.save(tmp_path, step, {"w": jnp.full((3,), step)}, asynchronous=True, keep=2)
    checkpoint.wait_until_finished()
    assert checkpoint.all_steps(tmp_path) == [3, 4]
    checkpoint.wait_until_finished()  # nothing pending: returns


def test_async_failure_surfaces_and_commits_nothing(tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import atomicity

    async def broken(self, *args, **kwargs):  # the commit (rename) of Orbax's background save
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", broken)
    checkpoint.save(tmp_path, 1, {"x": jnp.zeros(2)}, asynchronous=True)
    with pytest.raises(CheckpointError, match="asynchronous save to .* failed.*No space left"):
        checkpoint.wait_until_finished()
    assert checkpoint.all_steps(tmp_path) == []
    checkpoint.wait_until_finished()  # the error is reported once


# -------------------------------------------------------------------------------------------
# sharding in one process (8 emulated devices)
# -------------------------------------------------------------------------------------------


def _stage1(mesh, tree):
    """ZeRO stage-1 placement: first dimension divisible by the data axis is sharded."""
    n = mesh.shape["data"]

    def one(x):
        if x.ndim and x.shape[0] % n == 0:
            return NamedSharding(mesh, P("data"))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, tree)


def test_sharded_save_restores_onto_other_layouts(tmp_path):
    mesh8 = jax.make_mesh((8,), ("data",))
    state = {"mu": jax.random.normal(jax.random.key(0), (16, 3)),
             "nu": jax.random.uniform(jax.random.key(1), (8,)),
             "odd": jnp.arange(5.0), "count": jnp.asarray(9, jnp.int32)}
    shardings = _stage1(mesh8, state)
    sharded = jax.device_put(state, shardings)
    checkpoint.save(tmp_path, 1, sharded)

    sidecar = checkpoint.describe(tmp_path)
    assert sidecar["leaves"][1]["sharding"] == {"mesh": {"data": 8}, "spec": ["data"]}

    mesh24 = jax.make_mesh((2, 4), ("x", "data"))
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
            mesh24, P("data") if x.ndim and x.shape[0] % 4 == 0 else P())), state)
    got = checkpoint.restore(tmp_path, target=target)
    assert_identical(got, state)
    assert got["mu"].sharding == target["mu"].sharding
    assert got["mu"].addressable_shards[0].data.shape == (4, 3)
    # an abstract target from jax.eval_shape of the sharded state (AbstractMesh) is laid out
    # on a concrete mesh of the same shape
    got = checkpoint.restore(tmp_path, target=jax.eval_shape(lambda: sharded))
    assert_identical(got, state)
    assert got["mu"].sharding.spec[0] == "data" and len(got["mu"].sharding.device_set) == 8
    # no sharding in the target: the first device
    got = checkpoint.restore(tmp_path, target=abstract(state))
    assert got["mu"].sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])


# -------------------------------------------------------------------------------------------
# exact resume for every transform
# -------------------------------------------------------------------------------------------

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 48, dtype=jnp.float32).reshape(6, 8),
          "b": jnp.linspace(0.5, -0.5, 8, dtype=jnp.float32)}
STEPS, SAVE_AT = 6, 3


def _grads(params, t, nan_at):
    noise = jax.tree.map(
        lambda p, i: jax.random.normal(jax.random.fold_in(jax.random.key(i), t), p.shape),
        params, {"b": 0, "w": 1})
    grads = jax.tree.map(lambda p, n: 0.5 * p + n, params, noise)
    if nan_at is not None:
        grads = jax.tree.map(lambda g: jnp.where(t == nan_at, jnp.nan, g), grads)
    return grads


def _lr_halved(state):
    """Changes an injected hyperparameter between steps (it must be checkpointed)."""
    hyper = dict(state.hyperparams)
    hyper["learning_rate"] = hyper["learning_rate"] * 0.5
    return state._replace(hyperparams=hyper)


def _quantize_state():
    """``optstate.quantize_state`` (or its module while it is not yet re-exported)."""
    fn = getattr(optstate, "quantize_state", None)
    if fn is None:
        try:
            from optstate.quantization.wrapper import quantize_state as fn
        except ImportError:
            return None
    return fn


def _cases():
    os_ = optstate
    cases = {
        "optax_adam": lambda: __import__("optax").adam(1e-2),
        "sgd": lambda: os_.sgd(0.1),
        "sgd_nesterov": lambda: os_.sgd(0.1, momentum=0.9, nesterov=True),
        "adam": lambda: os_.adam(1e-2),
        "adamw": lambda: os_.adamw(1e-2, weight_decay=0.1),
        "adam_l2": lambda: os_.adam_l2(1e-2, weight_decay=0.1),
        "rmsprop": lambda: os_.rmsprop(1e-2),
        "adagrad": lambda: os_.adagrad(1e-2),
        "adadelta": lambda: os_.adadelta(1.0),
        "lamb": lambda: os_.lamb(1e-2),
        "lion": lambda: os_.lion(1e-3),
        "adafactor": lambda: os_.adafactor(1e-2),
        "chain_clip_adam": lambda: os_.chain(os_.clip_by_global_norm(1.0), os_.adam(1e-2)),
        "named_chain": lambda: os_.named_chain(("clip", os_.clip(0.5)), ("opt", os_.adam(1e-2))),
        "inject_hyperparams": lambda: os_.inject_hyperparams(os_.adamw)(
            learning_rate=os_.schedules.linear(1e-2, 1e-3, 10), weight_decay=0.05),
        "inject_hyperparams_changed": lambda: os_.inject_hyperparams(os_.adam)(learning_rate=1e-2),
        "apply_if_finite": lambda: os_.apply_if_finite(os_.adam(1e-2), 3),
        "masked": lambda: os_.masked(os_.adam(1e-2), {"w": True, "b": False}),
        "partition": lambda: os_.partition({"a": os_.adam(1e-2), "f": os_.set_to_zero()},
                                           {"w": "a", "b": "f"}),
        "reset_every_n": lambda: os_.reset_every_n(os_.adam(1e-2), 2),
        "adaptive_reset": lambda: os_.adaptive_reset(os_.adam(1e-2), b2=0.999),
    }
    quant = _quantize_state()
    for fmt in ("int8", "int4", "fp8_e4m3", "bf16"):
        cases[f"quantize_{fmt}_stochastic"] = (
            lambda fmt=fmt: quant(os_.adam(1e-2), fmt, rounding="stochastic", seed=3,
                                  min_size=1, block_size=8))
    cases["quantize_int8_reset"] = lambda: os_.reset_every_n(
        quant(os_.adam(1e-2), "int8", min_size=1, block_size=8), 2)
    track = getattr(getattr(optstate, "staleness", None), "track_staleness", None)
    cases["track_staleness"] = lambda: track(quant(os_.adam(1e-2), "bf16", min_size=1))
    return cases


def _available(name):
    if name.startswith("quantize"):
        return _quantize_state() is not None
    if name == "track_staleness":
        return _quantize_state() is not None and hasattr(optstate.staleness, "track_staleness")
    if name == "adaptive_reset":
        return hasattr(optstate, "adaptive_reset")
    return True


_CASES = _cases()


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.skipif(not _available(n), reason=f"{n} not in optstate"))
    for n in _CASES])
def test_exact_resume(tmp_path, name):
    """Saving after 3 steps, restoring into a fresh abstract tree and running 3 more steps
    gives bit-identical parameters and state to 6 uninterrupted steps."""
    tx = _CASES[name]()
    nan_at = 1 if name == "apply_if_finite" else None

    # one compile: restored arrays look like the originals (helpers.jit_traced_once)
    @helpers.jit_traced_once
    def step(params, opt_state, t):
        grads = _grads(params, t, nan_at)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optstate.apply_updates(params, updates), opt_state

    def run(params, opt_state, start, stop):
        for t in range(start, stop):
            if name == "inject_hyperparams_changed" and t == 2:
                opt_state = _lr_halved(opt_state)
            params, opt_state = step(params, opt_state, jnp.asarray(t, jnp.int32))
        return params, opt_state

    # committed to device 0 like restored arrays, so that the step compiles once
    params0 = jax.device_put(PARAMS, jax.devices()[0])
    straight = run(params0, jax.device_put(tx.init(PARAMS), jax.devices()[0]), 0, STEPS)

    first = run(params0, jax.device_put(tx.init(PARAMS), jax.devices()[0]), 0, SAVE_AT)
    checkpoint.save(tmp_path, SAVE_AT, {"params": first[0], "opt": first[1]})
    del first
    target = jax.eval_shape(lambda: {"params": PARAMS, "opt": tx.init(PARAMS)})
    restored = checkpoint.restore(tmp_path, target=target)
    resumed = run(restored["params"], restored["opt"], SAVE_AT, STEPS)

    assert_identical(resumed, straight)
    # the run is not trivial: the parameters moved (for apply_if_finite, despite a skip)
    assert not np.array_equal(np.asarray(straight[0]["w"]), np.asarray(PARAMS["w"]))


def test_flax_nnx_optimizer_round_trip_and_resume(tmp_path):
    from flax import nnx

    tx = optstate.adamw(1e-2, weight_decay=0.1)

    def make():
        model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    x = jnp.linspace(-1, 1, 20).reshape(5, 4)
    y = jnp.linspace(0, 1, 15).reshape(5, 3)

    @nnx.jit
    def train_step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)

    model_a, opt_a = make()
    for _ in range(5):
        train_step(model_a, opt_a)

    model_b, opt_b = make()
    for _ in range(2):
        train_step(model_b, opt_b)
    saved = {"model": nnx.state(model_b), "opt": nnx.state(opt_b)}
    checkpoint.save(tmp_path, 2, saved)

    model_c, opt_c = make()  # fresh objects, as after a restart
    target = jax.eval_shape(lambda: {"model": nnx.state(model_c), "opt": nnx.state(opt_c)})
    restored = checkpoint.restore(tmp_path, target=target)
    assert_identical(restored, saved)
    nnx.update(model_c, restored["model"])
    nnx.update(opt_c, restored["opt"])
    assert int(opt_c.step[...]) == 2
    for _ in range(3):
        train_step(model_c, opt_c)
    assert_identical(nnx.state(model_c), nnx.state(model_a))
    assert_identical(nnx.state(opt_c), nnx.state(opt_a))


# -------------------------------------------------------------------------------------------
# CLI
# -------------------------------------------------------------------------------------------


def _inspect(*argv: str) -> tuple[int, str]:
    from optstate import cli

    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main(["inspect", *argv])
    return code, out.getvalue()


def test_cli_inspect_lists_steps_leaves_totals_and_metadata(tmp_path, capsys):
    state = {"params": {"w": jnp.zeros((4, 3))},
             "opt": {"mu": jnp.zeros((4, 3), jnp.bfloat16), "count": jnp.zeros((), jnp.int32)}}
    checkpoint.save(tmp_path, 1, state)
    checkpoint.save(tmp_path, 2, state, metadata={"lr": 0.5, "run": "demo"})
    code, text = _inspect(str(tmp_path))
    assert code == 0
    assert "steps: 1, 2 (latest 2)" in text
    lines = {line.split()[0]: line.split() for line in text.splitlines()
             if line.startswith("['")}
    assert lines["['params']['w']"][1:] == ["(4,", "3)", "fp32", "48"]
    assert lines["['opt']['mu']"][1:] == ["(4,", "3)", "bf16", "24"]
    assert lines["['opt']['count']"][1:] == ["()", "int32", "4"]
    assert "total: 3 leaves, 25 elements, 76 bytes" in text
    assert 'metadata: {"lr": 0.5, "run": "demo"}' in text
    assert f"optstate {optstate.__version__}" in text

    code, text = _inspect(str(tmp_path), "--step", "1", "--json")
    data = json.loads(text)
    assert code == 0 and data["steps"] == [1, 2] and data["description"]["step"] == 1
    assert data["total_bytes"] == 76 and data["description"]["metadata"] == {}

    code, _ = _inspect(str(tmp_path), "--step", "7")
    assert code == 2 and "no complete checkpoint for step 7" in capsys.readouterr().err
    code, _ = _inspect(str(tmp_path / "nothing"))
    assert code == 2 and "no complete checkpoint" in capsys.readouterr().err


@pytest.mark.skipif(_quantize_state() is None, reason="quantize_state not yet")
def test_cli_inspect_shows_quantized_formats(tmp_path):
    quantize_state = _quantize_state()
    params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros((4,))}
    tx = quantize_state(optstate.adam(1e-3), "int8", min_size=1024)
    opt_state = tx.init(params)
    checkpoint.save(tmp_path, 1, opt_state)
    from optstate.quantization.array import is_quantized

    quantized = [(jax.tree_util.keystr(p), x) for p, x in
                 jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_quantized)[0]
                 if is_quantized(x)]
    assert quantized  # mu['w'] and nu['w']
    code, text = _inspect(str(tmp_path))
    assert code == 0
    for path, q in quantized:
        row = next(line.split() for line in text.splitlines() if line.startswith(path + " "))
        assert row[1:4] == ["(64,", "32)", "int8"], row
        assert int(row[4]) == q.nbytes
    restored = checkpoint.restore(tmp_path, target=jax.eval_shape(lambda: opt_state))
    assert_identical(restored, opt_state)
    # a target quantized differently is refused, even where the stored arrays have the same
    # shapes and dtypes (here: nu on the signed grid instead of the unsigned one)
    other = quantize_state(optstate.adam(1e-3), "int8", min_size=1024, nonneg_fields=())
    with pytest.raises(CheckpointError, match=r"step 1: .*leaf \.inner_state\[0\]\.nu\['w'\]: "
                                              r"quantized nonneg was saved as True, the target "
                                              r"has False"):
        checkpoint.restore(tmp_path, target=jax.eval_shape(lambda: other.init(params)))
    other = quantize_state(optstate.adam(1e-3), "fp8_e4m3", min_size=1024)
    # fp8 codes are stored as raw uint8 bits like int8's: the format itself must differ
    with pytest.raises(CheckpointError, match=r"step 1: .*mu\['w'\]: quantized fmt was saved as "
                                              r"int8, the target has fp8_e4m3"):
        checkpoint.restore(tmp_path, target=jax.eval_shape(lambda: other.init(params)))


# -------------------------------------------------------------------------------------------
# checksums on the devices; nothing process-wide changed
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "uint32", "int4",
                                   "float8_e4m3fn", "bool", "complex64"])
def test_checksum_is_independent_of_sharding_and_sees_any_change(dtype):
    from optstate.checkpoint.integrity import checksums

    values = jax.random.normal(jax.random.key(3), (16, 24)) * 5
    x = (values > 0) if dtype == "bool" else values.astype(dtype)
    mesh8 = jax.make_mesh((8,), ("data",))
    mesh24 = jax.make_mesh((2, 4), ("a", "b"))
    layouts = [x, jax.device_put(x, NamedSharding(mesh8, P("data"))),
               jax.device_put(x, NamedSharding(mesh24, P("b", "a"))),
               jax.device_put(x, NamedSharding(mesh8, P(None, "data")))]
    sums = checksums(layouts)
    assert len(set(sums)) == 1, sums
    swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
    flipped = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(values, jnp.uint32).at[5, 7].add(1), jnp.float32)
    flipped = (flipped > 0) if dtype == "bool" else flipped.astype(dtype)
    changed = [y for y in (swapped, flipped) if not bool((y == x).all())]
    assert changed  # at least one of the two edits changes the array at this dtype
    assert all(s != sums[0] for s in checksums(changed))


def test_no_logger_filters_or_interpreter_hooks_change(tmp_path):
    import logging

    state = _corruptible_state()
    checkpoint.save(tmp_path, 3, state)
    files = [p for p in (tmp_path / "step_3" / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:10])
    before = ({name: list(logging.getLogger(name).filters) for name in ("absl", "asyncio", "")},
              sys.unraisablehook, sys.excepthook)
    with pytest.raises(CheckpointError, match="step 3"):
        checkpoint.restore(tmp_path, target=abstract(state))
    after = ({name: list(logging.getLogger(name).filters) for name in ("absl", "asyncio", "")},
             sys.unraisablehook, sys.excepthook)
    assert after == before
    assert not [f for name in ("absl", "asyncio") for f in logging.getLogger(name).filters
                if type(f).__module__.startswith("optstate")]
