"""``optstate compare``: outputs, measured figures, the printed table, and user errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import optstate
from optstate.cli import main
from optstate.cli.compare import results_table
from optstate.tasks import report
from optstate.tasks.configs import ConfigError, parse_config, parse_configs

REQUIRED_FIELDS = (
    "state_bytes", "state_bytes_per_param", "peak_step_memory_bytes", "peak_update_memory_bytes",
    "step_time_s", "step_time_ratio_to_fp32", "final_train_loss", "final_heldout_loss",
    "loss_gap_to_fp32", "train_losses", "heldout_curve",
)
QUANTIZED = "int8" if hasattr(optstate, "quantize_state") else None


def _run_cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "optstate", *argv], capture_output=True,
                          text=True, env=env, timeout=120)


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One cheap ``compare --quick`` run shared by the output tests, on a one-block model:
    the tests read every size from results.json (``task.model``), so they hold for any
    model, and this one compiles faster than the demo's default (d_model 256, 2 layers).
    Its weight matrices (>= 4096 values each) are still quantized."""
    from optstate.tasks import training
    from optstate.tasks.transformer import ModelConfig

    @dataclasses.dataclass(frozen=True)
    class SmallTrainConfig(training.TrainConfig):
        model: ModelConfig = dataclasses.field(
            default_factory=lambda: ModelConfig(d_model=64, num_heads=2, num_layers=1))

    out = tmp_path_factory.mktemp("results")
    configs = ["fp32"] + ([QUANTIZED] if QUANTIZED else [])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "TrainConfig", SmallTrainConfig)  # what compare builds
        code = main(["compare", "--quick", "--steps", "4", "--configs", *configs, "--out",
                     str(out), "--no-progress"])
    return code, out


def test_quick_compare_writes_json_and_plots(quick_run, capsys):
    code, out = quick_run
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 4 and results["quick"] is True and results["reference"] == "fp32"
    for png in (report.LOSS_CURVES_PNG, report.MEMORY_QUALITY_PNG):
        assert _is_png(out / png) and (out / png).stat().st_size > 10_000
    for record in results["configs"].values():
        for field in REQUIRED_FIELDS:
            assert field in record, field
        assert len(record["train_losses"]) == 4
        assert np.isfinite(record["final_train_loss"]) and np.isfinite(record["final_heldout_loss"])
        assert record["step_time_s"] > 0
        memory = record["step_memory"]
        assert record["peak_step_memory_bytes"] == (
            memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"])


def test_fp32_figures_match_independent_counts(quick_run):
    _, out = quick_run
    results = json.loads((out / "results.json").read_text())
    fp32 = results["configs"]["fp32"]
    count = results["task"]["num_params"]
    from optstate.tasks.training import init_model
    from optstate.tasks.transformer import ModelConfig

    _, params = init_model(ModelConfig(**results["task"]["model"]), seed=0)
    assert count == sum(leaf.size for leaf in jax.tree.leaves(params))
    # AdamW in fp32: two moments of 4 bytes per parameter plus a few int32 counters.
    assert 8 * count <= fp32["state_bytes"] <= 8 * count + 64
    assert fp32["step_time_ratio_to_fp32"] == 1.0 and fp32["loss_gap_to_fp32"] == 0.0
    # The donated step holds params + state + the batch as arguments, aliased into outputs.
    assert fp32["step_memory"]["arguments"] >= 4 * count + fp32["state_bytes"]
    assert fp32["step_memory"]["aliased"] >= 4 * count + 8 * count
    # The update alone (update_and_apply): gradients, state and parameters are donated (they
    # die at the update in a train step), so the new parameters and state take their buffers.
    assert fp32["update_memory"]["aliased"] >= 4 * count + 8 * count


@pytest.mark.skipif(QUANTIZED is None, reason="optstate.quantize_state not available")
def test_quantized_state_is_measured_smaller_with_a_loss_gap(quick_run):
    _, out = quick_run
    records = json.loads((out / "results.json").read_text())["configs"]
    fp32, int8 = records["fp32"], records[QUANTIZED]
    assert int8["state_bytes_per_param"] < 0.35 * fp32["state_bytes_per_param"]
    # XLA's arguments are params + state (+ grads or the batch): they differ by the state bytes.
    saved = fp32["state_bytes"] - int8["state_bytes"]
    for memory in ("update_memory", "step_memory"):
        assert fp32[memory]["arguments"] - int8[memory]["arguments"] == saved
    gap = int8["final_heldout_loss"] - fp32["final_heldout_loss"]
    assert int8["loss_gap_to_fp32"] == pytest.approx(gap)


def test_table_lists_every_configuration(quick_run, capsys):
    _, out = quick_run
    results = json.loads((out / "results.json").read_text())
    table = results_table(results)
    assert "state B/param" in table and "gap vs fp32" in table
    for name in results["configs"]:
        assert any(line.startswith(name + " ") for line in table.splitlines())


def test_table_text_is_unchanged():
    """The text ``make demo`` prints, as the table was laid out before the shared formatter."""
    record = dict(state_bytes_per_param=8.0004, peak_step_memory_bytes=41_943_040,
                  peak_update_memory_bytes=8_650_752, step_time_ratio_to_fp32=1.0,
                  final_train_loss=1.23456, final_heldout_loss=1.5, loss_gap_to_fp32=0.0)
    results = {"configs": {
        "fp32": {**record, "name": "fp32"},
        "bf16-sr+reset": {**record, "name": "bf16-sr+reset", "state_bytes_per_param": 4.0,
                          "step_time_ratio_to_fp32": 1.234, "loss_gap_to_fp32": -0.01},
        "int4": {**record, "name": "int4", "peak_step_memory_bytes": 35_000_000,
                 "step_time_ratio_to_fp32": 12.5, "final_train_loss": 10.0,
                 "final_heldout_loss": 11.25, "loss_gap_to_fp32": 9.75},
    }}
    assert results_table(results).splitlines() == [
        "config         state B/param  step peak MiB  update peak MiB  time vs fp32  train loss"
        "  held-out loss  gap vs fp32",
        "-------------  -------------  -------------  ---------------  ------------  ----------"
        "  -------------  -----------",
        "fp32                    8.00           40.0              8.2         1.00x      1.2346"
        "         1.5000      +0.0000",
        "bf16-sr+reset           4.00           40.0              8.2         1.23x      1.2346"
        "         1.5000      -0.0100",
        "int4                    8.00           33.4              8.2        12.50x     10.0000"
        "        11.2500      +9.7500",
    ]


def test_reference_is_added_and_duplicates_dropped():
    from optstate.tasks.compare import with_reference

    configs = parse_configs(["fp32", "fp32"])
    assert [c.name for c in with_reference(configs)] == ["fp32"]
    if QUANTIZED:
        names = [c.name for c in with_reference(parse_configs([QUANTIZED]))]
        assert names == ["fp32", QUANTIZED]


def test_smoothing_is_a_trailing_mean():
    values = np.array([1.0, 3.0, 5.0, 7.0])
    np.testing.assert_allclose(report.smooth(values, 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(report.smooth(values, 10), [1.0, 2.0, 3.0, 4.0])


# --- user errors: clear one-line messages, exit code 2, no traceback ----------------------


def test_unknown_configuration_names_the_accepted_ones(tmp_path):
    result = _run_cli("compare", "--configs", "fp32", "int3", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "unknown configuration 'int3'" in result.stderr
    assert "fp32, bf16, int8, int4, fp8_e4m3" in result.stderr
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("make_out", ["file", "under_file"])
def test_unwritable_out_is_a_clear_error(tmp_path, capsys, make_out):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    out = blocker if make_out == "file" else blocker / "results"
    code = main(["compare", "--configs", "fp32", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("optstate compare: error:") and str(out) in err
    assert err.count("\n") == 1


def test_unwritable_out_from_the_console_has_no_traceback(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    result = _run_cli("compare", "--quick", "--out", str(blocker / "x"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "cannot write results" in result.stderr


def test_bad_steps_are_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as info:
        main(["compare", "--steps", "0"])
    assert info.value.code == 2
    assert "--steps: expected a positive integer" in capsys.readouterr().err


def test_reset_configuration_without_a_period_is_rejected(tmp_path, capsys):
    if parse_config("int8+reset").missing():
        pytest.skip("quantize_state or reset_every_n not available")
    code = main(["compare", "--configs", "int8+reset", "--out", str(tmp_path)])
    assert code == 2
    assert "int8+reset" in capsys.readouterr().err


def test_fp32_with_stochastic_rounding_is_explained():
    with pytest.raises(ConfigError, match="not rounded"):
        parse_config("fp32-sr")


def test_missing_demo_packages_are_named(monkeypatch, tmp_path, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    assert main(["compare", "--configs", "fp32", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "needs matplotlib" in err and "optstate[demo]" in err


# --- arguments checked before anything runs; no hang before training ---------------------


@pytest.mark.parametrize("argv,expected", [
    (["--b2", "0.99999999999999"], ("argument --b2: expected a number in (0, 0.99999], got "
                                    "0.99999999999999 (the demo trains in float32")),
    (["--b2", "1"], "argument --b2: expected a number in (0, 0.99999], got 1 ("),
    (["--b2", "0"], "argument --b2: expected a number in (0, 0.99999], got 0"),
    (["--b2", "nan"], "argument --b2: expected a number in (0, 0.99999], got nan"),
    (["--seed", "-1"], "argument --seed: expected an integer in 0 .. 4294967295, got -1"),
    (["--seed", str(2**32)], ("argument --seed: expected an integer in 0 .. 4294967295, got "
                              "4294967296 (JAX keeps 32 bits of a seed)")),
    (["--seed", "1.5"], "argument --seed: expected an integer in 0 .. 4294967295, got '1.5'"),
    (["--steps", "-3"], "argument --steps: expected a positive integer, got -3"),
])
def test_bad_arguments_exit_2_with_one_line_naming_them(capsys, tmp_path, argv, expected):
    with pytest.raises(SystemExit) as info:
        main(["compare", *argv, "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("optstate compare: error: ") and expected in err[-1]
    assert not (tmp_path / "out").exists()


def test_b2_next_to_one_no_longer_hangs_computing_reset_periods():
    # The hang before training: compare computes the reset period of every +reset
    # configuration first, and reset_period scanned step by step (about a minute per
    # configuration at 0.99999999999999). The model now answers at once, even for a b2 the
    # command line refuses.
    import time

    from optstate.tasks.configs import Hyperparameters, reset_period

    if parse_config("bf16+reset").missing():
        pytest.skip("reset_every_n not available")
    start = time.perf_counter()
    period = reset_period(parse_config("bf16+reset"), Hyperparameters(b2=0.99999999999999))
    assert time.perf_counter() - start < 5.0
    assert period == 401144371  # what the step-by-step scan gave, after a minute


def test_largest_b2_reaches_training_at_once(monkeypatch, tmp_path, capsys):
    import time

    from optstate.cli import compare as command
    from optstate.staleness import reset_period

    reached = {}

    def fake_run(args, configs, hyper, steps, out):
        reached.update(configs=[c.name for c in configs], b2=hyper.b2, steps=steps)
        return 0

    monkeypatch.setattr(command, "_run", fake_run)
    start = time.perf_counter()
    code = main(["compare", "--b2", "0.99999", "--out", str(tmp_path)])
    assert code == 0 and time.perf_counter() - start < 5.0
    assert reached["b2"] == 0.99999 and reached["steps"] == 300
    # the default +reset configurations have a period (12706 steps for bf16) longer than the
    # run, so they are skipped with a note, as for any b2 whose period exceeds the run
    assert reset_period("bf16", 0.99999) > 300
    assert not any(name.endswith("+reset") for name in reached["configs"])
    assert "skipping bf16+reset" in capsys.readouterr().err


# --- --study staleness -------------------------------------------------------------------


@pytest.mark.parametrize("argv, named", [
    (["--configs", "int8"], "--configs does not apply"),
    (["--steps", "10", "--b2", "0.9"], "--steps and --b2 do not apply"),
    (["--seed", "3"], "--seed does not apply"),
])
def test_study_rejects_the_comparisons_options(tmp_path, capsys, argv, named):
    code = main(["compare", "--study", "staleness", *argv, "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("optstate compare: error:") and err.count("\n") == 1
    assert named in err and "--study staleness" in err
    assert not (tmp_path / "o").exists()


def test_unknown_study_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["compare", "--study", "nope"])
    assert info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_study_writes_into_its_subdirectory_and_prints_the_tables(monkeypatch, tmp_path,
                                                                   capsys):
    from optstate.tasks import staleness_study

    seen = {}

    def fake_run(corpus, out, *, lsq, diagnostics, log):
        seen.update(out=out, lsq=lsq, diagnostics=diagnostics)
        return {"fake": True}, [out / staleness_study.STUDY_MD]

    monkeypatch.setattr(staleness_study, "run", fake_run)
    monkeypatch.setattr(staleness_study, "markdown", lambda results: "THE TABLES")
    assert main(["compare", "--study", "staleness", "--quick", "--out", str(tmp_path)]) == 0
    assert seen["out"] == tmp_path / "staleness" and seen["out"].is_dir()
    assert (seen["lsq"], seen["diagnostics"]) == staleness_study.study_configs(quick=True)
    out = capsys.readouterr().out
    assert "THE TABLES" in out and str(tmp_path / "staleness" / "staleness.md") in out
