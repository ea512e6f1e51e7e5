"""The type names every package uses in its signatures (one definition each).

They are aliases for the reader and the type checker only; nothing checks them at run time.
Every module of optstate imports them from here rather than writing ``Any`` again.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

#: Any pytree of arrays (nested tuples, lists, dicts, NamedTuples, registered nodes).
PyTree = Any
#: A pytree of parameters.
Params = PyTree
#: A pytree of updates (gradients on the way in), shaped like the parameters.
Updates = PyTree
#: The state of a gradient transformation.
OptState = PyTree
#: A step -> value function (``optstate.schedules``); the step is an int or an integer array.
Schedule = Callable[[jax.Array | int], jax.Array]
#: A constant hyperparameter or a schedule of it.
ScalarOrSchedule = float | jax.Array | Schedule
#: A mask: a pytree of booleans shaped like the parameters (or a prefix of them), or a function
#: ``params -> mask``; ``None`` where a mask is optional and means "every leaf".
MaskOrFn = PyTree | Callable[[Params], PyTree] | None
