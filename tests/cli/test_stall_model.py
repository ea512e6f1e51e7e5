"""Tests of ``optstate stall-model``: the printed numbers against the formulas computed here."""

from __future__ import annotations

import json
import math
import re

import pytest

from optstate import cli
from optstate import staleness as st


def _F(x: float) -> float:
    return math.erf(math.sqrt(max(x, 0.0) / 2.0))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["stall-model", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_text_output_for_bf16(capsys):
    code, out, _ = _run(capsys, "--format", "bf16", "--b2", "0.999")
    assert code == 0
    rho = 2.0**-7 * math.log(2) / (2 * 0.001)
    value = lambda label: float(re.search(label + r"\s+([0-9.eE+-]+)", out).group(1))  # noqa: E731
    assert value("precision ratio rho") == pytest.approx(rho, rel=1e-5)
    assert value("stall probability, nearest") == pytest.approx(_F(1 + rho), abs=1e-6)
    assert value("stall probability, stochastic") == pytest.approx(
        st.stall_probability("bf16", 0.999, rounding="stochastic"), abs=1e-6)
    assert int(value("reset period K\\*")) == st.reset_period("bf16", 0.999)
    # the startup window for P0 = 0.5: first j with F((1 + rho)(1 - b2^j)) >= 0.5
    j = next(j for j in range(1, 10**5) if _F((1 + rho) * (1 - 0.999**j)) >= 0.5)
    assert re.search(rf"P0=0\.5\s+{j} steps", out)
    assert re.search(r"P0=0\.99\s+never", out)  # above the steady state 0.9458


def test_json_output_mantissa_bits_and_options(capsys):
    code, out, _ = _run(capsys, "--format", "3", "--b2", "0.99", "--s0", "0.5",
                        "--p0", "0.5", "0.95", "--p-init", "0.1", "--json")
    assert code == 0
    data = json.loads(out)
    rho = 2.0**-3 * math.log(2) / (2 * 0.01)
    assert data["mantissa_bits"] == 3
    assert data["precision_ratio"] == pytest.approx(rho, rel=1e-12)
    assert data["stall_nearest"] == pytest.approx(_F(1 + rho), abs=1e-12)
    assert data["reset_period"] == st.reset_period(3, 0.99, s0=0.5)
    target = (0.5 - 0.1) / (1 - 0.1)
    j = next(j for j in range(1, 10**5) if _F((1 + rho) * (1 - 0.99**j)) >= target)
    assert data["startup_windows"] == {"0.5": j, "0.95": st.startup_window(3, 0.99, 0.95, p_init=0.1)}
    # the same width by name (fp8_e4m3: 3 mantissa bits) gives the same numbers
    _, named, _ = _run(capsys, "--format", "fp8_e4m3", "--b2", "0.99", "--s0", "0.5",
                       "--p0", "0.5", "0.95", "--p-init", "0.1", "--json")
    named = json.loads(named)
    assert named.pop("format") == "fp8_e4m3" and data.pop("format") == "m3"
    assert named == data


def _rejected(capsys, *argv: str) -> str:
    """Runs the command, expecting the parser to exit with code 2; returns its error line."""
    with pytest.raises(SystemExit) as info:
        cli.main(["stall-model", *argv])
    assert info.value.code == 2
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.strip().splitlines()
    assert lines[0].startswith("usage: optstate stall-model")
    assert lines[-1].startswith("optstate stall-model: error: argument ")
    return lines[-1]


def test_invalid_format_is_reported(capsys):
    err = _rejected(capsys, "--format", "bf17", "--b2", "0.999")
    assert "argument --format: unknown format 'bf17'" in err and "fp8_e4m3" in err
    err = _rejected(capsys, "--format", "bf16", "--b2", "1.5")
    assert "argument --b2: expected a number in (0, 1), got 1.5" in err


@pytest.mark.parametrize("argv,expected", [
    (["--b2", "1"], "--b2: expected a number in (0, 1), got 1"),
    (["--b2", "0"], "--b2: expected a number in (0, 1), got 0"),
    (["--b2", "-0.5"], "--b2: expected a number in (0, 1), got -0.5"),
    (["--b2", "nan"], "--b2: expected a number in (0, 1), got nan"),
    (["--b2", "inf"], "--b2: expected a number in (0, 1), got inf"),
    (["--b2", "1e-400"], "--b2: expected a number in (0, 1), got 1e-400"),  # underflows to 0
    (["--b2", "0.9x"], "--b2: expected a number in (0, 1), got '0.9x'"),
    (["--b2", "0.99", "--s0", "1"], "--s0: expected a number in [0, 1), got 1"),
    (["--b2", "0.99", "--s0", "nan"], "--s0: expected a number in [0, 1), got nan"),
    (["--b2", "0.99", "--p0", "0.5", "1.5"], "--p0: expected a number in [0, 1], got 1.5"),
    (["--b2", "0.99", "--p0", "-0.1"], "--p0: expected a number in [0, 1], got -0.1"),
    (["--b2", "0.99", "--p-init", "1"], "--p-init: expected a number in [0, 1), got 1"),
    (["--b2", "0.99", "--format", "0"],
     "--format: expected a number of mantissa bits between 1 and 52, got 0"),
    (["--b2", "0.99", "--format", "53"],
     "--format: expected a number of mantissa bits between 1 and 52, got 53"),
    (["--b2", "0.99", "--format", "int8"], "--format: unknown format 'int8'"),
])
def test_every_argument_is_checked_by_the_parser(capsys, argv, expected):
    if "--format" not in argv:
        argv = ["--format", "bf16", *argv]
    assert expected in _rejected(capsys, *argv)


def test_accepted_edges_of_the_ranges(capsys):
    code, out, _ = _run(capsys, "--format", "fp8_e4m3", "--b2", "1e-300", "--s0", "0",
                        "--p0", "0", "1", "--p-init", "0.999", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["reset_period"] == 1 and data["s0"] == 0.0
    assert data["startup_windows"] == {"0.0": 0, "1.0": st.startup_window(3, 1e-300, 1.0,
                                                                           p_init=0.999)}


@pytest.mark.parametrize("b2", ["0.99999999999999", "0.999999999999999", "0.9999999999999999"])
def test_b2_next_to_one_answers_within_seconds(capsys, b2):
    # Before: reset_period scanned step by step, about a minute for 0.99999999999999 (401144371
    # steps) and longer still closer to 1. Now a few hundredths of a second (5 s for slow CI).
    import time

    start = time.perf_counter()
    code, out, _ = _run(capsys, "--format", "bf16", "--b2", b2, "--json")
    elapsed = time.perf_counter() - start
    assert code == 0 and elapsed < 5.0, elapsed
    data = json.loads(out)
    assert data["reset_period"] == st.reset_period("bf16", float(b2))
    if b2 == "0.99999999999999":
        assert data["reset_period"] == 401144371  # what the minute-long scan printed
    # the startup windows: the first j with F((1 + rho)(1 - b2^j)) >= P0, 1 - b2^j by expm1
    rho = data["precision_ratio"]
    for p0, window in data["startup_windows"].items():
        j = next(j for j in range(1, 10**5)
                 if _F((1 + rho) * -math.expm1(j * math.log(float(b2)))) >= float(p0))
        assert window == j


def test_b2_next_to_one_from_the_console(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "optstate", "stall-model", "--format", "fp32", "--b2",
         "0.999999999999999"], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    period = st.reset_period("fp32", 0.999999999999999)  # about 3.2e11 steps
    assert re.search(rf"reset period K\*\s+{period} steps", result.stdout)


def test_missing_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["stall-model", "--format", "bf16"])
    assert info.value.code == 2
    assert "--b2" in capsys.readouterr().err
