"""A peer's checkpoints: written atomically, the best and the last N kept, the newest valid one found.

    checkpoints/step-N.pt    the last `keep` checkpoints, {"model", "optimizer", "step", "recipe", ...}
    checkpoints/best.pt      the checkpoint with the best eval metric so far (also has "metric")
    checkpoints/latest.pt    the newest checkpoint (a hard link to its step-N.pt, or a copy)

Every file is written to a temporary name, flushed to disk, then renamed over its final name:
a kill at any moment leaves either the old file or the new one, never half of one. Plain
`torch.load(path)` reads each of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


def atomic_save(state: dict[str, Any], path: Path) -> None:
    """torch.save `state` to `path` so that a reader (or a crash) never sees a partial file: write
    a temporary file next to it, flush it to disk, rename it over `path`. On any failure the
    temporary file is removed and `path` is left as it was.

    Raises:
        OSError: the file could not be written (disk full, directory gone, ...).
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode as umask says
        with os.fdopen(descriptor, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def _atomic_link(source: Path, target: Path) -> None:
    """Make `target` name the same bytes as `source` (a hard link where possible, else a copy)."""
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, temporary)
    os.replace(temporary, target)


class CheckpointStore:
    """The checkpoints/ folder of one peer of one run.

    Args:
        folder: where the files live (created if missing).
        keep: how many step-N.pt files to keep (the best one is kept besides, as best.pt).
    """

    def __init__(self, folder: Path, keep: int):
        self.folder, self.keep = folder, keep
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob(".*.tmp"):  # a write that a kill interrupted
            leftover.unlink(missing_ok=True)
        self.best_metric: float | None = None
        best = self.folder / "best.pt"
        if best.exists():
            loaded = self._load(best)
            if loaded is not None and isinstance(loaded.get("metric"), (int, float)):
                self.best_metric = float(loaded["metric"])

    def save(self, state: dict[str, Any]) -> Path:
        """Write `state` (it must have "step") as step-N.pt and latest.pt; drop the oldest beyond `keep`."""
        path = self.folder / f"step-{state['step']}.pt"
        atomic_save(state, path)
        _atomic_link(path, self.folder / "latest.pt")
        for old in self.step_files()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def beats_best(self, metric: float) -> bool:
        """True if `metric` (higher is better) beats the best checkpoint's."""
        return self.best_metric is None or metric > self.best_metric

    def offer_best(self, state: dict[str, Any], metric: float) -> bool:
        """Write `state` as best.pt if `metric` (higher is better) beats the best so far. True if it did."""
        if not self.beats_best(metric):
            return False
        atomic_save({**state, "metric": metric}, self.folder / "best.pt")
        self.best_metric = metric
        return True

    def step_files(self) -> list[Path]:
        """step-N.pt files, oldest first."""
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _STEP_FILE.match(p.name))]
        return [path for _, path in sorted(found)]

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads, and its contents; None if there is none. A file that
        does not load (written by an older version, or damaged) is skipped with one logged line."""
        for path in reversed(self.step_files()):
            state = self._load(path)
            if state is not None:
                return path, state
        return None

    @staticmethod
    def _load(path: Path) -> dict[str, Any] | None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any damage: torch raises several kinds
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            logger.warning("Skipping checkpoint %s: it does not load (%s)", path, reason)
            return None
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "model" not in state:
            logger.warning("Skipping checkpoint %s: not a hive checkpoint", path)
            return None
        return state
