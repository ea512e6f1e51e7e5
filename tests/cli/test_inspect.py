"""``optstate inspect``: the leaf table of a tiny checkpoint.

The checkpoint's own tests (tests/checkpoint) cover steps, metadata, ``--json`` and quantized
leaves through this command too; this one checks the table's layout.
"""

from __future__ import annotations

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
