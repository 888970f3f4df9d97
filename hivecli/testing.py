"""Test helpers shipped with the product: spin up local swarms, run `hive` commands, wait on conditions.

from hivecli.testing import HiveProcess, local_swarm, wait_for

with local_swarm(8) as dhts:            # 8 DHT peers on 127.0.0.1, port 0
    dhts[3].store("key", "value", get_dht_time() + 60)
    wait_for(lambda: dhts[5].get("key") is not None, timeout=10, what="key to appear")

with HiveProcess("dht", "--json", "--host", "127.0.0.1") as node:    # a real `hive` in a subprocess
    address = node.wait_event("listening", timeout=30)["maddrs"][0]
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
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


class HiveProcess:
    """A real `hive ARGS...` command in a subprocess (`python -m hivecli.cli.main`). Its stdout
    JSON lines (the events of `--json`) and its stderr lines are read as they come, so a test
    waits on them with a deadline. Events are kept, not consumed: `wait_event` finds the first
    matching one, however early it came. As a context manager, stops the process on exit.

    Args:
        args: the command line after `hive`.
        cwd, env: as for subprocess.Popen.
    """

    def __init__(self, *args: str, cwd: str | Path | None = None, env: dict[str, str] | None = None):
        self.args = [str(a) for a in args]
        self.events: list[dict[str, Any]] = []
        self.stdout_lines: list[str] = []  # lines that are not JSON events
        self.stderr_lines: list[str] = []
        self._changed = threading.Condition()
        self._open_pipes = 2
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hivecli.cli.main", *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env=env,
        )
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self._on_stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr_lines.append), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _on_stdout(self, line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if isinstance(event, dict) and "event" in event:
            self.events.append(event)
        else:
            self.stdout_lines.append(line)

    def _read(self, pipe: Any, keep: Callable[[str], None]) -> None:
        for line in pipe:
            with self._changed:
                keep(line)
                self._changed.notify_all()
        with self._changed:
            self._open_pipes -= 1
            self._changed.notify_all()

    @property
    def stderr(self) -> str:
        with self._changed:
            return "".join(self.stderr_lines)

    def _wait(self, find: Callable[[], T | None], timeout: float, what: str) -> T:
        """The first non-None `find()`, checked at every new line; raises once the process has
        closed its output without it, or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = find()
                if found is not None:
                    return found
                if self._open_pipes == 0:
                    code = self.proc.poll()
                    raise AssertionError(f"`hive {' '.join(self.args)}` exited {code} before {what}; "
                                         f"stderr: {''.join(self.stderr_lines)[-3000:]}")  # fmt: skip
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {what} within {timeout:g} s from `hive {' '.join(self.args)}`; "
                                       f"stderr: {''.join(self.stderr_lines)[-3000:]}")  # fmt: skip
                self._changed.wait(remaining)

    def wait_event(
        self, name: str, condition: Callable[[dict[str, Any]], bool] = lambda e: True, timeout: float = 90.0
    ) -> dict[str, Any]:
        """The first JSON event called `name` for which `condition` holds."""
        return self._wait(
            lambda: next((e for e in self.events if e["event"] == name and condition(e)), None),
            timeout,
            f"{name!r} event",
        )

    def wait_stderr(self, fragment: str, timeout: float = 90.0) -> str:
        """The first stderr line that contains `fragment`."""
        return self._wait(
            lambda: next((line for line in self.stderr_lines if fragment in line), None),
            timeout,
            f"stderr line with {fragment!r}",
        )

    def wait(self, timeout: float = 90.0) -> int:
        """The exit code, once the process has exited and its output is read."""
        code = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=timeout)
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send `sig` (if still running) and return the exit code; kills it after `timeout` s."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.close()

    def close(self) -> None:
        """Kill the process if it still runs, and release its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for reader in self._readers:  # they end at EOF, once the process is gone
            reader.join(timeout=10)
        self.proc.stdout.close()  # type: ignore[union-attr]
        self.proc.stderr.close()  # type: ignore[union-attr]

    def __enter__(self) -> HiveProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["HiveProcess", "launch_swarm", "local_swarm", "shutdown_all", "wait_for"]
