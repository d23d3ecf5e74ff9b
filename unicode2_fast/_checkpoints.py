"""Checkpoints of ``u2.build_codebook`` (private core): one state file per finished step.

Each file holds the step's state, its own name and the build's parameters and data fingerprint
(``run``), so a rerun with other arguments or other features refuses the directory instead of
mixing two builds, and a file copied over another, of other shapes or damaged is refused by name.
Files are written with :func:`unicode2_fast._io.atomic_write`: an interruption leaves either the
previous state or the new one, never half a file.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import torch

from ._io import atomic_write

#: bumped when the checkpoint layout changes, so an old directory is refused, not misread
FORMAT = 2


class Checkpoints:
    """State files of one build in ``directory``, each tagged with the build's parameters."""

    def __init__(self, directory: str, run: Dict[str, Any]):
        """``run``: the build's parameters and data fingerprint (``FORMAT`` is added to them)."""
        self.directory = os.fspath(directory)
        self.run = {"format": FORMAT, **run}
        os.makedirs(self.directory, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}.pt")

    def load(self, name: str, expected: Dict[str, Tuple[Tuple[int, ...], torch.dtype]]) -> Optional[Dict[str, Any]]:
        """The state saved as ``name``, or None when there is none.

        ``expected``: the tensors the state must hold, each with its shape and dtype.

        Raises:
            ValueError: the file is unreadable, holds another step's state or tensors of other
                shapes or dtypes, or comes from a build with other parameters or data (the
                message lists what differs).
        """
        path = self.path(name)
        if not os.path.exists(path):
            return None
        hint = "delete it to redo that step"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises many types for a damaged file
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"{path}: unreadable checkpoint ({first_line}); {hint}") from None
        if not isinstance(state, dict):
            raise ValueError(f"{path}: not a build_codebook checkpoint; {hint}")
        saved = state.get("run", {})
        if saved != self.run:
            changed = [("features: other data (their shape or rows differ)" if key == "fingerprint"
                        else f"{key}: {saved.get(key)!r} there, {self.run.get(key)!r} now")
                       for key in sorted(set(saved) | set(self.run)) if saved.get(key) != self.run.get(key)]
            raise ValueError(
                f"checkpoint_dir {self.directory} holds a build with other parameters or data "
                f"({'; '.join(changed)}); resume with the same arguments and features, or use an empty directory"
            )
        if state.get("name") != name:
            raise ValueError(f"{path}: holds the state of step {state.get('name')!r}, not {name!r} "
                             f"(a file copied over another?); {hint}")
        for key, (shape, dtype) in expected.items():
            value = state.get(key)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(shape) or value.dtype != dtype:
                found = (f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor)
                         else "nothing" if value is None else type(value).__name__)
                raise ValueError(f"{path}: {key} should be a {tuple(shape)} {dtype} tensor, found {found}; {hint}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{path}: {key} holds NaN or Inf; {hint}")
        return state

    def save(self, name: str, state: Dict[str, Any]) -> None:
        """Write atomically: a temporary file in the same directory, then one rename."""
        atomic_write(self.path(name), lambda tmp_path: torch.save({**state, "name": name, "run": self.run}, tmp_path))
