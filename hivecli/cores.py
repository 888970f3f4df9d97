"""Sharing a machine's cores between the hive peers that train on it.

torch gives each process one thread per core. Two peers on one machine then run twice as many
threads as there are cores, and torch's threads spin waiting for each other: two peers of the
default recipe on 2 cores trained 20x slower than with one thread each (56 against about 1,250
samples/s per peer). So, unless the user chose (OMP_NUM_THREADS is set, as `hive local` and
torchrun do), each peer uses its share of the cores: cores // (hive peers on this machine),
counted again at every progress report, so that peers that start or stop later are seen too.
"""

from __future__ import annotations

import os

import psutil

TRAINING_COMMANDS = ("start", "join")


def usable_cores() -> int:
    """Cores this process may run on (its affinity: containers and taskset limit it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def is_training_peer(cmdline: list[str]) -> bool:
    """`hive start/join ...` or `python -m hivecli.cli.main start/join ...`."""
    for index, part in enumerate(cmdline[:-1]):
        launcher = os.path.basename(part) == "hive" or part == "hivecli.cli.main"
        if launcher and cmdline[index + 1] in TRAINING_COMMANDS:
            return True
    return False


def training_peers_here() -> int:
    """How many hive training peers run on this machine (this one included, at least 1)."""
    count = 0
    for process in psutil.process_iter(["cmdline"]):
        try:
            if is_training_peer(process.info["cmdline"] or []):
                count += 1
        except (psutil.Error, TypeError):
            continue
    return max(1, count)


def fair_share() -> tuple[int, int] | None:
    """(hive training peers on this machine, this peer's share of the cores); None if the user
    chose the number of threads (OMP_NUM_THREADS)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    peers = training_peers_here()
    return peers, max(1, usable_cores() // peers)
