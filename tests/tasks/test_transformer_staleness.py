"""The transformer's staleness diagnostics and the study's report (tables, JSON, plots)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from optstate import staleness
from optstate.tasks import least_squares as ls
from optstate.tasks import staleness_study
from optstate.tasks import transformer_staleness as ts
from optstate.tasks.configs import Hyperparameters
from optstate.tasks.stdlib_text import load_corpus
from optstate.tasks.transformer import ModelConfig

TINY = ts.DiagnosticsConfig(
    steps=40, b2=0.999, configs=("fp32", "bf16"), seeds=(0,), record_every=10, eval_points=2,
    eval_batches=1, window=20, batch_size=4,
    model=ModelConfig(seq_len=16, d_model=32, num_heads=2, num_layers=1, mlp_ratio=2))
HYPER = Hyperparameters(min_size=1024)  # the tiny model's matrices get bf16 state


@pytest.fixture(scope="module")
def diagnostics():
    return ts.run_diagnostics(load_corpus(), TINY, HYPER)


def test_fp32_second_moment_is_the_exact_ema(diagnostics):
    fp32 = next(r for r in diagnostics["runs"] if r["config"] == "fp32")
    np.testing.assert_allclose(fp32["nu_drift"], 1.0, rtol=1e-5)
    np.testing.assert_allclose(fp32["nu_drift_median"], 1.0, rtol=1e-5)
    # among elements a gradient reached, fp32 writes (b2 < 1) always change the value
    assert fp32["window_stall_fraction"] < 0.01
    assert len(fp32["steps"]) == len(fp32["stall_fraction"]) == 4
    assert [s for s, _ in fp32["heldout_curve"]] == [20, 40]


def test_bf16_stalls_and_is_summarised_against_the_model(diagnostics):
    summary = diagnostics["summary"]
    assert summary["fp32"]["gaps"] == [0.0] and summary["fp32"]["seed_noise"] is None
    bf16 = summary["bf16"]
    assert bf16["stall_measured"] > 0.2  # the first steps from zero already stall (model ~0.3)
    assert bf16["stall_model_steady"] == pytest.approx(
        staleness.stall_probability("bf16", 0.999, rounding="nearest"))
    expected = np.mean(staleness.stall_probability("bf16", 0.999, step=np.arange(20, 40)))
    assert bf16["stall_model_at_end"] == pytest.approx(expected)
    run = next(r for r in diagnostics["runs"] if r["config"] == "bf16")
    assert bf16["gaps"] == [pytest.approx(run["final_heldout_loss"]
                                          - summary["fp32"]["heldout_loss"])]
    assert run["nu_drift"][-1] >= 1.0  # nearest rounding cannot lower nu at rho > 1


def test_study_writes_tables_json_and_plots(diagnostics, tmp_path):
    lsq_config = ls.LeastSquaresConfig(problems=2, rows=10, cols=4, batch_rows=2, steps=20,
                                       record_every=10)
    results = {"least_squares": ls.run_study(lsq_config, (ls.LsqVariant("fp32"),)),
               "transformer": diagnostics, "wall_seconds": 1.0}
    text = staleness_study.markdown(results)
    assert "| fp32 | - | " in text and "| bf16 | " in text
    assert "rho = 2.71" in text and "K* = 1116" in text
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    staleness_study.plot_least_squares(results["least_squares"], paths[0])
    staleness_study.plot_transformer(diagnostics, paths[1])
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(results)  # JSON-ready as it is


def test_quick_study_is_short_and_full_study_is_the_issues():
    lsq, diagnostics = staleness_study.study_configs(quick=False)
    assert (lsq.problems, lsq.rows, lsq.cols, lsq.batch_rows) == (64, 100, 50, 10)
    assert (lsq.scale_low, lsq.scale_high, lsq.b2, lsq.learning_rate, lsq.steps) == (
        0.1, 10.0, 0.999, 3e-3, 10_000)
    assert (diagnostics.b2, diagnostics.steps) == (0.999, 5000)
    quick_lsq, quick_diag = staleness_study.study_configs(quick=True)
    assert quick_lsq.steps < lsq.steps and quick_diag.steps < diagnostics.steps
    assert quick_diag.seeds == (0,)
