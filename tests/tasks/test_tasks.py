"""The embedded task: stdlib corpus, batches, the NNX transformer and its training loop."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optstate
from optstate.tasks import configs as task_configs
from optstate.tasks.stdlib_text import (
    DOCUMENT_SEPARATOR,
    HELDOUT_MODULES,
    TRAIN_MODULES,
    load_corpus,
    module_files,
    stdlib_dir,
)
from optstate.tasks.training import (
    TrainConfig,
    init_model,
    make_eval_fn,
    make_loss_fn,
    make_train_step,
    run_training,
)
from optstate.tasks.transformer import ModelConfig, next_token_loss

TINY = ModelConfig(seq_len=32, d_model=32, num_heads=2, num_layers=1, mlp_ratio=2)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


# --- corpus -------------------------------------------------------------------------------


def test_corpus_is_the_listed_stdlib_files_in_order(corpus):
    train_files = module_files(TRAIN_MODULES)
    assert list(corpus.train_files) == train_files
    assert len(train_files) >= 0.9 * len(TRAIN_MODULES)  # nearly all exist on any CPython
    expected = DOCUMENT_SEPARATOR.join(p.read_bytes() for p in train_files)
    assert corpus.train.tobytes() == expected
    heldout = DOCUMENT_SEPARATOR.join(p.read_bytes() for p in module_files(HELDOUT_MODULES))
    assert corpus.heldout.tobytes() == heldout
    assert all(p.is_relative_to(stdlib_dir()) for p in corpus.train_files)


def test_train_and_heldout_modules_are_disjoint(corpus):
    assert not set(TRAIN_MODULES) & set(HELDOUT_MODULES)
    assert not set(corpus.train_files) & set(corpus.heldout_files)
    assert corpus.heldout.size > 50_000 and corpus.train.size > 1_000_000


def test_missing_stdlib_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="standard library sources"):
        load_corpus(tmp_path)


def test_a_missing_module_is_skipped(tmp_path):
    (tmp_path / "abc.py").write_text("x = 1\n")
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "__init__.py").write_text("y = 2\n")
    assert module_files(("abc", "nope", "json"), tmp_path) == [
        tmp_path / "abc.py", tmp_path / "json" / "__init__.py"]


# --- batches --------------------------------------------------------------------------------


def _find(haystack: np.ndarray, needle: np.ndarray) -> bool:
    return haystack.tobytes().find(needle.tobytes()) >= 0


def test_batches_are_deterministic_for_a_seed(corpus):
    first = corpus.train_batch(seed=3, step=7, batch_size=4, seq_len=16)
    again = corpus.train_batch(seed=3, step=7, batch_size=4, seq_len=16)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (4, 17) and first.dtype == np.uint8
    assert all(_find(corpus.train, window) for window in first)


def test_different_seeds_and_steps_give_different_batches(corpus):
    base = corpus.train_batch(seed=0, step=1, batch_size=4, seq_len=16)
    assert not np.array_equal(base, corpus.train_batch(seed=1, step=1, batch_size=4, seq_len=16))
    assert not np.array_equal(base, corpus.train_batch(seed=0, step=2, batch_size=4, seq_len=16))


def test_eval_windows_are_fixed_and_held_out(corpus):
    held = corpus.eval_batches("heldout", 2, 3, 16)
    np.testing.assert_array_equal(held, corpus.eval_batches("heldout", 2, 3, 16))
    assert held.shape == (2, 3, 17)
    assert all(_find(corpus.heldout, w) for w in held.reshape(-1, 17))
    np.testing.assert_array_equal(held[0, 0], corpus.heldout[:17])
    with pytest.raises(ValueError, match="'train' or 'heldout'"):
        corpus.eval_batches("test", 1, 1, 16)


# --- model ------------------------------------------------------------------------------------


def test_loss_matches_a_numpy_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 256)).astype(np.float32)
    targets = rng.integers(0, 256, size=(2, 5))
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, targets[..., None], -1).mean()
    np.testing.assert_allclose(next_token_loss(jnp.asarray(logits), jnp.asarray(targets)),
                               expected, rtol=1e-5)


def test_model_is_causal_and_starts_near_uniform(corpus):
    graphdef, params = init_model(TINY, seed=0)
    from flax import nnx

    model = nnx.merge(graphdef, params)
    tokens = jnp.asarray(corpus.train_batch(0, 1, 2, 31))  # (2, 32)
    changed = tokens.at[:, 20:].set((tokens[:, 20:] + 1) % 256)
    before, after = model(tokens), model(changed)
    np.testing.assert_allclose(before[:, :20], after[:, :20], atol=1e-5)
    assert not np.allclose(before[:, 20:], after[:, 20:])
    loss = make_loss_fn(graphdef)(params, jnp.asarray(corpus.train_batch(0, 1, 4, 32)))
    assert abs(float(loss) - math.log(256)) < 0.1


def test_default_model_matrices_are_large_enough_to_quantize():
    _, params = init_model(ModelConfig(), seed=0)
    matrices = [leaf for leaf in jax.tree.leaves(params) if leaf.ndim == 2]
    assert len(matrices) >= 10
    assert min(m.size for m in matrices) >= task_configs.Hyperparameters().min_size
    # leaves of real layers (d_model 256: 16K to 262K values), where the state matters
    assert ModelConfig().d_model >= 256 and max(m.size for m in matrices) >= 2**18


def test_different_seeds_give_different_initial_parameters():
    _, a = init_model(TINY, seed=0)
    _, b = init_model(TINY, seed=1)
    _, a_again = init_model(TINY, seed=0)
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(a_again))
    differ = [not np.array_equal(x, y) for x, y, _ in leaves]
    assert any(differ)
    for x, z in zip(jax.tree.leaves(a), jax.tree.leaves(a_again)):
        np.testing.assert_array_equal(x, z)


# --- training ---------------------------------------------------------------------------------


def _tiny_run(corpus, seed: int, steps: int = 40):
    config = TrainConfig(steps=steps, batch_size=8, seed=seed, eval_batches=2, eval_points=2,
                         model=TINY)
    hyper = task_configs.Hyperparameters(learning_rate=1e-2)
    tx = task_configs.build_optimizer(task_configs.parse_config("fp32"), hyper, steps)
    graphdef, params = init_model(TINY, seed)
    step = make_train_step(graphdef, tx, optstate.update_and_apply)
    return run_training(corpus, config, step, make_eval_fn(graphdef), params, tx.init(params))


def test_training_lowers_the_loss_and_is_deterministic(corpus):
    result = _tiny_run(corpus, seed=0)
    assert result.train_losses.shape == (40,)
    assert result.train_losses[-5:].mean() < result.train_losses[0] - 1.0
    assert [s for s, _ in result.heldout_curve] == [20, 40]
    assert result.heldout_curve[-1][1] < result.heldout_curve[0][1]
    assert result.final_heldout_loss == result.heldout_curve[-1][1]
    assert result.final_train_loss < math.log(256) - 1.0
    again = _tiny_run(corpus, seed=0)
    np.testing.assert_array_equal(result.train_losses, again.train_losses)
    other = _tiny_run(corpus, seed=1, steps=5)
    assert not np.array_equal(result.train_losses[:5], other.train_losses)


def test_fp32_configuration_is_adamw_with_the_schedule_as_in_optax(corpus):
    hyper = task_configs.Hyperparameters()
    steps = 20
    tx = task_configs.build_optimizer(task_configs.parse_config("fp32"), hyper, steps)
    warmup = round(hyper.warmup_fraction * steps)
    reference = optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, hyper.learning_rate, warmup, steps,
                                           end_value=0.1 * hyper.learning_rate),
        b1=hyper.b1, b2=hyper.b2, eps=hyper.eps, weight_decay=hyper.weight_decay)
    graphdef, params = init_model(TINY, seed=0)
    grad_fn = jax.jit(jax.grad(make_loss_fn(graphdef)))
    ours, theirs = tx.init(params), reference.init(params)
    for step in range(1, 6):  # the same gradients into both, through the warm-up
        g = grad_fn(params, jnp.asarray(corpus.train_batch(0, step, 4, TINY.seq_len)))
        u_ours, ours = tx.update(g, ours, params)
        u_theirs, theirs = reference.update(g, theirs, params)
        for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_theirs)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
        params = optstate.apply_updates(params, u_ours)


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="TrainConfig.steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=30, num_heads=4)
    assert TrainConfig(steps=10, eval_points=4).eval_steps() == [2, 5, 8, 10]


# --- configuration names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, fmt, rounding, reset",
    [("fp32", "fp32", "nearest", False), ("bf16-sr", "bf16", "stochastic", False),
     ("int4", "int4", "nearest", False), ("bf16-sr+reset", "bf16", "stochastic", True),
     ("fp8_e4m3+reset", "fp8_e4m3", "nearest", True)],
)
def test_configuration_names_parse(name, fmt, rounding, reset):
    config = task_configs.parse_config(name)
    assert (config.fmt, config.rounding, config.reset) == (fmt, rounding, reset)


@pytest.mark.parametrize("name", ["int3", "bf16-xx", "", "sr", "fp32-sr"])
def test_bad_configuration_names_list_the_accepted_ones(name):
    with pytest.raises(task_configs.ConfigError) as info:
        task_configs.parse_config(name)
    message = str(info.value)
    assert repr(name) in message
    assert "bf16" in message and ("int8" in message or "fp32" in message)
