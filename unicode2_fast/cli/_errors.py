"""The one user-error type of the command line and the argument parser that raises it."""
from __future__ import annotations

import argparse
from typing import Callable, NoReturn


class UserError(Exception):
    """A mistake in the command line or in its inputs.

    :func:`unicode2_fast.cli.main` reports it as one line, ``unicode2-fast <command>: error: ...``,
    on stderr and exits with status 2. Anything else that goes wrong keeps its traceback.
    """


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`UserError` instead of printing the usage and
    exiting: every command's argparse mistakes then read like its other errors, one line."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message)


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
