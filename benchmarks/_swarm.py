"""Shared by the benchmarks that start one peer per process."""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import signal
import sys
from typing import Any


def exit_with_parent() -> None:
    """Have the kernel kill this process when the one that started it dies, however it dies (a
    signal, `timeout`, kill -9): a benchmark stops its workers in a `finally`, which a signal
    may skip, and spawned workers then stayed behind, their peers busy. Linux only
    (prctl PR_SET_PDEATHSIG); elsewhere it does nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the prctl
        os._exit(1)


class WorkerProcess(multiprocessing.context.SpawnProcess):
    """A spawned worker (`multiprocessing`'s "spawn" start method) that dies with the benchmark
    that started it (`exit_with_parent`). Start it from the main thread: the kernel kills it
    when the thread that started it exits."""

    def run(self) -> None:
        exit_with_parent()
        super().run()


def join_swarm(rank: int, world: int, addr_q: Any) -> Any:
    """A started `hivecli.DHT`: rank 0 starts the DHT and hands its addresses to the `world - 1`
    others through `addr_q`; they join through it."""
    from hivecli import DHT

    if rank == 0:
        dht = DHT(start=True)
        for _ in range(world - 1):
            addr_q.put([str(a) for a in dht.get_visible_maddrs()])
        return dht
    return DHT(initial_peers=addr_q.get(timeout=60), start=True)
