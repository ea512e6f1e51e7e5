"""The argparse types shared by the commands: accepted values and the one-line errors."""

from __future__ import annotations

import argparse

import pytest

from optstate.cli import args


def _error(parse, text: str) -> str:
    with pytest.raises(argparse.ArgumentTypeError) as info:
        parse(text)
    return str(info.value)


def test_number_in_includes_only_the_ends_it_is_told_to():
    open_ = args.number_in(0.0, 1.0)
    closed = args.number_in(0.0, 1.0, include_low=True, include_high=True)
    assert open_("0.5") == 0.5 and open_("5e-324") == 5e-324
    assert closed("0") == 0.0 and closed("1") == 1.0
    for text in ("0", "1", "-0.0", "1.0000000000000002"):
        assert _error(open_, text) == f"expected a number in (0, 1), got {text}"
    assert args.tolerance("0") == 0.0
    assert _error(args.tolerance, "1") == "expected a number in [0, 1), got 1"
    assert args.probability("1") == 1.0


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN"])
def test_number_in_refuses_non_finite_values(text):
    parse = args.number_in(-1e300, 1e300, include_low=True, include_high=True)
    assert _error(parse, text) == f"expected a number in [-1e+300, 1e+300], got {text}"


def test_number_in_explains_its_upper_end_only_above_it():
    parse = args.number_in(0.0, 0.99999, include_high=True, high_note=" (why)")
    assert parse("0.99999") == 0.99999
    assert _error(parse, "0.999999") == "expected a number in (0, 0.99999], got 0.999999 (why)"
    assert _error(parse, "0") == "expected a number in (0, 0.99999], got 0"
    assert _error(parse, "nan") == "expected a number in (0, 0.99999], got nan"
    assert _error(parse, "x") == "expected a number in (0, 0.99999], got 'x'"


def test_integer_types():
    seed = args.integer_in(0, 2**32 - 1, high_note=" (why)")
    assert seed("0") == 0 and seed(str(2**32 - 1)) == 2**32 - 1
    assert _error(seed, "-1") == "expected an integer in 0 .. 4294967295, got -1"
    assert _error(seed, str(2**32)) == (
        "expected an integer in 0 .. 4294967295, got 4294967296 (why)")
    assert _error(seed, "2.0") == "expected an integer in 0 .. 4294967295, got '2.0'"
    assert args.non_negative_int("0") == 0
    assert _error(args.non_negative_int, "-2") == "expected a non-negative integer, got -2"
    assert _error(args.positive_int, "0") == "expected a positive integer, got 0"


def test_parser_names_the_argument_in_one_line(capsys):
    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("--b2", type=args.unit_interval)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--b2", "1.5"])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "demo: error: argument --b2: expected a number in (0, 1), got 1.5")
