"""Abuse benchmark: does a DHT node keep serving honest peers while a hostile peer attacks it?

A target node runs as a separate process (`hive dht --json --host 127.0.0.1 --port 0`, i.e.
`python -m hivecli.cli.main dht ...`), so that its RSS and open file descriptors (read with
psutil by pid every 0.1 s) are its own; its stderr (the node's log) goes to a file in which
"Traceback" lines are counted, phase by phase. This process runs nothing of the benchmark's but
the honest client (and the sampler, and a thread reading the target's stdout):

* an honest client, a `hivecli.DHT` joined through the target, alternates store and get
  (`--ops-per-second`, default 20 operations a second; every other key under an owned subkey,
  `dht.owned_subkey()`), each timed, with a deadline (`--op-timeout`). A store succeeds when it
  returns True, a get when it returns the value just stored. The client runs in client mode:
  a full node would also store every value in its own storage (store() then returns True
  whatever the target does) and answer the get from there without asking the target at all;
  in client mode every store and get has to go through the target.

The hostile peer runs in a third process, one per phase: this same script with a hidden
`--hostile PHASE ADDR` mode (config as a JSON line on its stdin), started before the phase and
stopped and collected after it (`hivecli.testing.HostilePeer` and plain `hivecli.net.Host`s with
identities of their own, sending raw `dht.*` requests, on an event loop of its own). It sets up
its attack untimed, says "ready" on its stdout, floods from "start" to "stop" (or its stdin's
end, so it cannot outlive this process), closes every socket and reports what it did as a JSON
line. Neither the GIL nor the honest client's process is shared with the attack.

Phases, each `--seconds-per-phase` long (default 15), one after the other against the same
target, with `--settle` seconds between them:

  baseline            no attack: the reference the other phases' p95 is compared with
  slowloris           2,000 TCP connections (--slowloris) that never start the handshake, topped
                      up every second as the target closes them (the hostile process's soft
                      RLIMIT_NOFILE is raised to the hard limit first; the target keeps its own)
  64MiB declarations  16 authenticated connections (fresh identities), each declaring a 64 MiB
                      frame body and sending 13 bytes of it; re-opened if the target drops them
  100k keys           one peer stores --keys (default 100,000) keys in batches of 128: half
                      plain values, half under subkeys owned (and signed) by itself
  fresh-ID pings      dht.ping from one peer with a fresh node ID each time (~200 a second), plus
                      --fresh-identities (default 3) fresh identities joining one a second, each
                      of which the target sees as a newcomer and hands its storage over to
  unread replies      --flooders authenticated connections (default 8) each sending dht.find
                      requests by the thousand and never reading a reply; reconnecting as a
                      fresh identity whenever the target drops them (last: after 3 drops in a
                      minute the target refuses new connections from the address altogether)

Run (from the repository root; about 2 minutes, `--quick` is a ~45 s smoke run):

    .venv/bin/python benchmarks/bench_abuse.py
    .venv/bin/python benchmarks/bench_abuse.py --quick
    .venv/bin/python benchmarks/bench_abuse.py --seconds-per-phase 30 --target-log /tmp/target.log

It prints a table (phase | honest ops | success % | p50 ms | p95 ms | RSS MB (start->max) | fds
max | target log tracebacks), each phase's p95 as a multiple of the baseline's p95 measured in
the same run, what the hostile peer managed in each phase, the target's warning lines, and
PASS/MISS against the targets: honest success 100%, p95 under 50 ms, RSS growth (over the RSS at
the start of the baseline) under 200 MB, no traceback in the target's log.

Caveats: the machine this was written for has 2 cores shared by the target, the honest client
and the hostile peer. The hostile side is a process of its own, so it no longer shares a GIL
with the honest client, but it still competes with both for the same cores: an attack that
keeps a core busy (the floods, the slowloris top-up) can still delay the honest client's and
the target's threads by an OS scheduling slice, and the latencies here stay an upper bound on
what the target alone causes. Everything started (the target process, the honest DHT, each
phase's hostile process and its sockets, the sampler) is stopped and collected at the end,
also on errors and Ctrl+C.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import queue
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

import psutil

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run as a script from anywhere: use this checkout's hivecli
    sys.path.insert(0, REPO_ROOT)

from hivecli import DHT, get_dht_time  # noqa: E402
from hivecli._exceptions import HiveError  # noqa: E402
from hivecli.dht.records import owned_subkey, sign_entry  # noqa: E402
from hivecli.dht.routing import DHTID  # noqa: E402
from hivecli.net import ByteStream, Host, Identity, Multiaddr  # noqa: E402
from hivecli.net.framing import pack  # noqa: E402
from hivecli.testing import HostilePeer  # noqa: E402
from hivecli.utils.loops import new_event_loop, wait_event  # noqa: E402

T = TypeVar("T")
MB = 1e6  # RSS is reported in MB (10^6 bytes), as the target "under 200 MB" is stated
LOOPBACK = Multiaddr.parse("/ip4/127.0.0.1/tcp/0")
TARGET_SUCCESS_PCT = 100.0
TARGET_P95_MS = 50.0
TARGET_RSS_GROWTH_MB = 200.0
COLUMNS = ("phase", "honest ops", "success %", "p50 ms", "p95 ms", "RSS MB (start->max)", "fds max")
COLUMNS += ("target log tracebacks",)
# unread replies last: after it the target refuses new connections from this machine's address
# for a minute (NetSettings.max_offences_per_host), which would leave later phases nothing to do
PHASES = ("baseline", "slowloris", "64MiB declarations", "100k keys", "fresh-ID pings", "unread replies")


@dataclass
class Config:
    seconds: float = 15.0
    settle: float = 2.0
    ops_per_second: float = 20.0
    op_timeout: float = 10.0
    slowloris: int = 2000
    declarations: int = 16
    declared_bytes: int = 64 * 1024 * 1024
    flooders: int = 8
    finds_per_burst: int = 1000
    keys_per_find: int = 16
    keys: int = 100_000
    ping_rate: float = 200.0
    fresh_identities: int = 3


# ---- small helpers -------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linearly interpolated percentile (q in 0..100); NaN for an empty list."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def prune(peer: HostilePeer) -> None:
    """Forget the streams of `peer` that are closed (by us or by the target)."""
    peer.streams[:] = [s for s in peer.streams if not s.is_closing()]


def fmt(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


# ---- the target node, in a process of its own --------------------------------------------------


class TargetNode:
    """`hive dht --json` in a subprocess (own session, so Ctrl+C here does not reach it); stderr
    goes to `log_path`, stdout JSON events are read by a thread."""

    def __init__(self, log_path: str):
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hivecli.cli.main", "dht", "--json", "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            cwd=REPO_ROOT,
            start_new_session=True,
            text=True,
        )
        self._reader = threading.Thread(target=self._read_stdout, name="target-stdout", daemon=True)
        self._reader.start()
        self.ps = psutil.Process(self.proc.pid)

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                with self._changed:
                    self.events.append(event)
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_listening(self, timeout: float = 60.0) -> str:
        """The first address the target printed in its "listening" event."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events:
                    if event.get("event") == "listening":
                        return str(event["maddrs"][0])
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"the target exited ({self.proc.returncode}) before listening:\n{self.log_text()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"the target did not listen within {timeout:g} s:\n{self.log_text()}")
                self._changed.wait(min(remaining, 0.5))

    def log_size(self) -> int:
        self._log.flush()
        return os.path.getsize(self.log_path)

    def log_text(self, start: int = 0, end: int | None = None) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(start)
            data = f.read() if end is None else f.read(max(0, end - start))
        return data.decode("utf-8", "replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 20 s; returns the exit code. Idempotent."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            self._reader.join(timeout=10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._log.close()
        return self.proc.returncode


class Sampler(threading.Thread):
    """Reads the target's RSS and open fds every `interval` seconds."""

    def __init__(self, proc: psutil.Process, interval: float = 0.1):
        super().__init__(name="target-sampler", daemon=True)
        self.proc, self.interval = proc, interval
        self.samples: list[tuple[float, int, int]] = []  # (monotonic time, rss bytes, fds)
        self._stop_event = threading.Event()

    def sample(self) -> tuple[float, int, int] | None:
        try:
            with self.proc.oneshot():
                found = (time.monotonic(), self.proc.memory_info().rss, self.proc.num_fds())
        except psutil.Error:
            return None
        self.samples.append(found)
        return found

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def between(self, t0: float, t1: float) -> list[tuple[float, int, int]]:
        return [s for s in list(self.samples) if t0 <= s[0] <= t1]

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=5)


# ---- the honest client ------------------------------------------------------------------------


@dataclass
class Op:
    kind: str  # "store" or "get"
    ok: bool
    ms: float
    error: str | None = None


class HonestClient:
    """A client-mode `hivecli.DHT` joined through the target, doing paced store/get pairs."""

    def __init__(self, target_addr: str, config: Config):
        self.config = config
        self.dht = DHT(initial_peers=[target_addr], start=True, client_mode=True)
        self.subkey = self.dht.owned_subkey("bench")
        self.run_id = f"{random.getrandbits(48):012x}"
        self.count = 0

    def _timed(self, submit: Callable[[], concurrent.futures.Future[Any]]) -> tuple[Any, float, str | None]:
        began = time.perf_counter()
        future = submit()
        try:
            result = future.result(timeout=self.config.op_timeout)
            error = None
        except concurrent.futures.TimeoutError:
            future.cancel()
            result, error = None, f"no result within {self.config.op_timeout:g} s"
        except HiveError as e:
            result, error = None, f"{type(e).__name__}: {e}"
        return result, (time.perf_counter() - began) * 1000, error

    def run_for(self, seconds: float, phase: str) -> list[Op]:
        ops: list[Op] = []
        interval = 1.0 / self.config.ops_per_second
        deadline = time.monotonic() + seconds
        next_at = time.monotonic()
        while time.monotonic() < deadline:
            self.count += 1
            key = f"honest-{self.run_id}-{self.count}"
            value = {"n": self.count, "phase": phase}
            owned = self.count % 2 == 0
            subkey = self.subkey if owned else None
            expiration = get_dht_time() + 600
            stored, ms, error = self._timed(
                lambda k=key, v=value, e=expiration, s=subkey: self.dht.store(k, v, e, s, return_future=True)
            )
            ops.append(Op("store", stored is True, ms, error or (None if stored is True else f"store -> {stored}")))
            next_at = self._pace(next_at, interval)
            found, ms, error = self._timed(lambda k=key: self.dht.get(k, return_future=True))
            if found is None:
                got = None
            elif owned:
                entry = found.value.get(self.subkey) if isinstance(found.value, dict) else None
                got = None if entry is None else entry.value
            else:
                got = found.value
            ok = got == value
            ops.append(
                Op("get", ok, ms, error or (None if ok else f"get -> {'nothing' if found is None else 'other'}"))
            )
            next_at = self._pace(next_at, interval)
        return ops

    @staticmethod
    def _pace(next_at: float, interval: float) -> float:
        next_at = max(next_at + interval, time.monotonic())  # late: no burst to catch up
        time.sleep(max(0.0, next_at - time.monotonic()))
        return next_at

    def close(self) -> None:
        self.dht.shutdown()


# ---- the hostile peer -------------------------------------------------------------------------


class HostileLoop:
    """An event loop on a thread of its own, for everything hostile."""

    def __init__(self) -> None:
        self.loop = new_event_loop()
        self.unretrieved = 0  # "Future exception was never retrieved" reports, counted not printed
        self.loop.set_exception_handler(self._on_exception)
        self.thread = threading.Thread(target=self.loop.run_forever, name="hostile-loop", daemon=True)
        self.thread.start()

    def _on_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # A flood cancelled while it waits in `drain` leaves that wait's shielded future behind;
        # when the connection is then lost, it holds a ConnectionResetError nobody retrieves.
        if "never retrieved" in str(context.get("message", "")) and isinstance(
            context.get("exception"), ConnectionError
        ):
            self.unretrieved += 1
            return
        loop.default_exception_handler(context)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        if self.loop.is_closed():
            return
        if self.thread.is_alive():
            with contextlib.suppress(BaseException):
                self.run(_cancel_all_tasks(), timeout=30)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
        if not self.thread.is_alive():
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()


async def _cancel_all_tasks() -> None:
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class Attack:
    """One flood. `prepare` (untimed) sets it up, `run` floods until `stop` is set, `aclose`
    closes every socket and host it opened; `summary` says what it did."""

    name = "baseline"

    def __init__(self, target: Multiaddr, config: Config):
        self.target, self.config = target, config
        self.peers: list[HostilePeer] = []
        self.hosts: list[Host] = []
        self.errors: dict[str, int] = {}

    def error(self, e: BaseException) -> None:
        kind = f"{type(e).__name__}({str(e)[:60]!r})" if str(e) else type(e).__name__
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def hostile(self) -> HostilePeer:
        peer = HostilePeer(self.target)
        self.peers.append(peer)
        return peer

    async def prepare(self) -> None:
        pass

    async def run(self, stop: asyncio.Event) -> None:
        await stop.wait()

    async def aclose(self) -> None:
        for peer in self.peers:
            await peer.aclose()
        for host in self.hosts:
            await host.aclose()

    def summary(self) -> str:
        return "no attack"

    def error_text(self) -> str:
        if not self.errors:
            return ""
        return "; errors: " + ", ".join(f"{n} {kind}" for kind, n in sorted(self.errors.items()))


class Slowloris(Attack):
    name = "slowloris"

    def __init__(self, target: Multiaddr, config: Config):
        super().__init__(target, config)
        self.opened = self.most_open = self.open_at_end = 0

    async def run(self, stop: asyncio.Event) -> None:
        # no small receive buffer: nothing is ever read or sent on these, and setting it fails
        # (ValueError under uvloop) on a socket the target has already closed
        peer = HostilePeer(self.target, small_receive_buffer=False)
        self.peers.append(peer)
        while not stop.is_set():
            prune(peer)
            while len(peer.streams) < self.config.slowloris and not stop.is_set():
                try:
                    await peer.open_raw(1)
                except (HiveError, OSError, ValueError) as e:
                    self.error(e)
                    break
                self.opened += 1
                if self.opened % 100 == 0:
                    await asyncio.sleep(0)
            prune(peer)
            self.most_open = max(self.most_open, len(peer.streams))
            await wait_event(stop, 1.0)
        prune(peer)
        self.open_at_end = len(peer.streams)

    def summary(self) -> str:
        return (
            f"{self.opened} TCP connections opened, at most {self.most_open} open at once after a top-up, "
            f"{self.open_at_end} still open at the end{self.error_text()}"
        )


class Declarations(Attack):
    name = "64MiB declarations"

    def __init__(self, target: Multiaddr, config: Config):
        super().__init__(target, config)
        self.connections = self.declared = self.open_at_end = 0

    async def run(self, stop: asyncio.Event) -> None:
        peer = self.hostile()
        streams: list[ByteStream] = []
        while not stop.is_set():
            streams = [s for s in streams if not s.is_closing()]
            prune(peer)
            while len(streams) < self.config.declarations and not stop.is_set():
                try:
                    stream = await peer.handshake()
                    self.connections += 1
                    await peer.declare_body(stream, self.config.declared_bytes, b"13 bytes sent")
                except (HiveError, OSError, asyncio.IncompleteReadError, TimeoutError) as e:
                    self.error(e)
                    break
                self.declared += 1
                streams.append(stream)
            await wait_event(stop, 1.0)
        self.open_at_end = sum(not s.is_closing() for s in streams)

    def summary(self) -> str:
        return (
            f"{self.connections} authenticated connections, {self.declared} declared "
            f"{self.config.declared_bytes // 2**20} MiB bodies (13 bytes sent), "
            f"{self.open_at_end} still open at the end{self.error_text()}"
        )


class UnreadReplies(Attack):
    name = "unread replies"

    def __init__(self, target: Multiaddr, config: Config):
        super().__init__(target, config)
        self.connections = self.sent = self.dropped = self.stalled = 0
        self.payload: dict[str, Any] = {}

    async def prepare(self) -> None:
        keys = [DHTID.generate().to_bytes_() for _ in range(self.config.keys_per_find)]
        self.payload = {"node": None, "keys": keys}

    async def _flooder(self, peer: HostilePeer, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                stream = await peer.handshake()
            except (HiveError, OSError, ValueError, asyncio.IncompleteReadError, TimeoutError) as e:
                self.error(e)
                await wait_event(stop, 0.5)
                continue
            self.connections += 1
            next_id = 0
            try:
                while not stop.is_set():
                    burst = self.config.finds_per_burst
                    next_id = await asyncio.wait_for(peer.flood(stream, "dht.find", self.payload, burst, next_id), 5)
                    self.sent += burst
                    await asyncio.sleep(0)
            except TimeoutError:  # (an OSError too) our requests stopped leaving: give up on this connection
                self.stalled += 1
            except (ConnectionError, OSError) as e:
                self.dropped += 1
                self.error(e)
            finally:
                stream.close()
                prune(peer)

    async def run(self, stop: asyncio.Event) -> None:
        peer = self.hostile()
        await asyncio.gather(*(self._flooder(peer, stop) for _ in range(self.config.flooders)))

    def summary(self) -> str:
        return (
            f"{self.sent} dht.find requests sent unread ({self.config.keys_per_find} keys each) over "
            f"{self.connections} connections; {self.dropped} dropped by the target, {self.stalled} given up "
            f"after a burst could not be sent within 5 s{self.error_text()}"
        )


class ManyKeys(Attack):
    name = "100k keys"

    def __init__(self, target: Multiaddr, config: Config):
        super().__init__(target, config)
        self.batches: list[list[list[Any]]] = []
        self.sent = self.accepted = self.requests = 0
        self.took_s = math.nan

    async def prepare(self) -> None:
        identity = Identity.generate()
        self.hosts.append(Host(identity))
        subkey = pack(owned_subkey(identity.peer_id, "mine"))
        expiration = get_dht_time() + 3600
        items: list[list[Any]] = []
        for i in range(self.config.keys):
            key = DHTID.generate().to_bytes_()
            value = pack(i)
            if i % 2:
                signature = sign_entry(identity, key, subkey, value, expiration)
                items.append([key, subkey, value, expiration, False, signature])
            else:
                items.append([key, None, value, expiration, False])
        # as many signed items per request as a node takes (MAX_SIGNED_ITEMS_PER_REQUEST): half of 128
        self.batches = [items[i : i + 128] for i in range(0, len(items), 128)]

    async def run(self, stop: asyncio.Event) -> None:
        began = time.monotonic()
        for batch in self.batches:
            if stop.is_set():
                break
            try:
                reply = await self.hosts[0].call(self.target, "dht.store", {"node": None, "items": batch}, timeout=30)
            except (HiveError, OSError, TimeoutError) as e:
                self.error(e)
                continue
            self.requests += 1
            self.sent += len(batch)
            self.accepted += sum(bool(ok) for ok in reply.payload.get("ok", []))
        self.took_s = time.monotonic() - began
        await stop.wait()

    def summary(self) -> str:
        return (
            f"{self.sent} keys sent in {self.requests} dht.store requests in {fmt(self.took_s)} s "
            f"(half owned and signed); the target accepted {self.accepted}{self.error_text()}"
        )


class FreshIDPings(Attack):
    name = "fresh-ID pings"

    def __init__(self, target: Multiaddr, config: Config):
        super().__init__(target, config)
        self.pings = self.joined = self.handover_items = self.handover_requests = 0

    def _on_store(self, conn: Any, payload: Any, body: bytes) -> dict[str, Any]:
        items = payload.get("items", []) if isinstance(payload, dict) else []
        self.handover_requests += 1
        self.handover_items += len(items)
        return {"node": None, "ok": [True] * len(items)}

    async def prepare(self) -> None:
        self.hosts.append(Host(Identity.generate()))  # the pinger
        for _ in range(self.config.fresh_identities):  # newcomers that accept whatever is handed over
            host = Host(Identity.generate())
            host.add_inline_handler("dht.store", self._on_store)
            await host.listen([LOOPBACK])
            self.hosts.append(host)

    async def _ping(self, host: Host) -> None:
        try:
            await host.call(self.target, "dht.ping", {"node": DHTID.generate().to_bytes_()}, timeout=10)
            self.pings += 1
        except (HiveError, OSError, TimeoutError) as e:
            self.error(e)

    async def _newcomers(self, stop: asyncio.Event) -> None:
        for host in self.hosts[1:]:
            if await wait_event(stop, 1.0):
                return
            await self._ping(host)
            self.joined += 1

    async def run(self, stop: asyncio.Event) -> None:
        newcomers = asyncio.ensure_future(self._newcomers(stop))
        pinger = self.hosts[0]
        batch = 10
        try:
            while not stop.is_set():
                began = time.monotonic()
                await asyncio.gather(*(self._ping(pinger) for _ in range(batch)))
                await wait_event(stop, max(0.0, began + batch / self.config.ping_rate - time.monotonic()))
        finally:
            newcomers.cancel()
            await asyncio.gather(newcomers, return_exceptions=True)

    def summary(self) -> str:
        return (
            f"{self.pings} pings answered, each with a fresh node ID; {self.joined} fresh identities joined; "
            f"they were handed {self.handover_items} items in {self.handover_requests} dht.store "
            f"requests{self.error_text()}"
        )


ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls for cls in (Attack, Slowloris, Declarations, UnreadReplies, ManyKeys, FreshIDPings)
}


# ---- the hostile side, in a process of its own -------------------------------------------------

HOSTILE_TAG = "bench_abuse.hostile"  # marks the hostile process's protocol lines on its stdout


def _say(event: str, **fields: Any) -> None:
    print(json.dumps({HOSTILE_TAG: event, **fields}), flush=True)


def hostile_main(phase: str, target_addr: str) -> int:
    """The hidden `--hostile PHASE ADDR` mode: one phase's attack on `target_addr`.

    stdin: a JSON line (the Config), then "start", then "stop"; its end counts as "stop" (before
    "start": exit without flooding). stdout: "ready" once `prepare` is done, "done" (with the
    summary) once the flood has stopped and every socket is closed.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops this process; Ctrl+C is its to handle
    raise_nofile_limit()
    hostile: HostileLoop | None = None
    try:
        line = sys.stdin.readline()
        if not line:
            return 0
        config = Config(**json.loads(line))
        hostile = HostileLoop()
        attack = ATTACKS[phase](Multiaddr.parse(target_addr), config)
        try:
            hostile.run(attack.prepare(), timeout=300)
            _say("ready")
            if sys.stdin.readline().strip() != "start":
                return 0
            stop: asyncio.Event = hostile.run(_new_event(), timeout=10)
            flood = hostile.submit(attack.run(stop))
            sys.stdin.readline()  # "stop", or the end of stdin
            hostile.loop.call_soon_threadsafe(stop.set)
            try:
                flood.result(timeout=60)
            except concurrent.futures.TimeoutError:
                flood.cancel()
                attack.errors["did not stop within 60 s"] = 1
            except Exception as e:  # reported in the summary, not fatal for the run
                attack.error(e)
        finally:
            hostile.run(attack.aclose(), timeout=60)
        _say("done", summary=attack.summary(), unretrieved=hostile.unretrieved)
        return 0
    finally:
        if hostile is not None:
            hostile.close()


class HostileProcess:
    """One phase's hostile side: this script with `--hostile PHASE ADDR` in a subprocess (own
    session, so Ctrl+C here does not reach it); stderr is shared with this process, stdout
    carries its protocol lines, read by a thread."""

    def __init__(self, phase: str, target_addr: str, config: Config):
        self.phase = phase
        self.summary: str | None = None
        self.unretrieved = 0
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--hostile", phase, target_addr],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO_ROOT,
            start_new_session=True,
            text=True,
        )
        self._reader = threading.Thread(target=self._read_stdout, name=f"hostile-stdout-{phase}", daemon=True)
        self._reader.start()
        self._send(json.dumps(dataclasses.asdict(config)))

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict) and HOSTILE_TAG in event:
                self._events.put(event)
            elif line.strip():  # anything else it printed: pass it on
                print(f"[hostile {self.phase}] {line.rstrip()}", file=sys.stderr)
        self._events.put(None)

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):  # it is gone: _wait_for says so
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()

    def _wait_for(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                found = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                message = f"the {self.phase} hostile process did not say {event!r} within {timeout:g} s"
                raise TimeoutError(message) from None
            if found is None:
                self._events.put(None)  # later waits see the end too
                code = self.proc.wait()
                raise RuntimeError(f"the {self.phase} hostile process exited ({code}) before saying {event!r}")
            if found[HOSTILE_TAG] == event:
                return found

    def wait_ready(self, timeout: float = 330.0) -> None:
        self._wait_for("ready", timeout)

    def start(self) -> None:
        self._send("start")

    def stop(self, timeout: float = 150.0) -> str:
        """Ask it to stop and wait for its summary; then collect the process."""
        try:
            self._send("stop")
            done = self._wait_for("done", timeout)
            self.summary, self.unretrieved = str(done["summary"]), int(done.get("unretrieved", 0))
        except (TimeoutError, RuntimeError) as e:
            self.summary = f"no summary: {e}"
        finally:
            self.close()
        return self.summary

    def close(self) -> int | None:
        """End of stdin (it stops and exits), then SIGTERM after 30 s, SIGKILL after 10 more;
        returns the exit code. Idempotent."""
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
            for sig, wait_s in ((None, 30.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
                if self.proc.poll() is not None:
                    break
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        self.proc.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=wait_s)
        finally:
            self._reader.join(timeout=10)
            if self.proc.stdout is not None and not self._reader.is_alive():
                self.proc.stdout.close()
        return self.proc.returncode


# ---- one phase --------------------------------------------------------------------------------


@dataclass
class PhaseResult:
    name: str
    ops: list[Op] = field(default_factory=list)
    rss_start: float = math.nan
    rss_max: float = math.nan
    fds_max: int = -1
    tracebacks: int = 0
    warnings: list[str] = field(default_factory=list)
    attack: str = ""
    target_alive: bool = True

    @property
    def success_pct(self) -> float:
        return 100.0 * sum(op.ok for op in self.ops) / len(self.ops) if self.ops else math.nan

    def latency(self, q: float) -> float:
        return percentile([op.ms for op in self.ops], q)

    def failures(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.ops:
            if not op.ok:
                reason = f"{op.kind}: {op.error}"[:120]
                counts[reason] = counts.get(reason, 0) + 1
        return counts


_LOG_PREFIX = re.compile(r"^\S+ \S+ ")  # a timestamp, if the log line starts with one


def warning_lines(text: str, limit: int = 6) -> list[str]:
    """Distinct WARNING/ERROR/CRITICAL lines (and Traceback headers), in order, at most `limit`."""
    seen: dict[str, None] = {}
    for line in text.splitlines():
        if any(word in line for word in ("WARNING", "ERROR", "CRITICAL", "Traceback")):
            seen.setdefault(line.strip()[:240], None)
    return list(seen)[:limit]


def run_phase(
    name: str,
    config: Config,
    target: TargetNode,
    sampler: Sampler,
    honest: HonestClient,
    target_addr: str,
    hostiles: list[HostileProcess],
) -> PhaseResult:
    result = PhaseResult(name)
    hostile = HostileProcess(name, target_addr, config)
    hostiles.append(hostile)  # the caller closes it too, should this phase end in an error
    try:
        hostile.wait_ready()
        log_start = target.log_size()
        first = sampler.sample()
        began = time.monotonic()
        hostile.start()
        try:
            result.ops = honest.run_for(config.seconds, name)
        finally:
            result.attack = hostile.stop()
    finally:
        hostile.close()
    ended = time.monotonic()
    sampler.sample()
    samples = sampler.between(began - 1.0, ended)
    if first is not None:
        result.rss_start = first[1] / MB
    if samples:
        result.rss_max = max(s[1] for s in samples) / MB
        result.fds_max = max(s[2] for s in samples)
    time.sleep(config.settle)
    log = target.log_text(log_start)
    result.tracebacks = log.count("Traceback")
    result.warnings = warning_lines(log)
    result.target_alive = target.alive()
    return result


async def _new_event() -> asyncio.Event:
    return asyncio.Event()


# ---- report -----------------------------------------------------------------------------------


def print_report(results: list[PhaseResult], baseline_rss: float, shutdown_tracebacks: int, log_path: str) -> None:
    headers = COLUMNS
    rows = [
        [
            r.name,
            str(len(r.ops)),
            fmt(r.success_pct),
            fmt(r.latency(50)),
            fmt(r.latency(95)),
            f"{fmt(r.rss_start)}->{fmt(r.rss_max)}",
            str(r.fds_max),
            str(r.tracebacks),
        ]
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print()
    print(line)
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))

    base = next((r for r in results if r.name == "baseline"), None)
    base_p95 = base.latency(95) if base else math.nan
    print()
    print(f"p95 relative to the baseline's p95 ({fmt(base_p95)} ms, measured in this run):")
    for r in results:
        if r.name != "baseline":
            ratio = r.latency(95) / base_p95 if base_p95 and not math.isnan(base_p95) else math.nan
            print(f"  {r.name:<20} {fmt(ratio, 2)}x")

    print()
    print("Slowest honest op per phase:")
    for r in results:
        slowest = max(r.ops, key=lambda op: op.ms, default=None)
        if slowest is not None:
            late = sum(op.ms >= TARGET_P95_MS for op in r.ops)
            print(f"  {r.name:<20} {slowest.kind} {fmt(slowest.ms)} ms; {late} ops took {TARGET_P95_MS:g} ms or more")

    print()
    print("What the hostile peer did:")
    for r in results:
        print(f"  {r.name:<20} {r.attack}")

    failing = [r for r in results if r.failures()]
    if failing:
        print()
        print("Honest failures:")
        for r in failing:
            for reason, n in sorted(r.failures().items(), key=lambda kv: -kv[1])[:5]:
                print(f"  {r.name:<20} {n} x {reason}")
    noisy = [r for r in results if r.warnings]
    if noisy:
        print()
        print(f"Target log, distinct warning lines per phase (full log: {log_path}):")
        for r in noisy:
            for warning in r.warnings:
                print(f"  {r.name:<20} {warning}")

    attacked = results
    worst_success = min(attacked, key=lambda r: -1.0 if math.isnan(r.success_pct) else r.success_pct)
    worst_p95 = max(attacked, key=lambda r: math.inf if math.isnan(r.latency(95)) else r.latency(95))
    worst_rss = max(attacked, key=lambda r: -math.inf if math.isnan(r.rss_max) else r.rss_max)
    growth = worst_rss.rss_max - baseline_rss
    tracebacks = sum(r.tracebacks for r in results)
    dead = [r.name for r in results if not r.target_alive]

    def verdict(ok: bool) -> str:
        return "PASS" if ok and not dead else "MISS"

    print()
    print("Targets (worst phase):")
    print(
        f"  {'honest success 100%':<27} {verdict(worst_success.success_pct >= TARGET_SUCCESS_PCT)}  "
        f"lowest {fmt(worst_success.success_pct)}% ({worst_success.name})"
    )
    print(
        f"  {f'p95 under {TARGET_P95_MS:g} ms':<27} {verdict(worst_p95.latency(95) < TARGET_P95_MS)}  "
        f"highest {fmt(worst_p95.latency(95))} ms ({worst_p95.name})"
    )
    print(
        f"  {f'RSS growth under {TARGET_RSS_GROWTH_MB:g} MB':<27} {verdict(growth < TARGET_RSS_GROWTH_MB)}  "
        f"+{fmt(growth)} MB over the baseline's start ({fmt(baseline_rss)} MB), peak in {worst_rss.name}"
    )
    print(
        f"  {'no traceback in target log':<27} {verdict(tracebacks == 0)}  {tracebacks} during the phases, "
        f"{shutdown_tracebacks} at shutdown"
    )
    if dead:
        print(f"  the target process died during: {', '.join(dead)}")


# ---- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds-per-phase", type=float, default=None, help="default 15 (5 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run: 5 s phases")
    parser.add_argument(
        "--phases",
        nargs="+",
        choices=PHASES,
        default=list(PHASES),
        metavar="PHASE",
        help=f"which phases, in order (default: all of {', '.join(PHASES)}); the baseline always runs first",
    )
    parser.add_argument("--ops-per-second", type=float, default=20.0, help="honest operations a second (default 20)")
    parser.add_argument("--op-timeout", type=float, default=10.0, help="seconds before an honest op counts as failed")
    parser.add_argument("--slowloris", type=int, default=2000, help="unfinished handshakes kept open (default 2000)")
    parser.add_argument("--flooders", type=int, default=8, help="connections flooding dht.find (default 8)")
    parser.add_argument("--keys", type=int, default=100_000, help="keys the hostile peer stores (default 100000)")
    parser.add_argument("--fresh-identities", type=int, default=3, help="fresh identities joining (default 3)")
    parser.add_argument("--target-log", default=None, help="keep the target's log here (default: a temp file)")
    parser.add_argument("--hostile", nargs=2, metavar=("PHASE", "ADDR"), default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.hostile is not None:
        phase, target_addr = args.hostile
        if phase not in ATTACKS:
            raise SystemExit(f"--hostile: unknown phase {phase!r}")
        return hostile_main(phase, target_addr)
    seconds = args.seconds_per_phase if args.seconds_per_phase is not None else (5.0 if args.quick else 15.0)
    config = Config(
        seconds=seconds,
        settle=1.0 if args.quick else 2.0,
        ops_per_second=args.ops_per_second,
        op_timeout=args.op_timeout,
        slowloris=args.slowloris,
        flooders=args.flooders,
        keys=args.keys,
        fresh_identities=args.fresh_identities,
    )
    phases = ["baseline", *(p for p in args.phases if p != "baseline")]
    temp_dir = None if args.target_log else tempfile.mkdtemp(prefix="bench_abuse-")
    log_path = args.target_log or os.path.join(temp_dir or ".", "target.log")

    target: TargetNode | None = None
    sampler: Sampler | None = None
    honest: HonestClient | None = None
    hostiles: list[HostileProcess] = []
    results: list[PhaseResult] = []
    interrupted = False
    try:
        target = TargetNode(log_path)
        target_addr = target.wait_listening()
        target_soft, _ = (int(x) for x in target.ps.rlimit(psutil.RLIMIT_NOFILE))
        soft, hard = raise_nofile_limit()
        print(
            f"target pid {target.proc.pid} at {target_addr} (its RLIMIT_NOFILE soft limit {target_soft}); "
            f"this process: RLIMIT_NOFILE {soft}/{hard}, {os.cpu_count()} CPUs"
        )
        print(
            f"{len(phases)} phases x {config.seconds:g} s, honest client {config.ops_per_second:g} ops/s "
            f"(store/get alternating, every other key under an owned subkey), op timeout {config.op_timeout:g} s"
        )
        sampler = Sampler(target.ps)
        sampler.start()
        honest = HonestClient(target_addr, config)
        for name in phases:
            result = run_phase(name, config, target, sampler, honest, target_addr, hostiles)
            results.append(result)
            print(
                f"  {name:<20} {len(result.ops)} ops, {fmt(result.success_pct)}% ok, "
                f"p95 {fmt(result.latency(95))} ms, RSS max {fmt(result.rss_max)} MB, fds max {result.fds_max}",
                flush=True,
            )
            if not result.target_alive:
                print("  the target process died; stopping here")
                break
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted; stopping everything", file=sys.stderr)
    finally:
        for hostile in hostiles:  # each already closed by its phase, unless that phase was cut short
            hostile.close()
        if honest is not None:
            honest.close()
        if sampler is not None:
            sampler.stop()
        shutdown_start = target.log_size() if target is not None else 0
        exit_code = target.stop() if target is not None else None
        shutdown_tracebacks = target.log_text(shutdown_start).count("Traceback") if target is not None else 0

    keep_log = temp_dir is None or shutdown_tracebacks > 0 or any(r.tracebacks or not r.target_alive for r in results)
    if results:
        baseline_rss = results[0].rss_start
        print_report(results, baseline_rss, shutdown_tracebacks, log_path if keep_log else "removed; see --target-log")
        print(f"\ntarget exit code after SIGTERM: {exit_code}")
    unretrieved = sum(hostile.unretrieved for hostile in hostiles)
    if unretrieved:
        print(f"hostile side: {unretrieved} orphaned drain futures ended with ConnectionResetError (not printed)")
    if temp_dir is not None and not keep_log:
        with contextlib.suppress(OSError):
            os.remove(log_path)
            os.rmdir(temp_dir)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
