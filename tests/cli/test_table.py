"""The text table shared by the ``optstate`` commands: alignment, equal widths, bad input."""

from __future__ import annotations

import pytest

from optstate.cli.table import format_table

ROWS = [("fp32", "8.00", "1.00x"), ("bf16-sr+reset", "4.00", "12.50x"), ("int4", "1.06", "0.9x")]
HEADER = ("config", "state B/param", "time")


def test_header_rule_and_default_alignment():
    assert format_table(ROWS, HEADER).splitlines() == [
        "config         state B/param    time",
        "-------------  -------------  ------",
        "fp32                    8.00   1.00x",
        "bf16-sr+reset           4.00  12.50x",
        "int4                    1.06    0.9x",
    ]


def test_every_line_has_the_same_width_and_columns_line_up():
    for align in ("<>>", "<<<", ">><", None):
        lines = format_table(ROWS, HEADER, align=align).splitlines()
        assert len({len(line) for line in lines}) == 1, (align, lines)
        rule = lines[1]
        # every column starts where its dashes start, two spaces after the previous one
        starts = [i for i, c in enumerate(rule) if c == "-" and (i == 0 or rule[i - 1] == " ")]
        assert starts == [0, 15, 30]
        for line in lines:
            assert all(line[s - 2:s] == "  " for s in starts[1:]), line
    left = format_table(ROWS, HEADER, align="<<<").splitlines()
    assert [line[30:] for line in left[2:]] == ["1.00x ", "12.50x", "0.9x  "]


def test_without_header_there_is_no_rule():
    assert format_table([("a", "1"), ("bbb", "22")], align="<>") == "a     1\nbbb  22"
    assert format_table([]) == ""
    assert format_table([], header=("name", "bytes")) == "name  bytes\n----  -----"


def test_ragged_rows_and_bad_alignment_are_refused():
    with pytest.raises(ValueError, match=r"table row 1 has 2 cells, expected 3 \(as many as the "
                                         r"header\)"):
        format_table([ROWS[0], ("x", "1")], HEADER)
    with pytest.raises(ValueError, match=r"one of '<' or '>' per column \(3 columns\), got '<>'"):
        format_table(ROWS, HEADER, align="<>")
    with pytest.raises(ValueError, match=r"got '<\^>'"):
        format_table(ROWS, HEADER, align="<^>")
