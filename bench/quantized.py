"""Quantized optimizer state: bytes per parameter, peak step memory, step time.

Three measurements (issue 3's "Must show"), all against Optax's float32 AdamW:

* ``bytes``: Adam state bytes per parameter (scales included) on one 1024 x 1024 leaf, per
  format, from ``optstate.memory.state_bytes`` (checked against the arrays' ``nbytes``).
* ``memory``: XLA's memory analysis (arguments + outputs - aliased + temporaries) of the
  jitted, fully donated step ``(params, state, grads) -> (params + updates, state)`` on 8
  leaves of 1024 x 1024 (compiled only, nothing runs). Limits: int8 <= 0.75x Optax (target
  0.65x), int4 <= 0.70x (target 0.60x). Then the same analysis of the embedded task's
  update alone (``optstate compare``'s ``update peak``: many mid-sized leaves), beside the
  floor no update can go below (gradients, parameters and state).
* ``time``: median step time on 8 leaves of 2048 x 2048 (32M parameters), interleaved
  round-robin with Optax's fp32 AdamW in one process, and the bandwidth each step achieves
  (the bytes it must move over its time) against the device's measured streaming bandwidth.
  Limit: int8 <= 1.5x. Rows per format: ``tx.update`` + ``apply_updates`` (the fused kernel
  where the backend has one: GPU, TPU), ``optstate.update_and_apply`` (``apply``), and on an
  accelerator the XLA path with the kernel off (``xla``). Issue 15's GPU limits: int8
  ``apply`` <= 0.65x Optax and >= 75% of streaming, int4 ``apply`` <= 0.6x, int8 ``tx.update``
  <= 1.0x (``bench/gpu_check.sh`` runs them on 32M and 1B parameters).

    python bench/quantized.py [bytes|memory|time|all] [--repeats 15] [--side 2048]
                              [--leaves 8] [--chunk-elements N] [--formats int8,int4]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import warnings

import jax
import jax.numpy as jnp
import optax

import optstate
from optstate.memory import compiled_memory
from optstate.tasks.timing import median_ratio, time_interleaved
from optstate.memory import state_bytes
from optstate.quantization.fused import use_kernel

FORMATS = ("int8", "int4", "fp8_e4m3", "fp8_e5m2", "bf16")


def bench_bytes() -> None:
    params = {"w": jnp.zeros((1024, 1024))}
    print("Adam state bytes per parameter, one 1024x1024 leaf (scales included)")
    for fmt in FORMATS + ("fp32",):
        state = jax.eval_shape(optstate.quantize_state(optax.adam(1e-3), fmt).init, params)
        nbytes = state_bytes(state)
        assert nbytes == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
        print(f"  {fmt:9s} {nbytes / 2**20:.4f} B/param")


def _donated_step(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _apply_step(tx):
    def step(params, state, grads):
        return optstate.update_and_apply(tx, grads, state, params)

    return step


def bench_memory(leaves: int = 8, side: int = 1024, chunk_elements: int | None = None) -> None:
    params = {f"w{i}": jax.ShapeDtypeStruct((side, side), jnp.float32) for i in range(leaves)}
    n = leaves * side * side

    def peak(tx, apply=False):
        state = jax.eval_shape(tx.init, params)
        step = _apply_step(tx) if apply else _donated_step(tx)
        with warnings.catch_warnings():  # the gradients' buffers cannot be reused: expected
            warnings.simplefilter("ignore")
            jitted = jax.jit(step, donate_argnums=(0, 1, 2))
            return compiled_memory(jitted, params, state, params)

    base = peak(optax.adamw(1e-3))
    print(f"Peak memory of the donated AdamW step, {leaves} leaves of {side}x{side} "
          f"({n / 1e6:.1f}M params); bytes/param: args + outputs - aliased + temporaries")
    print(f"  optax fp32 {base.peak / n:6.2f} B/param (temporaries {base.temporaries / n:.3f})")
    for fmt in FORMATS:
        extra = {} if chunk_elements is None else {"chunk_elements": chunk_elements}
        tx = optstate.quantize_state(optax.adamw(1e-3), fmt, **extra)
        for label, apply in ((fmt, False), (f"{fmt} apply", True)):  # apply: update_and_apply
            m = peak(tx, apply)
            print(f"  {label:15s} {m.peak / n:6.2f} B/param (temporaries "
                  f"{m.temporaries / n:.3f})  ratio {m.peak / base.peak:.3f}")


def bench_task_update_memory(formats: tuple[str, ...] = ("int8", "int4")) -> None:
    """The ``update peak`` column of ``optstate compare``: XLA's memory analysis of the
    embedded task's optimizer update alone (``optstate.tasks.compare.update_memory``:
    ``update_and_apply`` with gradients, state and parameters donated), AdamW as ``optstate
    compare`` builds it, on the default model's parameters (many leaves of 16K-260K values,
    plus small fp32-state ones). The floor is what no update can go below: its arguments
    (gradients, parameters, state)."""
    from optstate.tasks.compare import update_memory
    from optstate.tasks.configs import Hyperparameters, build_optimizer, parse_config
    from optstate.tasks.training import init_model, num_params
    from optstate.tasks.transformer import ModelConfig

    _, real = init_model(ModelConfig(), 0)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), real)
    n = num_params(params)

    def measure(name):
        tx = build_optimizer(parse_config(name), Hyperparameters(), 400)
        state = jax.eval_shape(tx.init, params)
        return update_memory(tx, params, state), state_bytes(state)

    base, _ = measure("fp32")
    print(f"Peak memory of the embedded task's update alone (optstate compare's update peak), "
          f"{n / 1e6:.2f}M params in {len(jax.tree.leaves(params))} leaves")
    print(f"  fp32       {base['peak'] / 2**20:6.2f} MiB (temporaries "
          f"{base['temporaries'] / 2**20:.2f})")
    for fmt in formats:
        m, nbytes = measure(fmt)
        floor = 8 * n + nbytes  # gradients and parameters, plus state
        print(f"  {fmt:9s}  {m['peak'] / 2**20:6.2f} MiB (temporaries "
              f"{m['temporaries'] / 2**20:.2f})  ratio {m['peak'] / base['peak']:.3f}  "
              f"floor {floor / base['peak']:.3f}")


def _copy_bandwidth(nbytes: int = 1 << 29, repeats: int = 10) -> float:
    """Bytes per second of the device's best simple stream: ``x -> 2 x`` on ``nbytes`` of
    float32, donated (reads and writes ``nbytes`` each)."""
    double = jax.jit(lambda x: x * 2, donate_argnums=0)
    box = [jnp.ones((nbytes // 4,), jnp.float32)]

    def run():
        box[0] = double(box[0])
        jax.block_until_ready(box[0])

    timings = time_interleaved({"copy": run}, repeats=repeats, warmup=2)["copy"]
    return 2 * nbytes / min(timings)


def bench_time(leaves: int = 8, side: int = 2048, repeats: int = 15,
               formats: tuple[str, ...] = ("int8",) + FORMATS[1:],
               chunk_elements: int | None = None) -> None:
    """Median step times, the ratio to Optax, and the bandwidth each step achieves: the bytes
    it must move at least (XLA's argument + output sizes: parameters, state and gradients
    read, parameters and state written) over its median time, as a fraction of the device's
    measured streaming bandwidth (``x -> 2 x``)."""
    keys = jax.random.split(jax.random.key(0), leaves)
    params = {f"w{i}": 0.1 * jax.random.normal(k, (side, side)) for i, k in enumerate(keys)}
    grads = jax.tree.map(lambda p: 0.01 * p, params)
    traffic: dict[str, int] = {}
    accelerator = jax.default_backend() != "cpu"

    def runner(name, tx, apply=False, kernel=None):
        # compiled ahead of time inside ``use_kernel`` (the choice is made at trace time)
        fn = _apply_step(tx) if apply else _donated_step(tx)
        step = jax.jit(fn, donate_argnums=(0, 1))
        box = [jax.tree.map(jnp.copy, params), tx.init(params)]
        with use_kernel(kernel) if kernel else contextlib.nullcontext():
            compiled = step.lower(box[0], box[1], grads).compile()
        analysis = compiled.memory_analysis()
        traffic[name] = int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes)

        def run():
            box[0], box[1] = compiled(box[0], box[1], grads)
            jax.block_until_ready(box[0])

        return run

    extra = {} if chunk_elements is None else {"chunk_elements": chunk_elements}
    steps = {"optax": runner("optax", optax.adamw(1e-3))}
    names = []
    for fmt in formats:
        # int4's default rank-1 second moment takes the whole-leaf XLA step; its plain grid
        # (rank1=False) is what the kernel runs
        options = dict(extra, rank1=False) if fmt == "int4" else extra
        tx = optstate.quantize_state(optax.adamw(1e-3), fmt, **options)
        label = "int4 linear-nu" if fmt == "int4" else fmt
        rows = [(label, False, None), (f"{label} apply", True, None)]
        if accelerator:
            rows.append((f"{label} xla", False, "off"))
        for name, apply, kernel in rows:
            steps[name] = runner(name, tx, apply, kernel)
            names.append(name)
    timings = time_interleaved(steps, repeats=repeats, warmup=2)
    bandwidth = _copy_bandwidth()
    n = leaves * side * side
    base = statistics.median(timings["optax"])
    print(f"Step time, {leaves} leaves of {side}x{side} ({n / 1e6:.1f}M params), interleaved, "
          f"median of {repeats}; device: {jax.devices()[0].device_kind}; streaming bandwidth "
          f"(x -> 2x) {bandwidth / 1e9:.0f} GB/s")

    def line(name: str, t: float) -> str:
        achieved = traffic[name] / t
        return (f"{t * 1e3:7.2f} ms  {traffic[name] / n:5.2f} B/param moved  "
                f"{achieved / 1e9:6.0f} GB/s = {achieved / bandwidth:4.0%} of streaming")

    print(f"  {'optax fp32':20s}  {line('optax', base)}")
    for name in names:
        t = statistics.median(timings[name])
        print(f"  {name:20s}  {line(name, t)}  ratio {median_ratio(timings, name, 'optax'):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="all", choices=["bytes", "memory", "time", "all"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--side", type=int, default=2048, help="leaf side for the time benchmark")
    parser.add_argument("--chunk-elements", type=int, default=None,
                        help="quantize_state's chunk_elements (memory and time)")
    parser.add_argument("--leaves", type=int, default=8, help="leaves for the time benchmark")
    parser.add_argument("--formats", default=",".join(("int8",) + FORMATS[1:]),
                        help="comma-separated formats for the time benchmark")
    args = parser.parse_args()
    if args.what in ("bytes", "all"):
        bench_bytes()
    if args.what in ("memory", "all"):
        bench_memory(chunk_elements=args.chunk_elements)
        bench_task_update_memory()
    if args.what in ("time", "all"):
        bench_time(leaves=args.leaves, side=args.side, repeats=args.repeats,
                   formats=tuple(args.formats.split(",")), chunk_elements=args.chunk_elements)


if __name__ == "__main__":
    main()
