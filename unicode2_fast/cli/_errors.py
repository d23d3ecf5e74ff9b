"""Argument types of the command line; its one user-error type and the parser that raises it live in
``unicode2_fast._errors`` (the benchmarks, below the CLI, raise the same type)."""
from __future__ import annotations

import argparse
from typing import Callable

from .._errors import OneLineErrorParser, UserError

__all__ = ["OneLineErrorParser", "UserError", "int_at_least", "positive_float"]


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum`` (argparse names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value
