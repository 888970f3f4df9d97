"""Which event loop the background threads run, and the one timeout idiom every wait uses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator

if sys.version_info >= (3, 11):
    timeout = asyncio.timeout  # `async with timeout(s):` raises TimeoutError; no extra task, unlike wait_for
else:  # pragma: no cover - Python 3.10

    @contextlib.asynccontextmanager
    async def timeout(delay: float | None) -> AsyncIterator[None]:
        """asyncio.timeout for Python 3.10: cancel the current task at the deadline and turn that
        cancellation (and only that one) into TimeoutError."""
        task = asyncio.current_task()
        assert task is not None
        handle = asyncio.get_running_loop().call_later(delay, task.cancel) if delay is not None else None
        try:
            yield
        except asyncio.CancelledError:
            if handle is not None and handle.when() <= asyncio.get_running_loop().time():
                raise asyncio.TimeoutError() from None
            raise
        finally:
            if handle is not None:
                handle.cancel()


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


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set or `seconds` pass; True if it was set.

    Not `asyncio.wait_for(event.wait(), timeout)`: on Python 3.11 that swallows a cancellation
    that arrives in the same loop iteration as the event, so a loop built on it can outlive
    the `cancel()` meant to stop it (seen: a shutdown that hung for good).
    """
    try:
        async with timeout(seconds):
            await event.wait()
        return True
    except asyncio.TimeoutError:
        return False
