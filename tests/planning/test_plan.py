"""The planner: its figures against XLA's analysis of the real step, ZeRO's formula for the
state, and the command line's errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optstate import cli
from optstate.memory import plan, shard_bytes, state_bytes
from optstate.planning import FAMILY, DecoderConfig, Row, largest_fitting
from optstate.planning.family import init_params
from optstate.planning.zero import Setup, build, optimizer, plan_setup

TINY = DecoderConfig("tiny", d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn=192,
                     vocab=512)


def test_family_parameter_counts():
    # LLaMA-7B's published count is 6.74B (Touvron et al. 2023); 70B with GQA is 68.98B
    counts = {name: c.num_params for name, c in FAMILY.items()}
    assert counts["7B"] == 6_738_415_616
    assert abs(counts["70B"] / 68.98e9 - 1) < 1e-3
    assert list(counts.values()) == sorted(counts.values())


def test_planned_peak_is_the_real_steps_and_the_step_runs():
    fmt = "int8"
    setup = Setup(TINY, fmt, 3, devices=8, batch=8, seq=32)
    planned, _ = plan_setup(setup)  # abstract inputs, fast CPU code generation
    jitted, _, sh = build(setup)
    tx, dtype = optimizer(fmt)
    params = jax.device_put(init_params(TINY, jax.random.key(0), dtype), sh["params"])
    # without constant folding: XLA would fold the quantization of the all-zero moments
    state = jax.jit(tx.init, out_shardings=sh["state"]).lower(params).compile(
        compiler_options={"xla_disable_hlo_passes": "constant_folding"})(params)
    tokens = jax.device_put(
        jax.random.randint(jax.random.key(1), (8, 32), 0, TINY.vocab), sh["tokens"])
    before = np.asarray(params["head"])
    # the real step, compiled for the real arrays with default options: same analysis
    compiled = jitted.lower(params, state, tokens).compile()
    real = compiled.memory_analysis()
    assert planned.peak == (real.argument_size_in_bytes + real.output_size_in_bytes
                            - real.alias_size_in_bytes + real.temp_size_in_bytes)
    # the per-argument figures are the shards the devices really hold
    assert planned.arguments[0] == sum(s.data.nbytes for x in jax.tree.leaves(params)
                                       for s in x.addressable_shards
                                       if s.device == jax.devices()[0])
    new_params, _, loss = compiled(params, state, tokens)
    assert np.isfinite(float(loss)) and abs(float(loss) - np.log(TINY.vocab)) < 0.5
    assert not np.allclose(np.asarray(new_params["head"]), before)


@pytest.mark.parametrize("size", ["125M", "70B"])
def test_state_per_device_is_bytes_per_param_times_params_over_the_stage(size):
    """ZeRO (Rajbhandari et al. 2020): K * Psi / N from stage 1 on, K * Psi at stage 0,
    with K = 8 (fp32 AdamW), about 2.03 (int8) and 1.06 (int4) bytes per parameter."""
    config = FAMILY[size]
    expected_k = {"fp32": 8.0, "int8": 2.03, "int4": 1.06}
    for fmt, k in expected_k.items():
        for stage in (0, 2):  # stages 1 to 3 shard the state alike
            _, args, _ = build(Setup(config, fmt, stage, devices=8, batch=8, seq=2048))
            total = state_bytes(args[1])
            assert abs(total / config.num_params / k - 1) < 0.02, (fmt, total)
            per_device = sum(shard_bytes(x.shape, x.dtype, x.sharding)
                             for x in jax.tree.leaves(args[1]))
            assert abs(per_device / (total / (8 if stage else 1)) - 1) < 0.02, (fmt, stage)


def _users_step(fmt, shape):
    """A user's own step ``(params, state, grads) -> (params, state)`` with the family's
    optimizer in ``fmt``, its abstract parameters and state."""
    tx, _ = optimizer(fmt)
    p = {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}
    s = jax.eval_shape(tx.init, p)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return jax.tree.map(lambda a, b: a + b, p, u), s

    return step, p, s


def test_plan_api_on_a_users_step():
    step, p, s = _users_step("fp32", (512, 256))
    result = plan(step, p, s, p, donate_argnums=(0, 1))
    assert result.arguments == (512 * 256 * 4, 2 * 512 * 256 * 4 + 4, 512 * 256 * 4)
    # the donated step writes parameters and state in place
    assert result.memory.aliased == result.arguments[0] + result.arguments[1]
    assert result.peak >= sum(result.arguments) and result.fits(result.peak)
    with pytest.raises(TypeError, match="step_fn"):
        plan(3, p)


def test_largest_fitting_picks_the_largest_size_under_the_budget():
    def row(size, fmt, peak_gib):
        n = FAMILY[size].num_params
        return Row(size, n, fmt, 1, 8, 8, 2048, 0, 0, 0, 0, int(peak_gib * 2**30), 0.0)

    rows = [row("125M", "fp32", 3), row("7B", "fp32", 90), row("1.3B", "fp32", 24),
            row("7B", "int8", 70), row("125M", "int4", 30)]
    assert largest_fitting(rows, 80) == {("fp32", 1): "1.3B", ("int8", 1): "7B",
                                         ("int4", 1): "125M"}
    assert largest_fitting(rows, 24) == {("fp32", 1): "1.3B", ("int8", 1): None,
                                         ("int4", 1): None}


def _run(capsys, *argv):
    code = cli.main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_command_prints_the_table_and_writes_json(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(FAMILY, "tiny", TINY)
    path = tmp_path / "plan.json"
    code, out, err = _run(capsys, "--sizes", "tiny", "--formats", "fp32", "--stages", "2",
                          "--seq", "16", "--budget", "1", "--json", str(path), "--quiet")
    assert code == 0 and err == ""
    data = json.loads(path.read_text())
    rows = {r["fmt"]: r for r in data["rows"]}
    for fmt, r in rows.items():
        assert r["peak"] == r["params"] + r["grads"] + r["state"] + r["other"]
        line = next(ln for ln in out.splitlines() if ln.startswith("tiny") and f" {fmt} " in ln)
        assert line.split()[8] == f"{r['peak'] / 2**30:.2f}" and line.split()[-1] == "yes"
    # fp32 AdamW state: 8 bytes per parameter (mu, nu) and a counter, sharded 8 ways
    assert rows["fp32"]["state"] == 8 * TINY.num_params // 8 + 4
    assert rows["fp32"]["grads"] == rows["fp32"]["params"] // 8  # stage 2: scattered
    assert data["largest_fitting"]["1"] == {"fp32 stage 2": "tiny"}


@pytest.mark.parametrize("argv,message", [
    (["--sizes", "13B"], "unknown model size '13B'"),
    (["--formats", "int3"], "unknown format 'int3'"),
    (["--batch", "12"], "--batch 12 does not split over --devices 8"),
    (["--stages", "4"], "expected an integer in 0 .. 3, got 4"),
    (["--budget", "-1"], "expected a number in (0, inf), got -1"),
])
def test_bad_arguments_are_one_line_and_exit_2(capsys, argv, message):
    try:
        code = cli.main(["plan", *argv])
    except SystemExit as exit_:  # argparse refuses types while parsing
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert "Traceback" not in err


def test_plan_counts_arguments_that_jit_leaves_out():
    # bf16 state keeps empty scales, which jit drops from the compiled program; the state
    # column must still be the state's bytes, aligned leaf by leaf
    step, p, s = _users_step("bf16", (256, 256))
    result = plan(step, p, s, p, donate_argnums=(0, 1))
    assert result.arguments[1] == state_bytes(s)
