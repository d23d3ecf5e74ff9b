"""The one user-error type of the command line and of the benchmark scripts, and the argument
parser that raises it (a leaf: it imports nothing of the package)."""
from __future__ import annotations

import argparse
from typing import NoReturn


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
