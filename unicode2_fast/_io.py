"""Atomic file writes (no file of ours is ever left half-written) and the JSON reads of our configs."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable


def atomic_write(path: str, write: Callable[[str], None], mode: int = 0o644) -> None:
    """``write(tmp_path)`` into a temporary file next to ``path``, fsync, then rename over ``path``.

    On any error (KeyboardInterrupt included) the temporary file is removed and an existing file
    at ``path`` is left untouched. The rename is made durable by an fsync of the directory.
    ``mode``: permissions of the result (mkstemp creates 0600; saved models are meant to be shared).
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp_path)
        with open(tmp_path, "r+b") as tmp_file:
            os.fsync(tmp_file.fileno())
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    if os.name == "posix":
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # persist the rename itself
        finally:
            os.close(dir_fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` with :func:`atomic_write`."""

    def write(tmp_path: str) -> None:
        with open(tmp_path, "w", encoding="utf-8") as file:
            file.write(text)

    atomic_write(path, write)


def load_json(path: str) -> Any:
    """The parsed JSON of the file at ``path`` (UTF-8).

    Raises:
        ValueError: the file is not valid UTF-8 JSON (the message names the path). OSError as
        ``open`` raises it (callers check for a missing file first, with their own message).
    """
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
