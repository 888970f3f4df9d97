"""The live display of a training peer: trainer events in, human lines on stderr out.

On a terminal, a status line stays at the bottom of the screen (a rich `Live`, redrawn 4 times a
second) and every other line, events and log records alike, is printed above it. Piped (CI, `hive
local`), the status is a plain line printed on each report event (every few seconds) and log
records are plain lines. With --json, every event is also a JSON line on stdout, unchanged.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.spinner import Spinner
from rich.text import Text

from hivecli.cli import _output

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # as in _output.setup_logging
# the fields of any event that feed the status line: the latest value of each is shown
STATUS_FIELDS = (
    "step", "loss", "samples_per_s", "peers", "rounds", "last_group_size",
    "accuracy", "run_samples", "goal_samples", "eta_s",
)  # fmt: skip
REPORT_EVENTS = ("progress", "report")  # piped, the status line is printed on these only
PIPED_WAIT_EVERY_S = 10.0


class Display:
    """Turns trainer events into human output on stderr and, with `json_output`, JSON lines on stdout.

    `goal` describes the run's goal for people, e.g. "143,700 samples" (None: a run without one).
    `console` is where human output goes (default: `_output.stderr`); the live status line is
    used when it is a terminal. Create it when training starts and close it (or use it as a
    context manager) when training ends: meanwhile, log records of the `logging` module are
    printed through the same console, so that they never end up glued to the status line.
    `event()` may be called from any thread.
    """

    def __init__(self, json_output: bool, goal: str | None = None, *, console: Console | None = None):
        self.json_output, self.goal = json_output, goal
        self.console = console if console is not None else _output.stderr
        self._lock = threading.RLock()  # reentrant: status_line() takes it, also when called under it
        self._status: dict[str, Any] = {}
        self._wait: dict[str, Any] | None = None  # the current `waiting` event, and when it came
        self._wait_printed = -float("inf")  # piped: when the last waiting line was printed
        self._spinner = Spinner("dots")
        self._closed = False
        self._handler = _ConsoleHandler(self.console)
        self._replaced = self._route_logging()
        self.live: Any = None
        if self.console.is_interactive:  # a terminal that can redraw a line
            from rich.live import Live

            self.live = Live(
                console=self.console,
                get_renderable=self._renderable,
                refresh_per_second=4,
                transient=True,
                redirect_stdout=False,  # stdout carries the JSON lines, untouched
                redirect_stderr=self.console.file is sys.stderr,  # stray writes to stderr go above the status
            )
            self.live.start()

    # ---- events -------------------------------------------------------------------------------------

    def event(self, name: str, fields: dict[str, Any]) -> None:
        """Handle one trainer event: JSON line (with --json), status update, and its human line if any."""
        if self.json_output:
            _output.emit_json(name, **fields)
        lines: list[Text] = []
        live = self.live
        with self._lock:  # never print or log while holding it: the Live's refresh thread takes it too
            self._update_status(name, fields)
            if name in REPORT_EVENTS and live is None and self._status:
                lines.append(Text(self.status_line()))
            elif name == "waiting":
                lines += self._waiting(fields)
            else:
                line = self._event_line(name, fields)
                if line is not None:
                    lines.append(line)
        if name == "checkpoint":
            logger.debug("Saved checkpoint %s at step %s", fields.get("path"), fields.get("step"))
        if live is not None:
            live.refresh()  # the status is current at once, not up to 0.25 s later, and below the new lines
        for line in lines:
            self.console.print(line, soft_wrap=True)

    def _update_status(self, name: str, fields: dict[str, Any]) -> None:
        for key in STATUS_FIELDS:
            if key in fields:
                self._status[key] = fields[key]
        if name == "rolled_back" and fields.get("to_step") is not None:
            self._status["step"] = fields["to_step"]

    def _event_line(self, name: str, f: dict[str, Any]) -> Text | None:
        """The human line of one event, or None (unknown events, checkpoints: JSON only)."""
        if name == "started":
            goal = f" (goal: {self.goal})" if self.goal else ""
            line = f"Training run {f.get('prefix')}{goal}; outputs in {f.get('run_dir')}"
            if f.get("resumed_from"):
                line += f"; resumed from step {f.get('step')} ({f['resumed_from']})"
            return Text(line)
        if name == "state_loaded":
            peer = f" from peer {f['peer']}" if f.get("peer") else ""
            return Text(f"Loaded the run's state at step {f.get('step')}{peer}")
        if name == "eval" and f.get("accuracy") is not None:
            best = " (best so far)" if f.get("best") else ""
            when = " (after the last averaging round)" if f.get("final") else ""
            return Text(f"step {f.get('step')}{when}: test accuracy {f['accuracy']:.3f}{best}")
        if name == "rolled_back":
            source = f.get("source")
            if source and " " not in str(source) and ("/" in str(source) or str(source).endswith(".pt")):
                source = f"checkpoint {source}"  # a bare path
            where = f" ({source})" if source else ""
            line = f"step {f.get('step')}: {f.get('reason')}; rolled back to step {f.get('to_step')}{where}"
            return Text(line, style="bold yellow")
        elif name == "finished":
            accuracy, best = f.get("accuracy"), f.get("best_accuracy")
            line = f"Finished ({f.get('reason')}) at step {f.get('step')}: test accuracy "
            line += "-" if accuracy is None else f"{accuracy:.3f}"
            if best is not None and (accuracy is None or f"{best:.3f}" != f"{accuracy:.3f}"):
                line += f" (best {best:.3f})"
            rounds = f.get("rounds")
            if rounds is not None:
                line += f", {_plural(rounds, 'averaging round')}"
            return Text(f"{line}; checkpoint {f.get('checkpoint')}")
        return None

    def _waiting(self, f: dict[str, Any]) -> list[Text]:
        """Start, update or end (`done: true`) a wait. On a terminal the spinner line shows it;
        piped, one line when the wait starts and then at most one every 10 s."""
        if f.get("done"):
            self._wait = None
            return []
        now = time.monotonic()
        starts = self._wait is None or self._wait["what"] != f.get("what")
        self._wait = {"what": f.get("what"), "elapsed_s": f.get("elapsed_s"), "remaining_s": f.get("remaining_s")}
        self._wait["at"] = now
        if self.live is not None or not (starts or now - self._wait_printed >= PIPED_WAIT_EVERY_S):
            return []
        self._wait_printed = now
        return [Text(self._waiting_text())]

    def _waiting_text(self) -> str:
        """e.g. "waiting for run X to be announced (12 s)"; the times advance between events."""
        wait = self._wait or {}
        what = str(wait.get("what") or "")
        if not what.startswith("waiting"):
            what = f"waiting for {what}"
        since = time.monotonic() - wait.get("at", time.monotonic())
        if wait.get("remaining_s") is not None:
            return f"{what} ({_duration(max(0.0, wait['remaining_s'] - since))} left; Ctrl+C to stop)"
        if wait.get("elapsed_s") is not None and wait["elapsed_s"] + since >= 1:
            return f"{what} ({_duration(wait['elapsed_s'] + since)})"
        return what

    # ---- the status line ----------------------------------------------------------------------------

    def status_line(self) -> str:
        """The status built from the latest fields of all events so far; fields never seen are left out."""
        with self._lock:
            s = dict(self._status)
        parts = []
        if s.get("step") is not None:
            parts.append(f"step {s['step']}")
        if s.get("loss") is not None:
            parts.append(f"loss {s['loss']:.3f}" if abs(s["loss"]) < 1000 else f"loss {s['loss']:.3g}")
        if s.get("samples_per_s") is not None:
            parts.append(f"{s['samples_per_s']:,.0f} samples/s")
        if s.get("peers") is not None:
            parts.append(_plural(s["peers"], "peer"))
        if s.get("rounds") is not None:
            group = s.get("last_group_size") if s["rounds"] else None
            parts.append(_plural(s["rounds"], "round") + (f" (last {_plural(group, 'peer')})" if group else ""))
        if s.get("accuracy") is not None:
            parts.append(f"acc {s['accuracy']:.3f}")
        done, goal = s.get("run_samples"), s.get("goal_samples")
        if done is not None:
            if goal:
                run = f"run {done:,}/{goal:,} samples ({min(100, int(100 * done / goal))}%)"
            else:
                run = f"run {done:,} samples" + (f" (goal: {self.goal})" if self.goal else "")
            if s.get("eta_s") is not None:
                run += f", ETA {_clock(s['eta_s'])}"
            parts.append(run)
        return " | ".join(parts)

    def _renderable(self) -> RenderableType:
        """What the Live shows (called by its refresh thread): the waiting spinner, the status."""
        parts: list[RenderableType] = []
        with self._lock:
            if self._wait is not None:
                self._spinner.update(text=Text(self._waiting_text(), no_wrap=False, overflow="fold"))
                parts.append(self._spinner)
        status = self.status_line()
        if status:  # wrapped at " | " on a narrow terminal rather than cut
            parts.append(Text(status, no_wrap=False, overflow="fold"))
        return Group(*parts)

    # ---- stop, close --------------------------------------------------------------------------------

    def stopping(self, signal_name: str | None = "SIGINT") -> None:
        """Say that the peer stops after this step: the Ctrl+C hint for SIGINT, the signal's name otherwise."""
        if signal_name in (None, "SIGINT"):
            text = "Stopping after this step (Ctrl+C again to quit at once)..."
        else:
            text = f"Stopping after this step ({signal_name})..."
        self.console.print(Text(text), soft_wrap=True)

    def close(self) -> None:
        """Stop the live status line and give logging its previous handlers back. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        live, self.live = self.live, None  # events after close() print plain lines
        if live is not None:
            live.stop()
        root = logging.getLogger()
        root.removeHandler(self._handler)
        for handler in self._replaced:
            root.addHandler(handler)
        self._replaced = []

    def __enter__(self) -> Display:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _route_logging(self) -> list[logging.Handler]:
        """Swap the root logger's handlers that write to the terminal streams for one that prints
        through the console, with the same format and level; returns the handlers taken out.
        Other handlers (files, pytest's capture) stay."""
        root = logging.getLogger()
        streams = {id(s) for s in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__, self.console.file)}
        replaced = [
            h
            for h in root.handlers
            if type(h) is logging.StreamHandler and id(getattr(h, "stream", None)) in streams  # not FileHandler
        ]
        if replaced:
            self._handler.setLevel(replaced[0].level)
            if replaced[0].formatter is not None:
                self._handler.setFormatter(replaced[0].formatter)
        for handler in replaced:
            root.removeHandler(handler)
        root.addHandler(self._handler)
        return replaced


class _ConsoleHandler(logging.Handler):
    """Prints log records through a rich console, so that a live display stays below them."""

    def __init__(self, console: Console):
        super().__init__()
        self.console = console
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(Text(self.format(record)), soft_wrap=True)
        except Exception:
            self.handleError(record)


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def _clock(seconds: float) -> str:
    """4:51, or 1:02:03 past an hour."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _duration(seconds: float) -> str:
    """12 s under a minute, 4:32 above."""
    return f"{seconds:.0f} s" if seconds < 59.5 else _clock(seconds)
