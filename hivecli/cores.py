"""Sharing a machine's cores between the hive peers that train on it.

torch gives each process one thread per core. Two peers on one machine then run twice as many
threads as there are cores, and torch's threads spin waiting for each other: two peers of the
default recipe on 2 cores trained 20x slower than with one thread each (56 against about 1,250
samples/s per peer). So, unless the user chose (OMP_NUM_THREADS is set, as `hive local` and
torchrun do), each peer uses its share of the cores: usable_cores() (its affinity, at most its
container's CPU quota) // (hive peers on this machine), counted again at every progress report,
so that peers that start or stop later are seen too.
The threads of hive's own data plane run torch's ops on one OpenMP thread each
(`single_threaded_here`).
"""

from __future__ import annotations

import ctypes
import math
import os
import re
from collections.abc import Callable

import psutil

TRAINING_COMMANDS = ("start", "join")


# Where a container's CPU quota is (`docker --cpus`, a Kubernetes CPU limit): cgroup v2's
# "QUOTA PERIOD" (or "max PERIOD": none), then cgroup v1's two files (quota -1: none).
CGROUP_V2_CPU_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP_V1_CPU_QUOTA = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def usable_cores() -> int:
    """Cores this process may run on: its affinity (taskset, cpusets), and at most its
    container's CPU quota rounded up (a 2-CPU quota on a 64-core host is 2: threads beyond it
    only wait for the quota, and spin while they wait)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def cgroup_cpu_quota() -> float | None:
    """CPUs this process's cgroup may use per unit of time (quota / period), or None without a
    quota (or no cgroup file to read: not Linux, or not in a container)."""
    try:
        with open(CGROUP_V2_CPU_MAX, encoding="ascii") as f:
            fields = f.read().split()
    except (OSError, ValueError):
        fields = []
        try:
            for path in CGROUP_V1_CPU_QUOTA:
                with open(path, encoding="ascii") as f:
                    fields.append(f.read().strip())
        except (OSError, ValueError):
            return None
    try:
        quota, period = (int(field) for field in fields)
    except ValueError:  # "max", or not two numbers
        return None
    return quota / period if quota > 0 and period > 0 else None


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


def cores_per_peer() -> int:
    """This machine's cores shared among the hive training peers on it (at least 1), whatever
    OMP_NUM_THREADS says: what one peer's data plane can count on. Scans the process table
    (milliseconds): callers cache it."""
    return max(1, usable_cores() // training_peers_here())


def single_threaded_here() -> bool:
    """Make torch's CPU ops on the calling thread run on one OpenMP thread, leaving every other
    thread (the training loop's) as it is; True if it could. Cheap once done: call it freely.

    The averaging data plane (reductions, finiteness checks, copies) runs on the DHT's thread
    and on bulk links' threads. Those ops are memory-bound, so more threads barely speed them
    up. What they do cost: a thread that is the first in its process to run a parallel torch op
    gets a team of one OpenMP thread per core, whose threads busy-wait after every op while
    they do not outnumber the cores. With 4 peers on 2 cores, each peer's spinning threads took
    the cores from the others' data plane: 4 peers x 50M averaged in 4.0 s instead of 0.40-0.47
    s, 4 x 1M in 550-600 ms instead of 30-37 ms (half of all CPU time in libgomp). A process whose
    main thread ran a parallel op first (a training step) escaped by luck (OpenMP then throttles
    the spinning), which is what the benchmarks measured: there, one thread changes nothing
    beyond noise (benchmarks/bench_averaging.py, docs/benchmarks.md).

    Not torch.set_num_threads(1): it also changes the process-wide setting (thread pools and
    every thread created later), which halved the training loop's speed. OpenMP's own
    omp_set_num_threads sets only the calling thread's count. torch sets each thread's count
    when that thread first asks for it (`get_num_threads`), so it is asked first, lest it
    override ours later.
    """
    import torch

    global _omp_setter
    if torch.get_num_threads() == 1:
        return True
    # Other packages bring their own OpenMP runtime (scikit-learn vendors a libgomp); the right
    # one is the one whose setting torch then reports.
    candidates = [_omp_setter] if _omp_setter is not None else _omp_setters()
    for setter in candidates:
        setter(1)
        if torch.get_num_threads() == 1:
            _omp_setter = setter
            return True
    return False


_omp_setter: Callable[[int], None] | None = None  # the one that worked


def _omp_setters() -> list[Callable[[int], None]]:
    """`omp_set_num_threads` of every OpenMP runtime loaded in this process (GNU, Intel, LLVM)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = sorted({line.split()[-1] for line in maps if _OPENMP_LIBRARY.search(line)})
    except OSError:  # not Linux: torch's own threads stay as they are
        return []
    setters = []
    for path in paths:
        try:
            setters.append(ctypes.CDLL(path).omp_set_num_threads)  # already loaded: this only looks it up
        except (OSError, AttributeError):
            continue
    return setters


_OPENMP_LIBRARY = re.compile(r"/lib(?:g|i|)omp[0-9]*[.-][^/]*$")
