"""Test helpers shipped with the product: spin up local swarms and wait on conditions.

from hivecli.testing import local_swarm, wait_for

with local_swarm(8) as dhts:            # 8 DHT peers on 127.0.0.1, port 0
    dhts[3].store("key", "value", get_dht_time() + 60)
    wait_for(lambda: dhts[5].get("key") is not None, timeout=10, what="key to appear")
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from hivecli.dht.dht import DHT

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float, what: str = "condition", interval: float = 0.02) -> T:
    """Poll `condition` until it returns something truthy, and return that.

    Raises:
        TimeoutError: still falsy after `timeout` seconds; the message names `what`.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def launch_swarm(n: int, *, seed: int | None = None, **dht_kwargs: Any) -> list[DHT]:
    """Start `n` DHT peers on loopback: the first starts the DHT, each later one joins
    through a random earlier one. The caller must `shutdown()` them (or use `local_swarm`)."""
    rng = random.Random(seed)
    dhts: list[DHT] = []
    try:
        for _ in range(n):
            initial = [str(a) for a in rng.choice(dhts).get_visible_maddrs()] if dhts else []
            dhts.append(DHT(initial_peers=initial, start=True, **dht_kwargs))
    except BaseException:
        shutdown_all(dhts)
        raise
    return dhts


def shutdown_all(dhts: list[DHT]) -> None:
    for dht in dhts:
        dht.shutdown()


@contextlib.contextmanager
def local_swarm(n: int, **kwargs: Any) -> Iterator[list[DHT]]:
    """`launch_swarm` as a context manager that shuts every peer down on exit."""
    dhts = launch_swarm(n, **kwargs)
    try:
        yield dhts
    finally:
        shutdown_all(dhts)


__all__ = ["launch_swarm", "local_swarm", "shutdown_all", "wait_for"]
