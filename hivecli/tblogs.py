"""TensorBoard event files: a peer's progress as scalars, and the curves of many peers as runs.

With `output.tensorboard = true` each peer writes, beside metrics.jsonl,

    runs/PREFIX/RUN_ID/PEER/tensorboard/events.out.tfevents.*

one point per progress report, at the peer's step and the real wall time; `tensorboard --logdir
runs/` then shows every peer of every run as a run of its own. A field becomes a scalar under a
tag of its group (`TAGS`), so that TensorBoard draws each group in a section of its own:

    train/      this peer's training: loss, samples_per_s, samples
    eval/       its test accuracy
    run/        the whole run as this peer sees it: peers, samples, goal_samples, eta_s
    averaging/  rounds, last_group_size, bytes_sent/received, the collaborative and DiLoCo epochs

A field with a `/` in its name is its own tag; any other unknown field goes under `train/`.
`step` and `time` are no scalars: they are the point's step and wall time. Only finite numbers
are written (a float32 in the file); None, true/false, text, lists and nan or inf are skipped.

`export_curves` writes the curves that `hive monitor` gathered from the DHT, a directory per peer.

Writing needs the `tensorboard` package (`pip install 'hivecli[tensorboard]'`); without it,
ScalarLog and export_curves raise ConfigError. This module imports torch only then, when a
writer is made, so importing it stays cheap.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from hivecli._exceptions import ConfigError
from hivecli.utils.values import finite

__all__ = ["NOT_SCALARS", "TAGS", "ScalarLog", "export_curves", "require_tensorboard", "run_name", "scalar", "tag"]

TAGS: dict[str, str] = {
    "loss": "train/loss",
    "samples_per_s": "train/samples_per_s",
    "samples": "train/samples",
    "accuracy": "eval/accuracy",
    "best_accuracy": "eval/best_accuracy",
    "peers": "run/peers",
    "run_samples": "run/samples",
    "goal_samples": "run/goal_samples",
    "eta_s": "run/eta_s",
    "rounds": "averaging/rounds",
    "last_group_size": "averaging/last_group_size",
    "group_size": "averaging/group_size",
    "bytes_sent": "averaging/bytes_sent",
    "bytes_received": "averaging/bytes_received",
    "epoch": "averaging/epoch",
    "global_epoch": "averaging/global_epoch",
    "epoch_progress": "averaging/epoch_progress",
    "epoch_target": "averaging/epoch_target",
    "epoch_eta": "averaging/epoch_eta_s",
}
NOT_SCALARS = frozenset({"step", "time"})  # a point's step and wall time, not curves of their own
_FLOAT32_MAX = 3.4028234663852886e38  # larger values would be inf in the file
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_SETTING = "output.tensorboard = true"
_SETTING_OFF = "or set output.tensorboard = false"


def tag(name: str) -> str:
    """The TensorBoard tag of field `name` (see the module's docstring)."""
    if "/" in name:
        return name
    return TAGS.get(name, f"train/{name}")


def scalar(value: Any) -> float | None:
    """`value` as the float to write, or None if it is no finite number (bools are no numbers here)
    or too large for the file's float32."""
    return finite(value, -_FLOAT32_MAX, _FLOAT32_MAX)


def require_tensorboard(needed_by: str = _SETTING, otherwise: str = _SETTING_OFF) -> type:
    """torch's SummaryWriter class, importing it (and torch) now.

    Raises:
        ConfigError: the tensorboard package is missing or too old; the message names
            `needed_by` and the fix.
    """
    fix = f"install it with pip install 'hivecli[tensorboard]'{', ' + otherwise if otherwise else ''}"
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name in ("tensorboard", "torch.utils.tensorboard"):
            raise ConfigError(f"{needed_by} needs the tensorboard package; {fix}") from None
        # too old (torch wants 1.15 or later), or a package it needs is missing or broken
        broken = f"{needed_by} needs a working tensorboard package (importing it failed: {e})"
        raise ConfigError(f"{broken}; {fix.replace('pip install', 'pip install --upgrade')}") from e
    return SummaryWriter


class ScalarLog:
    """Scalars into TensorBoard event files in `directory` (created if missing).

    Args:
        directory: where the event files go; TensorBoard shows it as one run.
        flush_secs: the longest a point waits in memory before it reaches the file.

    Raises (from the constructor):
        ConfigError: the tensorboard package is not installed.
    """

    def __init__(self, directory: Path, *, flush_secs: float = 10.0) -> None:
        writer_class = require_tensorboard()
        self.directory = Path(directory)
        self._writer = writer_class(log_dir=str(self.directory), flush_secs=flush_secs)
        self._closed = False

    def add(self, step: int, fields: dict[str, Any], wall_time: float | None = None) -> int:
        """Write each field that is a finite number under its tag, at `step` and `wall_time`
        (now, if None). Returns how many scalars were written."""
        when = time.time() if wall_time is None else float(wall_time)
        written = 0
        for name, value in fields.items():
            number = scalar(value)
            if name in NOT_SCALARS or number is None:
                continue
            self._writer.add_scalar(tag(name), number, global_step=int(step), walltime=when)
            written += 1
        return written

    def flush(self) -> None:
        """Write what is buffered to the files now."""
        if not self._closed:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the files; a second close does nothing."""
        if not self._closed:
            self._closed = True
            self._writer.close()

    def __enter__(self) -> ScalarLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def run_name(peer: str) -> str:
    """A directory name for `peer` that is safe on any file system: letters, digits, `_`, `.`, `-`."""
    name = _UNSAFE.sub("_", str(peer))[:128].lstrip(".")
    return name or "peer"


def export_curves(directory: Path, series: dict[str, list[tuple[float, int, dict[str, Any]]]]) -> list[Path]:
    """Write each peer's points, (wall_time, step, fields), into `directory/PEER/`, so that
    TensorBoard (`tensorboard --logdir DIRECTORY`) shows every peer as a run of its own. A peer's
    points are written in the order of their wall times. Returns the directories written, in
    the order of `series`; two peers whose names are the same once made safe get `-2`, `-3`...

    Raises:
        ConfigError: the tensorboard package is not installed.
    """
    require_tensorboard("exporting TensorBoard event files", "")  # before any directory is made
    directory = Path(directory)
    written: list[Path] = []
    taken: set[str] = set()
    for peer, points in series.items():
        base = name = run_name(peer)
        n = 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name)
        target = directory / name
        with ScalarLog(target) as log:
            for wall_time, step, fields in sorted(points, key=lambda point: point[0]):
                log.add(step, fields, wall_time=wall_time)
        written.append(target)
    return written
