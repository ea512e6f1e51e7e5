"""The embedded default task: a byte-level transformer LM on Python's stdlib sources.

No download: the text is the standard library of the running interpreter, read in a fixed
order with a fixed held-out split (:mod:`optstate.tasks.stdlib_text`). The model is a small
decoder-only transformer in Flax NNX (:mod:`optstate.tasks.transformer`), trained by a jitted,
donated step (:mod:`optstate.tasks.training`). :mod:`optstate.tasks.configs` names the
optimizer-state configurations that ``optstate compare`` runs (:mod:`optstate.tasks.compare`,
:mod:`optstate.tasks.report`).

Names are imported lazily (Flax and JAX load on first use)::

    from optstate.tasks import load_corpus, ModelConfig, TrainConfig, init_model
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ByteCorpus": "stdlib_text",
    "load_corpus": "stdlib_text",
    "TRAIN_MODULES": "stdlib_text",
    "HELDOUT_MODULES": "stdlib_text",
    "VOCAB_SIZE": "stdlib_text",
    "ModelConfig": "transformer",
    "TransformerLM": "transformer",
    "next_token_loss": "transformer",
    "TrainConfig": "training",
    "RunResult": "training",
    "init_model": "training",
    "make_loss_fn": "training",
    "make_train_step": "training",
    "make_eval_fn": "training",
    "num_params": "training",
    "run_training": "training",
    "Hyperparameters": "configs",
    "StateConfig": "configs",
    "ConfigError": "configs",
    "FORMATS": "configs",
    "DEFAULT_CONFIGS": "configs",
    "parse_config": "configs",
    "build_optimizer": "configs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"optstate.tasks.{_EXPORTS[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'optstate.tasks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
