"""A packet delay line: netlab's stand-in for netem's `delay`, which this kernel may lack.

    python -m hivecli.netlab.latency --queue Q --delay-ms D

run inside a network namespace whose outgoing packets iptables sends to netfilter queue Q
(`iptables -t mangle -A POSTROUTING -o LINK -j NFQUEUE --queue-num Q`; `NetLab.set_latency` does
both). The kernel holds each queued packet until we give our verdict; we give it D ms after the
packet came, so every packet leaves D ms late, in order. Unlike the delay proxy (proxy.py), TCP
stays end to end: the sender sees the whole round trip, the link's drops and its own
retransmissions, as on a real path.

It speaks nfnetlink_queue over a raw netlink socket (no library): it binds the queue, asks for
each packet's metadata only (never its bytes), and accepts packets in batches (one verdict for
every packet up to an id), so its cost per packet is one short message read. Packets come as the
kernel built them (GSO: up to 64 KiB each), not cut to the link's MTU.

It prints one JSON line once the queue is bound (`{"event": "bound", "queue": Q}`), one line on
stderr per unexpected error, and on SIGTERM or SIGINT releases the packets it holds, unbinds and
exits with status 0.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time

# linux/netlink.h, linux/netfilter/nfnetlink.h, linux/netfilter/nfnetlink_queue.h
NETLINK_NETFILTER = 12
NETLINK_NO_ENOBUFS = 5
SOL_NETLINK = 270
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
NFQA_PACKET_HDR = 1  # in a packet message: packet id (be32), hw protocol, hook
NFQA_VERDICT_HDR = 2  # in a verdict: verdict (be32), id (be32)
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2
NFQNL_COPY_META = 1  # metadata only: the packet's bytes never cross into this process
NFQA_CFG_F_GSO = 4  # GSO packets whole, not segmented for us
NF_ACCEPT = 1

CONFIG_TIMEOUT = 2.0  # seconds the kernel gets to acknowledge a config message
QUEUE_MAXLEN = 65536  # packets the kernel holds for us: 1 Gbit/s for 500 ms in full-size frames
RECV_BUFFER = 8 * 1024 * 1024  # netlink receive buffer: notices of a burst are not dropped
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_NFGEN = struct.Struct("!BBH")  # nfgenmsg: family, version, resource id (the queue number)
_ATTR = struct.Struct("=HH")  # nlattr: length, type


def _attr(kind: int, payload: bytes) -> bytes:
    data = _ATTR.pack(_ATTR.size + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def _message(kind: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, queue) + attrs
    return _HEADER.pack(_HEADER.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, seq, 0) + body


def _packet_id(message: memoryview) -> int | None:
    """The id in a packet message (its NFQA_PACKET_HDR attribute), or None if it has none."""
    offset = _HEADER.size + _NFGEN.size
    while offset + _ATTR.size <= len(message):
        length, kind = _ATTR.unpack_from(message, offset)
        if length < _ATTR.size:
            return None
        if kind & 0x3FFF == NFQA_PACKET_HDR and length >= _ATTR.size + 4:
            return int(struct.unpack_from("!I", message, offset + _ATTR.size)[0])
        offset += (length + 3) & ~3
    return None


class DelayLine:
    """A bound netfilter queue whose packets are accepted `delay` seconds after they came.

    Raises (from the constructor):
        OSError: the queue could not be bound (not root, no nfnetlink_queue, or bound already).
    """

    def __init__(self, queue: int, delay: float) -> None:
        self.queue, self.delay = queue, delay
        self.held: collections.deque[tuple[float, int]] = collections.deque()  # (due, packet id)
        self._last_id = 0  # the newest packet id seen (ids count up from 1, per queue)
        self._seq = 0
        self._buffer = bytearray(65536)  # one notice is a hundred bytes; the kernel sends each alone
        self._view = memoryview(self._buffer)
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, RECV_BUFFER)  # SO_RCVBUFFORCE (root)
            self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
            self.sock.bind((0, 0))
            self.sock.setblocking(False)
            self._configure(_attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET)))
            self._configure(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)))
            self._configure(_attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN)))
            flags = struct.pack("!I", NFQA_CFG_F_GSO)
            self._configure(_attr(NFQA_CFG_FLAGS, flags) + _attr(NFQA_CFG_MASK, flags))
        except BaseException:
            self.sock.close()
            raise

    def _configure(self, attrs: bytes) -> None:
        """Send one config message and wait for the kernel's acknowledgement.

        Raises:
            OSError: the kernel refused it (its errno), or did not answer within CONFIG_TIMEOUT
                (TimeoutError): packet notices that arrive meanwhile are read and ignored.
        """
        self._seq += 1
        self.sock.send(_message(NFQNL_MSG_CONFIG, self.queue, attrs, NLM_F_REQUEST | NLM_F_ACK, self._seq))
        deadline = time.monotonic() + CONFIG_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.sock], [], [], remaining)[0]:
                raise TimeoutError(f"nfnetlink_queue did not acknowledge a config message in {CONFIG_TIMEOUT:g} s")
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                continue
            _, kind, _, seq, _ = _HEADER.unpack_from(data)
            if kind == NLMSG_ERROR and seq == self._seq:
                error = struct.unpack_from("=i", data, _HEADER.size)[0]
                if error:
                    raise OSError(-error, f"nfnetlink_queue refused a config message: {os.strerror(-error)}")
                return

    def receive(self, now: float) -> None:
        """Take every packet notice waiting on the socket; each is due `delay` after `now`."""
        due = now + self.delay
        while True:
            try:
                size = self.sock.recv_into(self._buffer)
            except BlockingIOError:
                return
            view, offset = self._view[:size], 0
            while offset + _HEADER.size <= size:
                length, kind, _, _, _ = _HEADER.unpack_from(view, offset)
                if length < _HEADER.size:
                    break
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    packet = _packet_id(view[offset : offset + length])
                    if packet is not None:
                        self.held.append((due, packet))
                        self._last_id = packet
                offset += (length + 3) & ~3

    def release(self, now: float) -> float | None:
        """Accept every packet due by `now` (one batch verdict); the seconds until the next is due."""
        last = None
        while self.held and self.held[0][0] <= now:
            last = self.held.popleft()[1]
        if last is not None:
            self._accept_up_to(last)
        return self.held[0][0] - now if self.held else None

    def _accept_up_to(self, packet: int) -> None:
        verdict = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet))
        while True:
            try:
                self.sock.send(_message(NFQNL_MSG_VERDICT_BATCH, self.queue, verdict))
                return
            except BlockingIOError:
                select.select([], [self.sock], [], 0.01)

    def close(self) -> None:
        """Let every packet the kernel holds for us go at once, unbind the queue and close the socket.

        The verdict covers ids up to 2**30 past the newest we saw, so that packets whose notice
        we never read go too (the kernel compares ids modulo 2**32): an unbound queue drops what
        it holds."""
        self.held.clear()
        try:
            self.receive(time.monotonic())
            self._accept_up_to((self._last_id + (1 << 30)) & 0xFFFFFFFF)
            self._configure(_attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_UNBIND, socket.AF_INET)))
        except OSError:
            pass  # closing the socket unbinds the queue anyway
        finally:
            self.sock.close()


def serve(line: DelayLine) -> None:
    """Run `line` until SIGTERM or SIGINT, then close it.

    Raises:
        OSError: reading notices or sending verdicts failed.
    """
    stop_r, stop_w = os.pipe()
    os.set_blocking(stop_w, False)

    def stop(*_: object) -> None:
        with contextlib.suppress(BlockingIOError):  # a second signal: the first one's byte still waits
            os.write(stop_w, b"x")

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    print(json.dumps({"event": "bound", "queue": line.queue}), flush=True)
    try:
        wait: float | None = None
        while True:
            ready, _, _ = select.select([line.sock, stop_r], [], [], wait)
            if stop_r in ready:
                return
            now = time.monotonic()
            if ready:
                line.receive(now)
            wait = line.release(now)
    finally:
        line.close()
        os.close(stop_r)
        os.close(stop_w)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Packet delay line on a netfilter queue (see hivecli.netlab).")
    parser.add_argument("--queue", type=int, default=0, help="netfilter queue number (default 0)")
    parser.add_argument("--delay-ms", type=float, required=True, help="how long each packet waits")
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error(f"--delay-ms {args.delay_ms}: must be >= 0")
    if not 0 <= args.queue <= 65535:
        parser.error(f"--queue {args.queue}: must be within 0..65535")
    try:
        line = DelayLine(args.queue, args.delay_ms / 1000)
    except OSError as e:
        print(f"netlab latency: cannot bind netfilter queue {args.queue}: {e}", file=sys.stderr)
        return 1
    try:
        serve(line)
    except OSError as e:  # the node's incoming packets now wait in a queue nobody reads: say so
        print(f"netlab latency: the delay line of queue {args.queue} stopped: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
