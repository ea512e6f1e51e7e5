"""``optstate bench``: the table against Optax's AdamW, its layout, and user errors."""

from __future__ import annotations

import optstate
from optstate.cli import main
from optstate.cli.bench import results_table

QUANTIZED = "int8" if hasattr(optstate, "quantize_state") else None


def test_bench_prints_a_table_against_optax(capsys):
    configs = ["fp32"] + ([QUANTIZED] if QUANTIZED else [])
    code = main(["bench", "--leaves", "1", "--side", "96", "--repeats", "2", "--configs", *configs])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split("  ")[0].strip(): line.split()
            for line in lines if line.startswith(("optax", "optstate"))}
    assert set(rows) == {"optax fp32", *(f"optstate {c}" for c in configs)}
    assert rows["optax fp32"][-1] == "1.00x"
    # fp32 state: 2 moments x 4 bytes, plus int32 counters spread over 96 * 96 parameters.
    assert 8.0 <= float(rows["optstate fp32"][2]) <= 8.01


def test_table_text_is_unchanged():
    """The table as it was laid out before the shared formatter."""
    rows = [
        {"name": "optax fp32", "peak_bytes": 50_331_648, "state_bytes_per_param": 8.0,
         "step_seconds": 0.01234, "ratio": 1.0},
        {"name": "optstate int8", "peak_bytes": 30_000_000, "state_bytes_per_param": 2.0312,
         "step_seconds": 0.1, "ratio": 8.1},
    ]
    assert results_table(rows, 4 * 1024 * 1024).splitlines() == [
        "AdamW update step on 4.19M parameters",
        "optimizer (AdamW)  state B/param  peak MiB  step ms  time vs optax",
        "-----------------  -------------  --------  -------  -------------",
        "optax fp32                  8.00      48.0    12.34          1.00x",
        "optstate int8               2.03      28.6   100.00          8.10x",
    ]


def test_bench_rejects_an_unknown_configuration(capsys):
    assert main(["bench", "--configs", "nope"]) == 2
    assert "unknown configuration 'nope'" in capsys.readouterr().err
