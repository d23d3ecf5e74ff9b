"""Output paths of the commands: checked before any work starts, missing parent folders created
at save time, and a failed save reported with the name of its target (never of the hidden
temporary file the write goes through)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable, Dict, Iterator, List, Mapping

from ._errors import UserError


def _check_creatable(directory: str, option: str, path: str) -> None:
    """``directory`` exists as a writable folder, or its nearest existing ancestor is one."""
    existing = directory or os.curdir
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing) or os.curdir
    if not os.path.isdir(existing):
        raise UserError(f"{option} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: folder {existing} is not writable")


def check_out_file(path: str, option: str = "--out") -> None:
    """Raise UserError unless ``path`` can be written as a file (missing parent folders are fine:
    they are created by :func:`make_parent`)."""
    if os.path.isdir(path):
        raise UserError(f"{option} {path}: is a folder, expected a file path")
    _check_creatable(os.path.dirname(os.path.normpath(path)), option, path)


def check_out_dir(path: str, option: str = "--out") -> None:
    """Raise UserError unless ``path`` is, or can be created as, a writable folder."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"{option} {path}: exists and is not a folder")
    _check_creatable(os.path.normpath(path), option, path)


def make_parent(path: str) -> None:
    """Create the missing parent folders of the file ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


@contextlib.contextmanager
def saving(path: str) -> Iterator[None]:
    """Report an OSError raised while saving ``path`` as a UserError that names ``path``."""
    try:
        yield
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from error


def write_together(writers: Mapping[str, Callable[[str], None]]) -> None:
    """Write several files, all or none (the multi-file counterpart of ``_io.atomic_write``).

    Each ``write(tmp_path)`` fills a hidden temporary file next to its path (missing parent folders
    are created); only once every one is written and fsynced are they renamed into place. On any
    error, KeyboardInterrupt included, the temporary files and the files already renamed are
    removed.

    Raises:
        UserError: an OSError while writing or renaming, naming the target path.
    """
    staged: Dict[str, str] = {}
    renamed: List[str] = []
    try:
        for path, write in writers.items():
            with saving(path):
                make_parent(path)
                fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                                prefix=f".{os.path.basename(path)}.", suffix=".tmp")
                os.close(fd)
                staged[path] = tmp_path
                write(tmp_path)
                with open(tmp_path, "r+b") as tmp_file:
                    os.fsync(tmp_file.fileno())
                os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        for path, tmp_path in staged.items():
            with saving(path):
                os.replace(tmp_path, path)
            renamed.append(path)
    except BaseException:
        for tmp_path in staged.values():
            if os.path.exists(tmp_path):
                os.unlink(tmp_path)
        for path in renamed:
            os.unlink(path)
        raise
    if os.name == "posix":
        for directory in {os.path.dirname(os.path.abspath(path)) for path in renamed}:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # persist the renames themselves
            finally:
                os.close(dir_fd)
