"""Which event loop the background threads run."""

from __future__ import annotations

import asyncio
import os


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop where installed (its C loop cuts the per-message cost several-fold,
    which is most of a DHT request's latency), else asyncio's. HIVE_EVENT_LOOP=asyncio forces
    the standard loop."""
    if os.environ.get("HIVE_EVENT_LOOP", "").lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set or `timeout` seconds pass; True if it was set.

    Not `asyncio.wait_for(event.wait(), timeout)`: on Python 3.11 that swallows a cancellation
    that arrives in the same loop iteration as the event, so a loop built on it can outlive
    the `cancel()` meant to stop it (seen: a shutdown that hung for good).
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
        return True
    except TimeoutError:
        return False
