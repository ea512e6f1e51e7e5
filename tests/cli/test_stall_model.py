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


def test_invalid_format_is_reported(capsys):
    code, out, err = _run(capsys, "--format", "bf17", "--b2", "0.999")
    assert code == 2 and out == ""
    assert "unknown format 'bf17'" in err and "fp8_e4m3" in err
    code, _, err = _run(capsys, "--format", "bf16", "--b2", "1.5")
    assert code == 2 and "0 < b2 < 1, got 1.5" in err


def test_missing_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["stall-model", "--format", "bf16"])
    assert info.value.code == 2
    assert "--b2" in capsys.readouterr().err
