"""examples/staleness_study.py, part (2): a few steps of the embedded-task study."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_STUDY = Path(__file__).resolve().parents[2] / "examples" / "staleness_study.py"


def _load_study():
    spec = importlib.util.spec_from_file_location("staleness_study_example", _STUDY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the example's dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_task_part_writes_the_table_and_fp32_has_no_gap(tmp_path):
    pytest.importorskip("flax")
    pytest.importorskip("matplotlib")
    from optstate import staleness
    from optstate.tasks.configs import Hyperparameters
    from optstate.tasks.training import TrainConfig
    from optstate.tasks.transformer import ModelConfig

    study = _load_study()
    b2 = 0.7  # a reset period of a few steps, so that the 6-step runs do reset
    period = staleness.reset_period("bf16", b2)
    assert period < 6
    tiny = ModelConfig(seq_len=32, d_model=32, num_heads=2, num_layers=1, mlp_ratio=2)
    train_config = TrainConfig(batch_size=4, eval_batches=1, eval_points=2, model=tiny)
    hyper = Hyperparameters(min_size=1024)  # the tiny model's matrices get bf16 state
    table, rows = study.run_task_part(tmp_path, steps=6, b2=b2, seeds=(0,),
                                      train_config=train_config, hyper=hyper)

    assert [r["config"] for r in rows] == list(study.TASK_CONFIGS)
    by_name = {r["config"]: r for r in rows}
    assert by_name["fp32"]["gap_mean"] == 0.0 and by_name["fp32"]["gaps"] == [0.0]
    assert by_name["bf16+reset"]["reset_period"] == period
    assert by_name["bf16-sr+reset"]["reset_period"] == period
    assert by_name["bf16"]["reset_period"] is None
    assert by_name["bf16+reset"]["versus"] == "bf16"
    assert by_name["bf16-sr+reset"]["versus"] == "bf16-sr"
    assert by_name["bf16-sr"]["versus"] == "bf16"
    # a reset within the run changes the trajectory
    assert by_name["bf16+reset"]["loss_mean"] != by_name["bf16"]["loss_mean"]
    for name in ("bf16+reset", "bf16-sr+reset"):
        row = by_name[name]
        base = by_name[row["versus"]]["gap_mean"]
        if base != 0.0:
            assert row["closed"] == pytest.approx((base - row["gap_mean"]) / base)
        assert row["delta_within_noise"] is None  # one seed: no noise estimate
        assert row["delta"] == [row["loss_mean"] - by_name[row["versus"]]["loss_mean"]]

    assert (tmp_path / "task.md").read_text().strip() == table
    assert "| fp32 | - |" in table and "+0.0000 ± 0.0000" in table
    assert (tmp_path / "task.png").stat().st_size > 0
    record = json.loads((tmp_path / "task.json").read_text())
    assert len(record["runs"]) == len(study.TASK_CONFIGS)
    assert all(run["heldout_curve"][-1][0] == 6 for run in record["runs"])
    runs, steps, b2_again = study.load_task_runs(tmp_path / "task.json")
    assert (steps, b2_again) == (6, b2)
    assert study.task_markdown(study.summarize_task(runs), steps=6, b2=b2) == table
