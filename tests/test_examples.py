"""The ravine example: per-coordinate scaling beats plain SGD on an ill-conditioned problem."""

import importlib.util
from pathlib import Path

import numpy as np

_RAVINE = Path(__file__).resolve().parents[1] / "examples" / "ravine.py"


def _load_ravine():
    spec = importlib.util.spec_from_file_location("ravine_example", _RAVINE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ravine_adam_and_momentum_cross_the_threshold_before_sgd(tmp_path, capsys):
    ravine = _load_ravine()
    x, y = ravine.make_data(0)
    # The least-squares optimum from the normal equations: the loss floor every method nears.
    design = np.concatenate([np.asarray(x), np.ones((x.shape[0], 1))], axis=1)
    coef, *_ = np.linalg.lstsq(design, np.asarray(y), rcond=None)
    floor = 0.5 * np.mean((design @ coef - np.asarray(y)) ** 2)
    curves = {name: ravine.train(tx, x, y, 150) for name, tx in ravine.optimizers(150).items()}
    crossings = {name: ravine.first_below(c, ravine.THRESHOLD) for name, c in curves.items()}
    assert crossings["adam"] is not None and crossings["momentum"] is not None
    assert crossings["sgd"] is None or crossings["sgd"] > crossings["adam"]
    assert all(c[-1] >= floor * (1 - 1e-4) for c in curves.values())
    assert curves["adam"][-1] < 1.5 * floor  # Adam has found the bottom of the valley
    assert curves["sgd"][-1] > 2.0 * floor   # SGD is still crawling along it
    ravine.main(["--steps", "30", "--out", str(tmp_path / "r.png")])
    assert (tmp_path / "r.png").stat().st_size > 0
    assert "first loss<0.2" in capsys.readouterr().out
