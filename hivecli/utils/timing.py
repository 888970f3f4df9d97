"""Time as the DHT sees it."""

from __future__ import annotations

import time


def get_dht_time() -> float:
    """The current DHT time: seconds since the Unix epoch, as `time.time()`.

    Expiration times in the DHT are absolute values of this clock, so peers need clocks that
    agree to within a few seconds (NTP is enough).
    """
    return time.time()
