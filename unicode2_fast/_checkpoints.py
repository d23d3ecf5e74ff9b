"""Checkpoints of ``u2.build_codebook`` (private core): one state file per finished step.

Each file holds the step's state and the build's parameters and data fingerprint (``run``), so a
rerun with other arguments or other features refuses the directory instead of mixing two builds.
Files are written with :func:`unicode2_fast._io.atomic_write`: an interruption leaves either the
previous state or the new one, never half a file.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch

from ._io import atomic_write

#: bumped when the checkpoint layout changes, so an old directory is refused, not misread
FORMAT = 1


class Checkpoints:
    """State files of one build in ``directory``, each tagged with the build's parameters."""

    def __init__(self, directory: str, run: Dict[str, Any]):
        """``run``: the build's parameters and data fingerprint (``FORMAT`` is added to them)."""
        self.directory = os.fspath(directory)
        self.run = {"format": FORMAT, **run}
        os.makedirs(self.directory, exist_ok=True)

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}.pt")

    def load(self, name: str) -> Optional[Dict[str, Any]]:
        """The state saved as ``name``, or None when there is none.

        Raises:
            ValueError: the file is unreadable, or it comes from a build with other parameters or
                data (the message lists what differs).
        """
        path = self._path(name)
        if not os.path.exists(path):
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises many types for a damaged file
            raise ValueError(f"{path}: unreadable checkpoint ({exc}); delete it to redo that step") from None
        saved = state.get("run", {}) if isinstance(state, dict) else {}
        if saved != self.run:
            changed = [("features: other data (their shape or first / last rows differ)" if key == "fingerprint"
                        else f"{key}: {saved.get(key)!r} there, {self.run.get(key)!r} now")
                       for key in sorted(set(saved) | set(self.run)) if saved.get(key) != self.run.get(key)]
            raise ValueError(
                f"checkpoint_dir {self.directory} holds a build with other parameters or data "
                f"({'; '.join(changed)}); resume with the same arguments and features, or use an empty directory"
            )
        return state

    def save(self, name: str, state: Dict[str, Any]) -> None:
        """Write atomically: a temporary file in the same directory, then one rename."""
        atomic_write(self._path(name), lambda tmp_path: torch.save({**state, "run": self.run}, tmp_path))
