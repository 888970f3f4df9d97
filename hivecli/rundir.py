"""Where a peer keeps its files: OUTPUT/PREFIX/RUN_ID/PEER/.

    runs/digits-demo/20261202-130501-3f9a/kW3x9QeF2pLm/
        peer.json        {"prefix", "run_id", "peer_id"}: whose directory this is
        recipe.toml      the resolved recipe
        metrics.jsonl    one row per report and per eval
        checkpoints/     see hivecli.checkpoints

A run is named by its prefix, and told apart from a later run with the same prefix by its run
id, which the peer that starts it makes up (a UTC time stamp and 4 random hex digits, so they
sort by age) and announces with the run. A peer with the same identity that comes back to the
same run finds its directory again and resumes; a new run, or a new identity, gets a new one.
No torch here.
"""

from __future__ import annotations

import calendar
import json
import re
import secrets
import time
from pathlib import Path

from hivecli._exceptions import ConfigError

_RUN_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{4}$")


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def is_run_id(value: object) -> bool:
    return isinstance(value, str) and bool(_RUN_ID.match(value))


def run_started(run_id: str) -> float | None:
    """When run `run_id` started (Unix time, from the UTC stamp in its id), or None if the id has none."""
    if not is_run_id(run_id):
        return None
    try:
        return calendar.timegm(time.strptime(run_id[:15], "%Y%m%d-%H%M%S"))
    except ValueError:
        return None


def peer_dir(output_dir: str | Path, prefix: str, run_id: str, peer_id: str) -> Path:
    """The directory of peer `peer_id` in run `run_id` (not created here)."""
    return Path(output_dir) / prefix / run_id / peer_id[-12:]


def claim(directory: Path, prefix: str, run_id: str, peer_id: str) -> None:
    """Create `directory` for this peer, or check that it already is this peer's.

    Raises:
        ConfigError: the directory belongs to another peer or run (its peer.json says so).
    """
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / "peer.json"
    mine = {"prefix": prefix, "run_id": run_id, "peer_id": peer_id}
    if marker.exists():
        try:
            found = json.loads(marker.read_text())
        except (OSError, ValueError):
            found = None
        if found != mine:
            raise ConfigError(
                f"{directory} belongs to another peer or run ({marker} says {found}); set output.dir to another folder"
            )
        return
    marker.write_text(json.dumps(mine) + "\n")


def resumable_run(output_dir: str | Path, prefix: str, peer_id: str) -> str | None:
    """The newest run of `prefix` in which this peer left a checkpoint, or None."""
    root = Path(output_dir) / prefix
    if not root.is_dir():
        return None
    mine = [
        p.name
        for p in root.iterdir()
        if is_run_id(p.name) and any((p / peer_id[-12:] / "checkpoints").glob("step-*.pt"))
    ]
    return max(mine, default=None)  # run ids sort by age
