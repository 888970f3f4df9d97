"""What one connection allows its peer, and how breaking a limit is reported.

A `Connection` owns one `RequestBudget`: a token bucket that lets the peer make
`max_requests_per_second` requests, sustained, with bursts of up to `request_burst`, and no more
than `max_concurrent_requests` handlers at once. A request over a limit is refused on its own; a
peer that keeps sending refused requests is dropped by raising `Disconnect`, as is one that
leaves its replies unread. The limits themselves are fields of `NetSettings`.

Limit events are logged through a `LimitLog`: one WARNING line, at most one per kind every few
seconds, so a hostile peer cannot flood the log however often it trips a limit.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hivecli.net.connection import NetSettings

REFUSAL_WINDOW = 10.0  # seconds over which refused requests are counted towards a disconnect


class LimitLog:
    """Logs limit events as WARNING lines, at most one per kind every `interval` seconds.

    A hostile peer trips a limit as often as it likes; one line per event would let it fill the
    disk and drown everything else. The first line after a quiet spell says how many events of
    that kind went unlogged since the previous line.
    """

    def __init__(self, log: logging.Logger, interval: float = 10.0):
        self._log = log
        self._interval = interval
        self._last: dict[str, float] = {}  # kind -> when its last line was logged
        self._dropped: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        """Log `message % args` unless a line of this `kind` was logged within the interval."""
        now = time.monotonic()
        last = self._last.get(kind, -self._interval)
        if now - last < self._interval:
            self._dropped[kind] = self._dropped.get(kind, 0) + 1
            return
        self._last[kind] = now
        dropped = self._dropped.pop(kind, 0)
        if dropped:
            message += f" ({dropped} more like this in the last {now - last:.0f} s were not logged)"
        self._log.warning(message, *args)


class Disconnect(Exception):
    """Raised in a connection's read loop to drop a peer that broke a limit. Its message is the
    reason (logged once, sent in a GOAWAY when `goaway`); `kind` groups it for `LimitLog`."""

    def __init__(self, kind: str, reason: str, goaway: bool = True):
        super().__init__(reason)
        self.kind = kind
        self.goaway = goaway


class RequestBudget:
    """The requests one peer may still make on one connection.

    A token bucket holds up to `settings.request_burst` tokens and refills at
    `settings.max_requests_per_second`; each admitted request spends one. Refused requests are
    counted over a window of REFUSAL_WINDOW seconds, so that a peer that is not backing off can
    be cut off instead of answered one refusal at a time.
    """

    def __init__(self, settings: NetSettings, now: float):
        self._settings = settings
        self._tokens = float(settings.request_burst)
        self._tokens_at = now  # when _tokens was last brought up to date
        self._refused, self._refused_since = 0, now  # refusals in the current window

    def admit(self, now: float, needs_task: bool, running_tasks: int) -> str | None:
        """Spend one token for a request arriving at `now` (seconds, on the loop's clock).

        Returns None if the request may run, or else why it is refused: the peer has no token
        left, or the request `needs_task` and the peer already has `running_tasks` >=
        max_concurrent_requests handlers running. A refused request spends no token.

        Raises:
            Disconnect: the peer was refused 2 x request_burst times within REFUSAL_WINDOW seconds
                (it is not backing off, so answering each request is a waste: a flood at any
                rate above the limit is cut off within seconds).
        """
        settings = self._settings
        refill = (now - self._tokens_at) * settings.max_requests_per_second
        self._tokens = min(float(settings.request_burst), self._tokens + refill)
        self._tokens_at = now
        if self._tokens < 1.0:
            refusal = "rate limit exceeded"
        elif needs_task and running_tasks >= settings.max_concurrent_requests:
            refusal = "too many concurrent requests"
        else:
            self._tokens -= 1.0
            return None
        if now - self._refused_since > REFUSAL_WINDOW:
            self._refused, self._refused_since = 0, now
        self._refused += 1
        if self._refused >= 2 * settings.request_burst:
            raise Disconnect(
                "requests",
                f"it kept sending requests after {self._refused} refusals within {REFUSAL_WINDOW:g} s ({refusal})",
            )
        return refusal
