"""An averaging peer for netlab scenarios and benchmarks/bench_wan.py: one DHT and one averager, round after round.

    python -m hivecli.netlab.peer --listen /ip4/0.0.0.0/tcp/0 [--initial-peers MADDR ...] --prefix NAME
        [--size 1000] [--group-size G] [--rounds R] [--compression none|float16|auto] [--barrier-dir DIR]

Prints JSON lines on stdout, each flushed:

    {"event": "listening", "peer_id": ..., "maddrs": [...], "reachability": {"status": ..., "relayed": ..., ...}}
    {"event": "round", "round": i, "ok": bool, "group_size": n | null, "seconds": t,
     "allreduce_seconds": t | null, "start": unix time, "time": unix time at the end,
     "valid": bool | null, "exact": bool | null, "error": "..." | null}           # one per round
    {"event": "stopped"}                                                          # after --rounds or SIGTERM

Round i fills the tensor with `seed + i` and shares that number as the step's gather, so after a
successful round the peer knows its group's inputs: "valid" says its tensor is finite and within
their range, "exact" that it is their mean (within float16 rounding with --compression float16 or auto);
a member that drops out mid-round leaves a valid but inexact average. A failed round is reported and
the next one starts: a failure is data, not a crash. SIGTERM (or SIGINT) cancels the round in
flight, shuts the averager and the DHT down, prints "stopped" and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any


def emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


def _wait_barrier(
    directory: Path, name: str, round_no: int, count: int, deadline: float, stop: threading.Event
) -> bool:
    """Mark `name` as ready for `round_no` in `directory`; True once `count` peers have (False: deadline or stop)."""
    (directory / f"{name}-{round_no}").touch()
    # a shared directory is the simplest barrier between processes in different namespaces;
    # polled, since it is only waited on at the start of a round
    while len(list(directory.glob(f"*-{round_no}"))) < count:
        if time.monotonic() > deadline or stop.wait(0.01):
            return False
    return True


def _check(tensor: Any, gathered: dict[Any, Any], compression: str) -> tuple[bool, bool]:
    """(valid, exact): whether `tensor` is finite and within the range of the group's inputs, and
    whether it is their mean (it is not when a member dropped out mid-round and the others
    averaged without it)."""
    fills = [float(v) for v in gathered.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(fills) != len(gathered) or not fills:
        return False, False
    # float16 on the wire keeps 11 significant bits; float32 sums exactly at these magnitudes
    tolerance = (1e-5 if compression == "none" else 1e-3) * max(1.0, max(abs(f) for f in fills))  # auto: fp16
    low, high = float(tensor.min()), float(tensor.max())
    valid = (
        math.isfinite(low) and math.isfinite(high) and min(fills) - tolerance <= low <= high <= max(fills) + tolerance
    )
    exact = valid and max(abs(low - statistics.fmean(fills)), abs(high - statistics.fmean(fills))) <= tolerance
    return valid, exact


def run(args: argparse.Namespace, stop: threading.Event) -> None:
    import torch

    from hivecli import DHT
    from hivecli.averaging import DecentralizedAverager

    dht = DHT(
        initial_peers=args.initial_peers,
        host_maddrs=[args.listen],
        client_mode=args.client_mode,
        check_reachability=not (args.client_mode or args.no_reachability_check),  # as `hive start/join` do
        start=True,
    )
    averager = None
    try:
        from hivecli.cli._network import describe_reachability, reachability_json

        advice, maddrs, _ = describe_reachability(dht)
        emit(event="listening", peer_id=str(dht.peer_id), maddrs=maddrs, reachability=reachability_json(dht, advice))
        tensor = torch.zeros(args.size)
        averager = DecentralizedAverager(
            [tensor],
            dht,
            prefix=args.prefix,
            target_group_size=args.group_size,
            min_group_size=args.min_group_size or args.group_size,
            compression=args.compression,  # get_codec knows "float16" as fp16
            client_mode=dht.client_mode,  # also True when the reachability check found no way in
            min_matchmaking_time=args.matchmaking_time,
            request_timeout=min(3.0, args.matchmaking_time / 2),  # must stay under min_matchmaking_time
            allreduce_timeout=args.averaging_timeout,
            bulk_links=args.bulk_links,
            verify_reducers=not args.no_audit,
            uplink_mbps=args.uplink_mbps,
            pacing=args.pacing,
            start=True,
        )
        name = str(dht.peer_id)
        round_no = 0
        while not stop.is_set() and (args.rounds == 0 or round_no < args.rounds):
            _round(args, averager, name, round_no, stop)
            round_no += 1
    finally:
        if averager is not None:
            averager.shutdown()
        dht.shutdown()


def _round(args: argparse.Namespace, averager: Any, name: str, round_no: int, stop: threading.Event) -> None:
    fill = args.seed + round_no
    with averager.get_tensors() as (tensor,):
        tensor.fill_(fill)
    if args.barrier_dir and not _wait_barrier(
        Path(args.barrier_dir), name, round_no, args.group_size, time.monotonic() + args.averaging_timeout, stop
    ):
        if not stop.is_set():
            now = time.time()
            emit(**_record(round_no, now, now, error=f"barrier: fewer than {args.group_size} peers within the timeout"))
        return
    start, start_perf = time.time(), time.perf_counter()
    control = averager.step(gather=fill, timeout=args.averaging_timeout, wait=False)
    while not control.done():
        if stop.wait(0.02):  # SIGTERM: give the round up rather than hold the shutdown
            control.cancel()
            return
    # when the step finished, not when this loop noticed
    finished = control.timings.get("finished", time.perf_counter())
    end = start + finished - start_perf
    assembled = control.timings.get("running_allreduce")
    allreduce = None if assembled is None else finished - assembled  # from group assembled to the end
    try:
        gathered = control.result()
    except Exception as e:  # a failed round is a result to report; the next one still runs
        emit(**_record(round_no, start, end, allreduce=allreduce, error=f"{type(e).__name__}: {e}"))
        return
    with averager.get_tensors() as (tensor,):
        valid, exact = _check(tensor, gathered, args.compression)
    record = _record(round_no, start, end, control.group_size or len(gathered), allreduce, valid, exact)
    emit(**record, pace_mbps=averager.uplink_pace_mbps)  # what the next round paces to (pacing = "auto" learns it)


def _record(
    round_no: int,
    start: float,
    end: float,
    group_size: int | None = None,
    allreduce: float | None = None,
    valid: bool | None = None,
    exact: bool | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    return {
        "event": "round",
        "round": round_no,
        "ok": error is None,
        "group_size": group_size,
        "seconds": end - start,
        "allreduce_seconds": allreduce,
        "start": start,
        "time": end,
        "valid": valid,
        "exact": exact,
        "error": error,
    }


def main(argv: list[str] | None = None) -> int:
    from hivecli.averaging.settings import BULK_LINKS, PACINGS  # as `run` imports hivecli: only when run

    parser = argparse.ArgumentParser(description="An averaging peer that reports each round as a JSON line.")
    parser.add_argument("--listen", default="/ip4/0.0.0.0/tcp/0")
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--prefix", default="netlab")
    parser.add_argument("--size", type=int, default=1000, help="float32 elements averaged")
    parser.add_argument("--group-size", type=int, default=2, help="target group size (and the minimum, by default)")
    parser.add_argument("--min-group-size", type=int, default=0, help="smallest group (default: --group-size)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds to run (0: until SIGTERM)")
    parser.add_argument("--compression", choices=["none", "float16", "auto"], default="none")
    parser.add_argument("--bulk-links", choices=BULK_LINKS, default="auto")
    parser.add_argument("--matchmaking-time", type=float, default=5.0, help="min_matchmaking_time, seconds")
    parser.add_argument("--no-audit", action="store_true", help="verify_reducers = False (what the audit costs)")
    parser.add_argument("--uplink-mbps", type=float, default=None, help="AveragingSettings.uplink_mbps (pacing)")
    parser.add_argument("--pacing", choices=PACINGS, default="auto", help="AveragingSettings.pacing")
    parser.add_argument("--averaging-timeout", type=float, default=60.0, help="seconds to find a group; and to average")
    parser.add_argument("--client-mode", action="store_true", help="never accept connections (DHT and averager)")
    parser.add_argument(
        "--no-reachability-check", action="store_true", help="skip the dial-back check (and relays) at start"
    )
    parser.add_argument("--barrier-dir", help="start each round only once --group-size peers reached it (files here)")
    parser.add_argument("--seed", type=int, default=None, help="round i averages seed + i (default: random 0..99)")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(100)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    run(args, stop)
    emit(event="stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
