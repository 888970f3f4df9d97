"""benchmarks/_tcptrace.py: how bench_wan.py --trace finds the rounds with a collapsed congestion window."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import _tcptrace


def _probe(at: float, src: str, dst: str, cwnd: int = 4) -> str:
    """A tcp_probe line as tracefs prints it (the kernel's filter let only small windows through)."""
    return (
        f"          python-31059   [000] b..1. {at:.6f}: tcp_probe: family=AF_INET src={src}:38277 "
        f"dest={dst}:34456 mark=0x0 data_len=2896 snd_nxt=0x3d88704e snd_una=0x3d886f8d snd_cwnd={cwnd} "
        "ssthresh=198 snd_wnd=64512 srtt=50656 rcv_wnd=65536 sock_cookie=1034 skbaddr=0000000078824eba "
        "skaddr=00000000226df5d6\n"
    )


def _retransmit(at: float, src: str, dst: str) -> str:
    return (
        f"              tc-31412   [001] ..s1. {at:.6f}: tcp_retransmit_skb: skbaddr=0000000037fc64b3 "
        f"skaddr=000000000c1bcd5c family=AF_INET sport=54016 dport=37121 saddr={src} daddr={dst} "
        f"saddrv6=::ffff:{src} daddrv6=::ffff:{dst} state=TCP_ESTABLISHED err=0\n"
    )


def test_a_collapse_is_one_per_socket_and_quiet_without_a_retransmission_before_it() -> None:
    lines = [
        "# tracer: nop\n",
        _probe(100.00, "10.84.0.1", "10.84.0.2"),
        _probe(100.05, "10.84.0.1", "10.84.0.2"),  # the same collapse, later segments
        _probe(100.10, "10.84.0.2", "10.84.0.1"),  # the other direction: a socket of its own
        _retransmit(101.80, "10.84.0.3", "10.84.0.4"),
        _probe(102.00, "10.84.0.3", "10.84.0.4"),  # a retransmission explains this one
        _probe(103.00, "10.84.0.1", "10.84.0.2"),  # the first socket again, long after: a new collapse
        _probe(104.00, "10.99.0.1", "10.99.0.2"),  # another lab's hosts
    ]
    collapses = _tcptrace.collapses_in(lines, "10.84.0.", offset=1000.0)
    assert [(c.time, c.src, c.dst, c.quiet) for c in collapses] == [
        (1100.0, "10.84.0.1", "10.84.0.2", True),
        (1100.1, "10.84.0.2", "10.84.0.1", True),
        (1102.0, "10.84.0.3", "10.84.0.4", False),
        (1103.0, "10.84.0.1", "10.84.0.2", True),
    ]


def test_a_retransmission_by_another_host_or_long_before_explains_nothing() -> None:
    lines = [
        _retransmit(99.0, "10.84.0.1", "10.84.0.2"),  # more than RETRANSMIT_S before
        _retransmit(99.9, "10.84.0.3", "10.84.0.1"),  # another sender
        _probe(100.0, "10.84.0.1", "10.84.0.2"),
    ]
    [collapse] = _tcptrace.collapses_in(lines, "10.84.0.", offset=0.0)
    assert collapse.quiet
