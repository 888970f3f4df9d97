"""Test helpers shipped with the product: spin up local swarms, run `hive` commands, wait on conditions.

from hivecli.testing import HiveProcess, local_swarm, wait_for

with local_swarm(8) as dhts:            # 8 DHT peers on 127.0.0.1, port 0
    dhts[3].store("key", "value", get_dht_time() + 60)
    wait_for(lambda: dhts[5].get("key") is not None, timeout=10, what="key to appear")

with HiveProcess("dht", "--json", "--host", "127.0.0.1") as node:    # a real `hive` in a subprocess
    address = node.wait_event("listening", timeout=30)["maddrs"][0]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from hivecli.dht.dht import DHT
from hivecli.net.framing import PREFIX, pack
from hivecli.net.handshake import perform_handshake
from hivecli.net.identity import Identity
from hivecli.net.multiaddr import Multiaddr
from hivecli.net.tcp import TCPTransport
from hivecli.net.transport import ByteStream

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


def torch_devices() -> list[str]:
    """The devices a test of training code can put its models on here: "cpu", and "cuda" where
    torch sees a GPU (for `pytest.mark.parametrize("device", torch_devices())`)."""
    import torch

    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@contextlib.contextmanager
def redeemed_bulk_links() -> Iterator[list[bool]]:
    """While open, records every bulk link (hivecli.net.bulk) that a host of this process was
    dialed for: True where its token was redeemed, False where it was refused. For checking
    which way a round's or a download's bytes went."""
    from hivecli.net.bulk import BulkLinks

    accept = BulkLinks.accept
    redeemed: list[bool] = []

    def recording(self: BulkLinks, stream: ByteStream, hello: dict[str, Any]) -> bool:
        redeemed.append(accept(self, stream, hello))
        return redeemed[-1]

    setattr(BulkLinks, "accept", recording)  # noqa: B010 (mypy refuses assigning to a method)
    try:
        yield redeemed
    finally:
        setattr(BulkLinks, "accept", accept)  # noqa: B010


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

    def wait_stdout(self, fragment: str, timeout: float = 90.0) -> str:
        """The first stdout line (not a JSON event) that contains `fragment`."""
        return self._wait(
            lambda: next((line for line in self.stdout_lines if fragment in line), None),
            timeout,
            f"stdout line with {fragment!r}",
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


# ---- hostile peers --------------------------------------------------------------------------


async def wait_until(condition: Callable[[], T], timeout: float, what: str = "condition", interval: float = 0.01) -> T:
    """`wait_for` for code on an event loop: polls without blocking the loop, so the hosts on it
    keep running while the test waits.

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
        await asyncio.sleep(interval)


class HostilePeer:
    """A peer that breaks the rules on purpose, to test that a `Host` stays bounded and keeps
    serving. Everything runs on the caller's event loop, over TCP; `aclose` closes every
    stream it opened.

        hostile = HostilePeer(server.visible_maddrs()[0])
        idle = await hostile.open_raw(100)               # sockets that never start the handshake
        stream = await hostile.handshake()               # authenticated as a fresh identity
        await hostile.send_frame(stream, [0, 0, "echo", HostilePeer.deep(1000)])

    Streams it opens read only what the test reads: a flood whose replies the test never reads
    fills the server's send buffer, as a peer that stopped reading would.

    Args:
        target: the server's address, with /p2p/<its peer id>.
        small_receive_buffer: shrink each socket's kernel receive buffer (and so its TCP
            window), so that unread replies pile up at the server after kilobytes, not after
            the tens of megabytes loopback autotuning would absorb.
    """

    def __init__(self, target: Multiaddr, small_receive_buffer: bool = True):
        self.target = target
        self.small_receive_buffer = small_receive_buffer
        self.streams: list[ByteStream] = []

    async def open_raw(self, count: int = 1) -> list[ByteStream]:
        """Open `count` TCP connections and send nothing on them.

        Raises:
            PeerUnreachableError: the server refused one (the ones before stay open).
        """
        opened = []
        for _ in range(count):
            stream = await TCPTransport().dial(self.target.host, self.target.port, 5.0)
            if self.small_receive_buffer:
                sock = getattr(stream, "_transport", None)
                sock = sock.get_extra_info("socket") if sock is not None else None
                if sock is not None:
                    with contextlib.suppress(OSError, ValueError):  # closed by the server already
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            self.streams.append(stream)
            opened.append(stream)
        return opened

    async def handshake(self, identity: Identity | None = None, timeout: float = 5.0) -> ByteStream:
        """Open a connection and pass the real handshake as `identity` (default: a fresh one);
        returns the stream to send frames on (sealed, when the handshake set up encryption).

        Raises:
            PeerUnreachableError: the server refused the connection.
            HandshakeError, asyncio.IncompleteReadError, ConnectionError: the handshake failed.
            TimeoutError: it did not finish within `timeout` seconds.
        """
        (raw,) = await self.open_raw()
        identity = identity or Identity.generate()
        result = await asyncio.wait_for(
            perform_handshake(raw, identity, [], self.target.peer_id, "test server"), timeout
        )
        if result.stream is not raw:
            self.streams.append(result.stream)
        return result.stream

    @staticmethod
    def deep(depth: int) -> bytes:
        """msgpack of a list nested `depth` levels deep: [[[...[None]...]]]."""
        return b"\x91" * depth + b"\xc0"

    @staticmethod
    async def send(stream: ByteStream, data: bytes) -> None:
        """Write raw bytes and wait until they are handed to the kernel.

        Raises:
            ConnectionError: the connection is closed.
        """
        stream.write(data)
        await stream.drain()

    @staticmethod
    async def send_frame(stream: ByteStream, header: Any, body: bytes = b"", raw_header: bytes | None = None) -> None:
        """Send one frame; `raw_header` (already msgpack) replaces `header`, for payloads that
        `pack` would refuse or that should reach the wire exactly as given.

        Raises:
            ConnectionError: the connection is closed.
        """
        head = raw_header if raw_header is not None else pack(header)
        await HostilePeer.send(stream, PREFIX.pack(len(head), len(body)) + head + body)

    @staticmethod
    async def request_with_payload(stream: ByteStream, stream_id: int, method: str, payload: bytes) -> None:
        """Send REQUEST [0, stream_id, method, <payload>], where `payload` is raw msgpack.

        Raises:
            ConnectionError: the connection is closed.
        """
        head = b"\x94" + pack(0) + pack(stream_id) + pack(method) + payload
        await HostilePeer.send_frame(stream, None, raw_header=head)

    @staticmethod
    async def declare_body(stream: ByteStream, body_len: int, sent: bytes, stream_id: int = 0) -> None:
        """Send a REQUEST for "echo" whose prefix declares a `body_len`-byte body, then only
        `sent` of it: the server is left waiting for bytes that never come.

        Raises:
            ConnectionError: the connection is closed.
        """
        head = pack([0, stream_id, "echo", None])
        await HostilePeer.send(stream, PREFIX.pack(len(head), body_len) + head + sent)

    @staticmethod
    async def flood(stream: ByteStream, method: str, payload: Any, count: int, first_id: int = 0) -> int:
        """Send `count` REQUESTs for `method` (stream ids first_id, first_id + 2, ...) without
        reading any reply; returns the next free stream id.

        Raises:
            ConnectionError: the server closed the connection meanwhile.
        """
        batch = bytearray()
        stream_id = first_id
        for _ in range(count):
            head = pack([0, stream_id, method, payload])
            batch += PREFIX.pack(len(head), 0) + head
            stream_id += 2
            if len(batch) >= 64 * 1024:
                await HostilePeer.send(stream, bytes(batch))
                batch.clear()
        if batch:
            await HostilePeer.send(stream, bytes(batch))
        return stream_id

    async def aclose(self) -> None:
        """Close every stream this peer opened."""
        for stream in self.streams:
            stream.close()
        self.streams.clear()
        await asyncio.sleep(0)  # let the transports run their close callbacks


__all__ = [
    "HiveProcess",
    "HostilePeer",
    "launch_swarm",
    "local_swarm",
    "redeemed_bulk_links",
    "shutdown_all",
    "torch_devices",
    "wait_for",
    "wait_until",
]
