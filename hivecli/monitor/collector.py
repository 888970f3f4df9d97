"""The monitor's reader: a thread that reads the runs' records from the DHT every few seconds.

It reads only what peers publish (hivecli.runs.run_views: the runs' announcements and their
peers' progress records), never a peer's files, so it works from any machine that can reach
one peer of the DHT. A DHT that does not answer costs a poll, not the monitor.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

from hivecli._exceptions import HiveError
from hivecli.dht.dht import DHT
from hivecli.monitor.history import RunHistory
from hivecli.runs import run_views
from hivecli.utils.timing import get_dht_time

logger = logging.getLogger(__name__)
MAX_RUNS = 32  # runs watched at once (a DHT can announce any number)


class Collector:
    """Polls the DHT every `interval` seconds on a thread of its own and keeps each run's history.

    Args:
        dht: a running DHT node (a client-mode one is enough).
        run: watch only this run (PREFIX or PREFIX@OWNER); by default every announced run.
        interval: seconds between polls.
    """

    def __init__(self, dht: DHT, run: str | None = None, interval: float = 2.0):
        self.dht, self.run, self.interval = dht, run, interval
        self.histories: dict[str, RunHistory] = {}
        self.polls = 0  # finished polls (tests and --export wait on this)
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hive-monitor", daemon=True)

    def start(self) -> Collector:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)  # a poll in flight ends with its DHT call's timeout

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def poll(self) -> None:
        """Read the runs' records once and add them to the histories.

        Raises:
            HiveError: the DHT could not be read.
        """
        views = run_views(self.dht, self.run)
        now = get_dht_time()
        with self._lock:
            for prefix, view in list(views.items())[:MAX_RUNS]:
                history = self.histories.get(prefix)
                if history is None:
                    if len(self.histories) >= MAX_RUNS:
                        continue
                    history = self.histories[prefix] = RunHistory(prefix)
                history.update(view, now)
            self.polls += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
                self.last_error = None
            except HiveError as e:
                self.last_error = str(e)
                logger.debug("Monitor poll failed: %s", e)
            except Exception:  # a bug in one poll must not end the monitor; logged once per poll
                logger.exception("Monitor poll failed")
            self._stop.wait(self.interval)

    def snapshot(self, since: float = -math.inf) -> dict[str, Any]:
        """Every watched run as JSON-ready data (RunHistory.snapshot), with the DHT time it was taken."""
        now = get_dht_time()
        with self._lock:
            runs = {prefix: history.snapshot(now, since) for prefix, history in self.histories.items()}
            return {"now": now, "polls": self.polls, "error": self.last_error, "runs": runs}

    def curves(self) -> dict[str, dict[str, list[tuple[float, int, dict[str, Any]]]]]:
        """{prefix: {peer id: [(wall time, step, fields)]}} of every watched run (for --export)."""
        with self._lock:
            return {prefix: history.curves() for prefix, history in self.histories.items()}
