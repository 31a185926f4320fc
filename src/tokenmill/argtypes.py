"""argparse `type=` converters shared by the command-line tools: a bad value becomes a clear usage error."""
from __future__ import annotations

import argparse
import math
from typing import Callable, TypeVar

N = TypeVar("N", int, float)


def parse_number(s: str, cast: Callable[[str], N], what: str) -> N:
    """`cast(s)`, or a usage error saying that `what` was expected."""
    try:
        return cast(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None


def _require(v: N, ok: bool, bound: str, s: str) -> N:
    if not ok:
        raise argparse.ArgumentTypeError(f"must be {bound}, got {s}")
    return v


def positive_int(s: str) -> int:
    v = parse_number(s, int, "a positive integer")
    return _require(v, v >= 1, ">= 1", str(v))


def non_negative_int(s: str) -> int:
    v = parse_number(s, int, "an integer >= 0")
    return _require(v, v >= 0, ">= 0", str(v))


def positive_float(s: str) -> float:
    v = parse_number(s, float, "a positive number")
    return _require(v, v > 0 and math.isfinite(v), "a positive number", s)


def non_negative_float(s: str) -> float:
    v = parse_number(s, float, "a number >= 0")
    return _require(v, v >= 0 and math.isfinite(v), ">= 0", s)


def fraction(s: str) -> float:
    v = positive_float(s)
    return _require(v, v <= 1, "in (0, 1]", s)
