"""The kernel every other package builds on: the transform protocol, tree checks, numerics,
the one view of a state leaf and every JAX-version probe (``_compat``).

Depends on nothing else in optstate.
"""
