"""Ctrl+C and SIGTERM for the commands that run until stopped (`hive dht`, `hive start/join`, `hive local`).

Usage:

    with stop_on_signals(on_stop=display.stopping, second_interrupt_raises=True) as stop:
        while not stop.wait(1.0):
            ...
    raise typer.Exit(stop.exit_code)  # 130 after Ctrl+C, 0 after SIGTERM or without a signal
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from hivecli.cli._errors import EXIT_INTERRUPTED, EXIT_OK

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest(threading.Event):
    """Set when the command was asked to stop; remembers the first signal that asked."""

    def __init__(self) -> None:
        super().__init__()
        self.signum: int | None = None  # the first SIGINT or SIGTERM received, None if none (yet)

    @property
    def signal_name(self) -> str | None:
        """The first signal's name, "SIGINT" or "SIGTERM"; None if no signal arrived."""
        return None if self.signum is None else signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The command's exit code: 130 after SIGINT (Ctrl+C), 0 after SIGTERM or without a signal."""
        return EXIT_INTERRUPTED if self.signum == signal.SIGINT else EXIT_OK


@contextmanager
def stop_on_signals(
    on_stop: Callable[[str], Any] | None = None, second_interrupt_raises: bool = False
) -> Iterator[StopRequest]:
    """Turn SIGINT and SIGTERM into a `StopRequest` (a threading.Event) for the duration of the block.

    The first signal sets the event, is recorded (`signal_name`, `exit_code`) and calls
    `on_stop(signal_name)` once, from the signal handler. Later SIGTERMs are ignored; a later
    SIGINT (Ctrl+C again) raises KeyboardInterrupt if `second_interrupt_raises`, else it is
    ignored too. The previous handlers are restored when the block exits, however it exits.

    Use it from the main thread only: Python installs signal handlers there and nowhere else
    (`signal.signal` raises ValueError in any other thread), and runs them there.
    """
    stop = StopRequest()

    def handle(signum: int, _frame: Any) -> None:
        if stop.signum is not None:
            if signum == signal.SIGINT and second_interrupt_raises:
                raise KeyboardInterrupt
            return
        stop.signum = signum
        stop.set()
        if on_stop is not None:
            on_stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            # None: a handler installed from C, which Python cannot put back; the default is closest
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
