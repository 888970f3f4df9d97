"""Averaging benchmark: hivecli's DecentralizedAverager against torch.distributed gloo.

For each world size (2, 4) and size (1M, 10M, 50M fp32), in the same run:

* gloo: `all_reduce` (SUM) across N spawned processes over tcp://127.0.0.1, GLOO_SOCKET_IFNAME=lo;
  all ranks pass a barrier before each rep; rep time = max over ranks.
* hivecli: N processes, each with its own DHT (peers > 0 join peer 0) and an averager with
  target_group_size = min_group_size = N. All peers pass a barrier, then call step().
  step = max end - min start (matchmaking included); allreduce = max end - min(moment a peer's
  group was assembled); matchmaking = max(assembled) - min start. After every round each
  peer checks its tensor against the mean of the initial tensors (max abs error <= 1e-5).

Then the state download: one donor process with a 50M fp32 tensor; `--state-trials` fresh
processes each join the DHT, create an averager and time `load_state_from_peers()` (the donor
lookup, the download and the hand-over), check it bit for bit, and time a second load. Raw TCP
loopback (one stream, 8 MiB sendall / recv_into) is measured in the same run as the ceiling.

Peak memory per peer is the peak RSS of each averaging process (includes the torch import)
and its USS at the end. Methods follow ../shared/reference/baselines.md.

Run from the repository root:

    .venv/bin/python benchmarks/bench_averaging.py                    # everything (about 3 min)
    .venv/bin/python benchmarks/bench_averaging.py --sizes 1M 10M --peers 2 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import socket
import statistics
import sys
import time
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
SIZES = {"1M": 1_000_000, "10M": 10_000_000, "50M": 50_000_000}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _uss_mib() -> float:
    import psutil

    return psutil.Process().memory_full_info().uss / 2**20


# ---- gloo ------------------------------------------------------------------------------------


def _gloo_worker(rank: int, world: int, port: int, numel: int, reps: int, out: Any) -> None:
    import torch
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    tensor = torch.randn(numel)
    times = []
    for rep in range(reps + 1):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        if rep:
            times.append(time.perf_counter() - start)
    out.put((rank, times, _peak_rss_mib()))
    dist.destroy_process_group()


def run_gloo(world: int, numel: int, reps: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_gloo_worker, args=(r, world, port, numel, reps, out)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=300) for _ in procs]
    finally:
        _stop(procs)
    per_rep = [max(r[1][i] for r in results) for i in range(reps)]
    rss = max(r[2] for r in results)
    return {"t": statistics.median(per_rep), "min": min(per_rep), "max": max(per_rep), "rss": rss}


# ---- hivecli averaging ---------------------------------------------------------------------------


def _avg_worker(
    rank: int, world: int, numel: int, rounds: int, chunk_mib: int, addr_q: Any, barrier: Any, out: Any
) -> None:
    import torch
    from _swarm import join_swarm

    from hivecli.averaging import DecentralizedAverager

    torch.manual_seed(rank)
    tensor = torch.randn(numel)
    mean = sum(_seeded(r, numel) for r in range(world)) / world
    dht = join_swarm(rank, world, addr_q)
    averager = DecentralizedAverager(
        [tensor],
        dht,
        prefix=f"bench-{world}-{numel}",
        target_group_size=world,
        min_group_size=world,
        min_matchmaking_time=5.0,
        request_timeout=1.0,
        chunk_bytes=chunk_mib * 2**20,
        start=True,
    )
    records = []
    try:
        for _ in range(rounds + 1):
            barrier.wait(timeout=120)
            start = time.perf_counter()
            control = averager.step(wait=False, timeout=60)
            control.result(timeout=120)
            end = time.perf_counter()
            with averager.get_tensors() as (averaged,):
                error = (averaged - mean).abs().max().item()
            records.append((start, control.timings["running_allreduce"], end, error, control.group_size))
        out.put((rank, records, _peak_rss_mib(), _uss_mib()))
    finally:
        averager.shutdown()
        dht.shutdown()


def _seeded(rank: int, numel: int) -> Any:
    import torch

    torch.manual_seed(rank)
    return torch.randn(numel)


def run_ours(world: int, numel: int, rounds: int, chunk_mib: int = 8) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out, addr_q, barrier = ctx.Queue(), ctx.Queue(), ctx.Barrier(world)
    procs = [
        ctx.Process(target=_avg_worker, args=(r, world, numel, rounds, chunk_mib, addr_q, barrier, out))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=600) for _ in procs]
    finally:
        _stop(procs)
    steps, allreduces, matchmakings, errors = [], [], [], []
    for i in range(rounds + 1):
        starts = [r[1][i][0] for r in results]
        assembled = [r[1][i][1] for r in results]
        ends = [r[1][i][2] for r in results]
        errors.append(max(r[1][i][3] for r in results))
        if i == 0:
            first = max(ends) - min(starts)
            continue
        steps.append(max(ends) - min(starts))
        allreduces.append(max(ends) - min(assembled))
        matchmakings.append(max(assembled) - min(starts))
    return {
        "step": statistics.median(steps),
        "step_min": min(steps),
        "step_max": max(steps),
        "allreduce": statistics.median(allreduces),
        "matchmaking": statistics.median(matchmakings),
        "first": first,
        "max_error": max(errors),
        "group_sizes": sorted({rec[4] for r in results for rec in r[1]}),
        "rss": max(r[2] for r in results),
        "uss": max(r[3] for r in results),
    }


# ---- state download --------------------------------------------------------------------------


def _donor(numel: int, addr_q: Any, stop: Any) -> None:
    import torch

    from hivecli import DHT
    from hivecli.averaging import DecentralizedAverager

    torch.manual_seed(1234)
    dht = DHT(start=True)
    averager = DecentralizedAverager([torch.randn(numel)], dht, prefix="bench-state", start=True)
    addr_q.put([str(a) for a in dht.get_visible_maddrs()])
    stop.wait(timeout=600)
    averager.shutdown()
    dht.shutdown()


def _newcomer(numel: int, addrs: list[str], out: Any) -> None:
    import torch

    from hivecli import DHT
    from hivecli.averaging import DecentralizedAverager

    expected = _seeded(1234, numel)
    started = time.perf_counter()
    dht = DHT(initial_peers=addrs, start=True)
    averager = DecentralizedAverager(
        [torch.zeros(numel)], dht, prefix="bench-state", allow_state_sharing=False, start=True
    )
    joined = time.perf_counter()
    loaded = averager.load_state_from_peers(timeout=60)
    first = time.perf_counter() - joined
    identical = loaded is not None and torch.equal(loaded[1][0], expected)
    del loaded
    again_start = time.perf_counter()
    averager.load_state_from_peers(timeout=60)
    again = time.perf_counter() - again_start
    out.put((joined - started, first, again, identical, _peak_rss_mib(), _uss_mib()))
    averager.shutdown()
    dht.shutdown()


def run_state(numel: int, trials: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    addr_q, out, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    donor = ctx.Process(target=_donor, args=(numel, addr_q, stop))
    donor.start()
    try:
        addrs = addr_q.get(timeout=120)
        results = []
        for _ in range(trials):
            proc = ctx.Process(target=_newcomer, args=(numel, addrs, out))
            proc.start()
            results.append(out.get(timeout=300))
            proc.join(timeout=30)
    finally:
        stop.set()
        donor.join(timeout=30)
        _stop([donor])
    nbytes = 4 * numel
    first = statistics.median(r[1] for r in results)
    again = statistics.median(r[2] for r in results)
    return {
        "join": statistics.median(r[0] for r in results),
        "first": first,
        "first_gbps": nbytes / first / 1e9,
        "again": again,
        "again_gbps": nbytes / again / 1e9,
        "identical": f"{sum(r[3] for r in results)}/{len(results)}",
        "rss": max(r[4] for r in results),
        "uss": max(r[5] for r in results),
    }


def _raw_receiver(port_q: Any, nbytes: int, reps: int, out: Any) -> None:
    import torch

    server = socket.create_server(("127.0.0.1", 0))
    port_q.put(server.getsockname()[1])
    conn, _ = server.accept()
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    times = []
    for _ in range(reps + 1):
        start, got = time.perf_counter(), 0
        while got < nbytes:
            got += conn.recv_into(view[got:], min(8 << 20, nbytes - got))
        times.append(time.perf_counter() - start)
        conn.sendall(b"k")
    out.put(times[1:])


def run_raw_tcp(nbytes: int, reps: int) -> float:
    import torch

    ctx = mp.get_context("spawn")
    port_q, out = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_raw_receiver, args=(port_q, nbytes, reps, out))
    proc.start()
    try:
        sock = socket.create_connection(("127.0.0.1", port_q.get(timeout=60)))
        data = memoryview(torch.ones(nbytes, dtype=torch.uint8).numpy())
        for _ in range(reps + 1):
            for offset in range(0, nbytes, 8 << 20):
                sock.sendall(data[offset : offset + (8 << 20)])
            sock.recv(1)
        times = out.get(timeout=60)
        sock.close()
    finally:
        _stop([proc])
    return nbytes / statistics.median(times) / 1e9


# ---- helpers -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: list[Any]) -> None:
    for p in procs:
        p.join(timeout=10)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--sizes", nargs="+", default=["1M", "10M", "50M"], choices=list(SIZES))
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm-up round")
    parser.add_argument("--state-trials", type=int, default=5)
    parser.add_argument("--chunk-mib", type=int, default=8, help="AveragingSettings.chunk_bytes, in MiB")
    parser.add_argument("--state-size", default="50M", choices=list(SIZES))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    rows = []
    print(
        "| peers | numel | step ms (min-max) | allreduce ms | matchmaking ms | 1st round ms | algbw MB/s "
        "| gloo ms (min-max) | gloo algbw MB/s | step / gloo | max err | peak RSS / USS MiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for world in args.peers:
        for name in args.sizes:
            numel = SIZES[name]
            gloo = run_gloo(world, numel, args.rounds)
            ours = run_ours(world, numel, args.rounds, args.chunk_mib)
            nbytes = 4 * numel
            row = {"peers": world, "numel": name, "ours": ours, "gloo": gloo, "ratio": ours["step"] / gloo["t"]}
            rows.append(row)
            ms = {k: v * 1e3 for k, v in ours.items() if isinstance(v, float)}
            gloo_ms = {k: v * 1e3 for k, v in gloo.items()}
            print(
                f"| {world} | {name} | {ms['step']:.1f} ({ms['step_min']:.1f}-{ms['step_max']:.1f}) "
                f"| {ms['allreduce']:.1f} | {ms['matchmaking']:.1f} | {ms['first']:.0f} "
                f"| {nbytes / ours['step'] / 1e6:.0f} | {gloo_ms['t']:.1f} ({gloo_ms['min']:.1f}-{gloo_ms['max']:.1f}) "
                f"| {nbytes / gloo['t'] / 1e6:.0f} | {row['ratio']:.2f}x | {ours['max_error']:.1e} "
                f"| {ours['rss']:.0f} / {ours['uss']:.0f} |",
                flush=True,
            )
    state = None
    if args.state_trials:
        numel = SIZES[args.state_size]
        raw = run_raw_tcp(4 * numel, 5)
        state = run_state(numel, args.state_trials)
        state["raw_tcp_gbps"] = raw
        print()
        print(
            f"load_state_from_peers, {args.state_size} fp32 ({4 * numel / 1e6:.0f} MB), 1 donor, "
            f"{args.state_trials} fresh peers:"
        )
        print(
            "| join s | first load s | first GB/s | repeat load s | repeat GB/s | raw TCP GB/s | first / raw "
            "| bit-identical | peak RSS / USS MiB |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        print(
            f"| {state['join']:.2f} | {state['first']:.3f} | {state['first_gbps']:.2f} | {state['again']:.3f} "
            f"| {state['again_gbps']:.2f} | {raw:.2f} | {state['first_gbps'] / raw:.2f} | {state['identical']} "
            f"| {state['rss']:.0f} / {state['uss']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"averaging": rows, "state": state}, f, indent=2)


if __name__ == "__main__":
    main()
