"""The kernel every other package builds on.

* ``base``: the transform protocol (``GradientTransformation``, ``EmptyState``,
  ``init_empty_state``, ``identity``, ``set_to_zero``, ``chain``, ``apply_updates``).
* ``types``: the type names (``PyTree``, ``Params``, ``OptState``, ``MaskOrFn``, ...).
* ``tree_checks``: structure checks whose errors name the leaf path.
* ``checks``: checks of the arguments users write (hyperparameter ranges, dtypes,
  transforms, states) whose errors name the argument and the value given.
* ``numerics``: the step counter (``safe_increment``), moments, norms.
* ``leaves``: the one view of a state leaf (Flax boxes, path names, NamedTuple fields).
* ``_compat``: every JAX-version probe; ``version``: the package version.

Depends on nothing else in optstate.
"""
