"""``optstate inspect``: the leaf table of a tiny checkpoint.

The checkpoint's own tests (tests/checkpoint) cover steps, metadata, ``--json`` and quantized
leaves through this command too; this one checks the table's layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from optstate import checkpoint
from optstate.cli import main


def test_inspect_prints_one_aligned_row_per_leaf(tmp_path, capsys):
    state = {"mu": {"w": jnp.zeros((4, 3), jnp.bfloat16), "b": jnp.zeros((4,))},
             "count": jnp.zeros((), jnp.int32)}
    checkpoint.save(tmp_path, 5, state)
    assert main(["inspect", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("path ")))
    table = lines[start:start + 5]
    assert table[0].split() == ["path", "shape", "format", "bytes"]
    assert set(table[1]) == {"-", " "}
    assert sorted(line.split() for line in table[2:]) == [
        ["['count']", "()", "int32", "4"],
        ["['mu']['b']", "(4,)", "fp32", "16"],
        ["['mu']['w']", "(4,", "3)", "bf16", "24"],
    ]
    assert len({len(line) for line in table}) == 1  # bytes right-aligned at the same edge
    assert lines[start + 5] == ""
    assert "total: 3 leaves, 17 elements, 44 bytes" in lines[start + 6]


def test_inspect_names_a_single_array_root(tmp_path, capsys):
    checkpoint.save(tmp_path, 1, jnp.zeros((2, 2)))
    assert main(["inspect", str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("<root>"))
    assert row.split() == ["<root>", "(2,", "2)", "fp32", "16"]


def test_inspect_rejects_a_negative_step_while_parsing(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect", str(tmp_path), "--step", "-1"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("optstate inspect: error: argument --step: expected a non-negative "
                       "integer, got -1")


@pytest.mark.parametrize("kind", ["empty", "file", "other"])
def test_inspect_on_a_non_checkpoint_exits_2_with_one_line(tmp_path, capsys, kind):
    path = tmp_path / "x"
    if kind == "file":
        path.write_text("hello")
    elif kind == "other":
        (path / "step_1").mkdir(parents=True)  # a directory named like a step, no checkpoint
        (path / "notes.txt").write_text("hello")
    else:
        path.mkdir()
    assert main(["inspect", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.splitlines()
    assert len(err) == 1 and err[0].startswith("optstate inspect: ") and str(path) in err[0]


def test_inspect_verify_reads_the_data(tmp_path, capsys):
    """--verify recomputes the checksums of the arrays: a flipped byte in the largest data
    file, which the description alone cannot show, makes it fail with one line."""
    state = {"big": jax.random.normal(jax.random.key(0), (6000,)), "n": jnp.arange(5)}
    checkpoint.save(tmp_path, 3, state)
    assert main(["inspect", str(tmp_path), "--verify"]) == 0
    assert "verified: every array of step 3 matches its checksum" in capsys.readouterr().out
    files = [p for p in (tmp_path / "step_3" / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0x01
    biggest.write_bytes(bytes(data))
    assert main(["inspect", str(tmp_path)]) == 0  # the description is intact
    capsys.readouterr()
    assert main(["inspect", str(tmp_path), "--verify"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "step 3, leaf ['big']" in err[0], err
