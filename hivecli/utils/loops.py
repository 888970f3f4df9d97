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
