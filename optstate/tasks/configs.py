"""Named optimizer-state configurations: AdamW with its state stored in a given format.

A configuration name is ``<format>[-sr][+reset]``:

* ``<format>``: how the optimizer state is stored, one of :data:`FORMATS` (the names of
  the registry :mod:`optstate.quantization.formats`; ``fp32`` is plain AdamW);
* ``-sr``: stochastic instead of nearest rounding when writing the state;
* ``+reset``: reset the moments every ``K`` steps (``optstate.reset_every_n``), with ``K``
  from the staleness model (``optstate.staleness.reset_period(format, b2)``).

Every configuration is AdamW built from optstate's own transforms (``scale_by_adam``,
``add_decayed_weights``, ``scale_by_learning_rate``, wrapped in ``quantize_state`` and
``reset_every_n``); configurations whose transform is missing from this installation are
reported as unavailable rather than silently skipped.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from optstate.quantization import formats

REFERENCE = "fp32"
"""The configuration every other one is compared with."""

DEFAULT_CONFIGS: tuple[str, ...] = (
    "fp32",
    "bf16",
    "bf16-sr",
    "int8",
    "int4",
    "fp8_e4m3",
    "bf16+reset",
    "bf16-sr+reset",
)
"""What ``optstate compare`` runs when no ``--configs`` are given (those available)."""

_SR_SUFFIX = "-sr"
_RESET_SUFFIX = "+reset"


def _split_name(name: str) -> tuple[str, bool, bool]:
    """``<format>[-sr][+reset]`` -> ``(format, stochastic, reset)``; the format unchecked."""
    rest = name.strip()
    reset = rest.endswith(_RESET_SUFFIX)
    if reset:
        rest = rest[: -len(_RESET_SUFFIX)]
    stochastic = rest.endswith(_SR_SUFFIX)
    if stochastic:
        rest = rest[: -len(_SR_SUFFIX)]
    return rest, stochastic, reset


FORMATS: tuple[str, ...] = tuple(
    name for name in dict.fromkeys([_split_name(c)[0] for c in DEFAULT_CONFIGS] + [*formats.NAMES])
    if name in formats.FORMATS
)
"""State storage formats accepted in configuration names: the formats of the registry, those
of :data:`DEFAULT_CONFIGS` first and in their order (so that messages list the reference and
the usual formats before the others)."""


class ConfigError(ValueError):
    """An unknown, malformed or unavailable configuration name."""


@dataclass(frozen=True)
class Hyperparameters:
    """AdamW settings shared by every configuration.

    ``b2 = 0.99`` (not Adam's usual 0.999): the runs are a few hundred steps, and a second
    moment with a 1000-step memory would still be in its bias-corrected warm-up at the end.
    With 0.99 (a 100-step memory) the second moment reaches its steady state within the run,
    which is where stalling happens: for bf16 and nearest rounding the staleness model
    predicts about 13% of ``nu``'s updates round back to the stored value, and its bf16 reset
    period (103 steps) is short enough for resets to happen within the run (at 0.999 it is
    1116 steps, longer than the run).

    Attributes:
      learning_rate: peak learning rate of the warm-up + cosine schedule.
      warmup_fraction: fraction of the run spent in linear warm-up.
      b1, b2, eps: Adam's decays and epsilon.
      weight_decay: decoupled weight decay.
      min_size: leaves with fewer elements keep fp32 state (``quantize_state``'s default).
    """

    learning_rate: float = 3e-3
    warmup_fraction: float = 0.05
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.01
    min_size: int = 4096


@dataclass(frozen=True)
class StateConfig:
    """A parsed configuration name.

    Attributes:
      name: the name as given, e.g. ``"bf16-sr+reset"``.
      fmt: the storage format, one of :data:`FORMATS`.
      rounding: ``"nearest"`` or ``"stochastic"``.
      reset: whether the moments are reset periodically.
    """

    name: str
    fmt: str
    rounding: str
    reset: bool

    def describe(self) -> str:
        """A short human-readable description."""
        text = "AdamW, fp32 state" if self.fmt == "fp32" else f"AdamW, {self.fmt} state"
        if self.fmt != "fp32":
            text += f", {self.rounding} rounding"
        if self.reset:
            text += ", periodic moment reset"
        return text

    def requirements(self) -> tuple[str, ...]:
        """The optstate attributes (``module:attr``) this configuration is built from."""
        needed = [
            "optstate:scale_by_adam",
            "optstate:add_decayed_weights",
            "optstate:scale_by_learning_rate",
            "optstate.schedules:warmup_cosine_decay",
            "optstate.memory:state_bytes",
        ]
        if self.fmt != "fp32":
            needed.append("optstate:quantize_state")
        if self.reset:
            needed += ["optstate:reset_every_n", "optstate.staleness:reset_period"]
        return tuple(needed)

    def missing(self) -> tuple[str, ...]:
        """Those :meth:`requirements` this installation lacks."""
        return tuple(req for req in self.requirements() if _resolve(req) is None)


def _resolve(requirement: str) -> Any:
    module_name, attr = requirement.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return getattr(module, attr, None)


def accepted_names_text() -> str:
    """One line describing the accepted configuration names (for error messages and help)."""
    return (
        f"a configuration is <format>[{_SR_SUFFIX}][{_RESET_SUFFIX}] with <format> one of "
        f"{', '.join(FORMATS)} (e.g. {', '.join(DEFAULT_CONFIGS)})"
    )


def parse_config(name: str) -> StateConfig:
    """Parses ``<format>[-sr][+reset]``.

    Raises:
      ConfigError: naming the accepted formats and suffixes if ``name`` is not of that form.
    """
    rest, stochastic, reset = _split_name(name)
    if rest not in FORMATS:
        raise ConfigError(f"unknown configuration {name!r}: {accepted_names_text()}.")
    if stochastic and rest == "fp32":
        raise ConfigError(
            f"configuration {name!r}: fp32 state is not rounded, so '{_SR_SUFFIX}' does not "
            f"apply; use 'fp32' or a narrower format such as 'bf16{_SR_SUFFIX}'."
        )
    return StateConfig(name=name, fmt=rest, rounding="stochastic" if stochastic else "nearest",
                       reset=reset)


def parse_configs(names: list[str] | tuple[str, ...]) -> list[StateConfig]:
    """Parses and de-duplicates ``names`` (order kept), then checks each is available.

    Raises:
      ConfigError: for an unknown name, or one whose transforms this installation lacks.
    """
    configs = [parse_config(name) for name in dict.fromkeys(names)]
    for config in configs:
        missing = config.missing()
        if missing:
            raise ConfigError(
                f"configuration {config.name!r} needs "
                f"{', '.join(m.replace(':', '.') for m in missing)}, which this installation of "
                "optstate does not provide."
            )
    return configs


def available_defaults() -> list[StateConfig]:
    """The :data:`DEFAULT_CONFIGS` whose transforms exist in this installation."""
    configs = [parse_config(name) for name in DEFAULT_CONFIGS]
    return [config for config in configs if not config.missing()]


def reset_period(config: StateConfig, hyper: Hyperparameters) -> int | None:
    """The reset period ``K`` of a ``+reset`` configuration (``None`` without reset).

    Raises:
      ConfigError: if the staleness model has no period for this format.
    """
    if not config.reset:
        return None
    from optstate import staleness

    try:
        return int(staleness.reset_period(config.fmt, hyper.b2))
    except (ValueError, TypeError) as error:
        raise ConfigError(f"configuration {config.name!r}: no reset period: {error}") from None


def build_optimizer(config: StateConfig, hyper: Hyperparameters, steps: int) -> Any:
    """The ``GradientTransformation`` of ``config`` for a training run of ``steps`` steps.

    AdamW with a linear warm-up over ``hyper.warmup_fraction`` of the run and a cosine decay
    to a tenth of the peak learning rate; see :func:`adamw_with_state` for the state.
    """
    from optstate import schedules

    warmup = max(1, int(round(hyper.warmup_fraction * steps)))
    schedule = schedules.warmup_cosine_decay(
        0.0, hyper.learning_rate, warmup, max(steps, warmup + 1),
        end_value=0.1 * hyper.learning_rate,
    )
    return adamw_with_state(config, hyper, schedule)


def adamw_with_state(config: StateConfig, hyper: Hyperparameters, learning_rate: Any) -> Any:
    """AdamW whose moments are stored as ``config`` says.

    ``chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)`` (what
    ``optstate.adamw`` is), with ``scale_by_adam`` wrapped in ``reset_every_n`` for
    ``+reset`` (only Adam's moments and its bias-correction count are ever reset, never the
    learning-rate schedule's count) and the chain in ``quantize_state`` for a format other
    than fp32 (its only large state is Adam's moments).

    Args:
      config: the state configuration.
      hyper: the AdamW settings (``learning_rate`` there is ignored in favour of the argument).
      learning_rate: a float or a schedule.
    """
    import optstate

    adam = optstate.scale_by_adam(b1=hyper.b1, b2=hyper.b2, eps=hyper.eps)
    period = reset_period(config, hyper)
    if period is not None:
        adam = optstate.reset_every_n(adam, period)
    tx = optstate.chain(
        adam,
        optstate.add_decayed_weights(hyper.weight_decay),
        optstate.scale_by_learning_rate(learning_rate),
    )
    if config.fmt == "fp32":
        return tx
    # around the whole chain (whose update is elementwise per parameter), so that
    # optstate.update_and_apply writes the parameters in place in quantize_state's loop
    return optstate.quantize_state(tx, fmt=config.fmt, rounding=config.rounding,
                                   min_size=hyper.min_size)
