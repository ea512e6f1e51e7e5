"""The runnable examples in docstrings, run as doctests.

Every module in :data:`MODULES` must hold at least one example (a module listed here whose
examples were deleted fails), and every example must print what its docstring says, under
``ELLIPSIS`` and ``NORMALIZE_WHITESPACE``.
"""

from __future__ import annotations

import doctest
import importlib
import io

import pytest

#: The modules whose docstrings carry examples.
MODULES = [
    "optstate.aliases",
    "optstate.quantization.wrapper",
    "optstate.staleness.resets",
    "optstate.wrappers.multi_steps",
    "optstate.wrappers.compensated",
    "optstate.staleness.measure",
    "optstate.checkpoint.saving",
    "optstate.checkpoint.restoring",
    "optstate.cli.table",
    "optstate.planning",
]

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    # Only the docstrings of objects defined in the module itself (not re-exported ones).
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, name)
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    report = io.StringIO()
    for test in sorted(tests, key=lambda t: t.name):
        runner.run(test, out=report.write)
    failed, attempted = runner.summarize(verbose=False)
    assert attempted > 0, f"{name}: no docstring examples found"
    assert failed == 0, (
        f"{name}: {failed} of {attempted} example statements failed\n{report.getvalue()}")
