"""Averaging benchmark: hivecli's DecentralizedAverager against torch.distributed gloo.

For each world size (2, 4) and size (1M, 10M, 50M fp32), in the same run:

* gloo: `all_reduce` (SUM) across N spawned processes over tcp://127.0.0.1, GLOO_SOCKET_IFNAME=lo;
  all ranks pass a barrier before each rep; rep time = max over ranks. Between reps each rank
  does what a hivecli peer does between rounds (a barrier, then a check of its result against
  the mean, on its main thread) and restores its input.
* hivecli: N processes, each with its own DHT (peers > 0 join peer 0) and an averager with
  target_group_size = min_group_size = N. All peers pass a barrier, then call step().
  step = max end - min start (matchmaking included); allreduce = max end - min(moment a peer's
  group was assembled); matchmaking = max(assembled) - min start. After every round each
  peer checks its tensor against the mean of the initial tensors (max abs error <= 1e-5).
  CPU per peer = the process's user + system CPU during its step() (all threads), mean over
  peers; less sensitive than wall time to other load on a shared machine.

Then the state download: one donor process with a 50M fp32 tensor; `--state-trials` fresh
processes each make their model (a 50M tensor), join the DHT, create an averager and time
`load_state_from_peers(into=[model])` (the donor lookup, the download straight into the model
and the hand-over), check it bit for bit, and time a second load. Raw TCP
loopback (one stream, 8 MiB sendall / recv_into) is measured in the same run as the ceiling.

Encryption (`--encryption`, default `both`): links are encrypted by default (AES-256-GCM after
an X25519 handshake, hivecli/net/secure.py), except between two processes on one host, as all
of these are. Every DHT the worker processes start gets `NetSettings(security=...)` for its
mode: `on` (the defaults: these same-host links unsealed), `sealed` (`encrypt_same_host=True`:
sealed as links between hosts are), `off` (`encrypt=False`). `both` measures `sealed` and
`on`, `all` every mode, each averaging configuration and the state download in alternating
order against the same gloo and raw TCP references; two more tables compare the first two.
A run that fails in one mode is reported in its row ("FAILED: ...") and the others go on.
In `on` and `off` the peers, all on this host, move their chunks through shared memory
(`AveragingSettings.shared_memory`, hivecli/averaging/sharedmem.py) unless `--no-shared-memory`;
`sealed` links never do.

Peak memory per peer is the peak RSS of each averaging process (includes the torch import)
and its USS at the end. Methods follow ../shared/reference/baselines.md.

Run from the repository root:

    .venv/bin/python benchmarks/bench_averaging.py                    # everything (about 5 min)
    .venv/bin/python benchmarks/bench_averaging.py --sizes 1M 10M --peers 2 --rounds 4
    .venv/bin/python benchmarks/bench_averaging.py --encryption off   # the plaintext links only
    .venv/bin/python benchmarks/bench_averaging.py --no-audit --compression fp16 --state-trials 0
    .venv/bin/python benchmarks/bench_averaging.py --no-shared-memory  # loopback TCP between the peers
    .venv/bin/python benchmarks/bench_averaging.py --cold-openmp      # averaging before any training op
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
import traceback
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from _swarm import WorkerProcess  # noqa: E402  (benchmarks/, the script's own folder)

SIZES = {"1M": 1_000_000, "10M": 10_000_000, "50M": 50_000_000}
# --encryption: the SecuritySettings fields of each mode
MODES: dict[str, dict[str, bool]] = {"on": {}, "sealed": {"encrypt_same_host": True}, "off": {"encrypt": False}}
GROUPS = {"both": ["sealed", "on"], "all": ["sealed", "on", "off"]}
MAX_ERROR = 1e-5  # an averaged tensor further than this from the exact mean is a mismatch


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    """CPU seconds used so far by all threads of this process (the DHT and averager included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _uss_mib() -> float:
    import psutil

    return psutil.Process().memory_full_info().uss / 2**20


def _net_settings(encryption: str) -> Any:
    from hivecli.net.connection import NetSettings
    from hivecli.net.secure import SecuritySettings

    return NetSettings(security=SecuritySettings(**MODES[encryption]))


def _join_swarm(rank: int, world: int, addr_q: Any, encryption: str) -> Any:
    """As benchmarks/_swarm.py's join_swarm, with every DHT's links in mode `encryption`."""
    from hivecli import DHT

    if rank == 0:
        dht = DHT(start=True, net_settings=_net_settings(encryption))
        for _ in range(world - 1):
            addr_q.put([str(a) for a in dht.get_visible_maddrs()])
        return dht
    return DHT(initial_peers=addr_q.get(timeout=60), start=True, net_settings=_net_settings(encryption))


def _error(where: str) -> tuple[str, str, str]:
    """What a worker puts on its queue instead of a result when it fails."""
    return ("error", where, traceback.format_exc().strip().splitlines()[-1])


def _collect(out: Any, procs: list[Any], count: int, timeout: float) -> list[Any]:
    """`count` results from `out`; raises RuntimeError at the first worker error, when a worker
    died without reporting, or after `timeout` seconds."""
    import queue

    results: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(results) < count:
        try:
            item = out.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                time.sleep(1.0)  # a worker that failed may still have its error in flight
                if out.empty():
                    raise RuntimeError(f"worker exited with code {dead[0].exitcode} without a result") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s with {len(results)}/{count} results") from None
            continue
        if isinstance(item, tuple) and item and item[0] == "error":
            raise RuntimeError(f"{item[1]}: {item[2]}")
        results.append(item)
    return results


# ---- gloo ------------------------------------------------------------------------------------


def _gloo_worker(rank: int, world: int, port: int, numel: int, reps: int, cold_openmp: bool, out: Any) -> None:
    import torch
    import torch.distributed as dist

    if cold_openmp:
        _cold_openmp()
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    tensor = torch.randn(numel)
    initial = tensor.clone()
    mean = sum(_seeded(r, numel) for r in range(world)) / world
    times, cpus, errors = [], [], []
    for rep in range(reps + 1):
        dist.barrier()
        cpu_start, start = _cpu_s(), time.perf_counter()
        dist.all_reduce(tensor)
        if rep:
            times.append(time.perf_counter() - start)
            cpus.append(_cpu_s() - cpu_start)
        # the same work between reps as a hivecli peer's (_avg_worker_body): a barrier, then the
        # check on this thread, whose OpenMP team (if it has one) then spins into the next rep;
        # without it, gloo's processes ran nothing but the all-reduce and ours also the check
        dist.barrier()
        errors.append((tensor / world - mean).abs().max().item())
        tensor.copy_(initial)  # each rep sums the same inputs (in place, the sum would grow N-fold)
    out.put((rank, times, _peak_rss_mib(), cpus, max(errors)))
    dist.destroy_process_group()


def run_gloo(world: int, numel: int, reps: int, cold_openmp: bool = False) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    args = [(r, world, port, numel, reps, cold_openmp, out) for r in range(world)]
    procs = [WorkerProcess(target=_gloo_worker, args=a) for a in args]
    for p in procs:
        p.start()
    try:
        results = _collect(out, procs, world, timeout=300)  # a worker that dies fails the run at once
    finally:
        _stop(procs)
    per_rep = [max(r[1][i] for r in results) for i in range(reps)]
    rss = max(r[2] for r in results)
    cpu = statistics.median(statistics.mean(r[3][i] for r in results) for i in range(reps))
    error = max(r[4] for r in results)
    times = {"t": statistics.median(per_rep), "min": min(per_rep), "max": max(per_rep)}
    return {**times, "rss": rss, "cpu": cpu, "max_error": error}


# ---- hivecli averaging ---------------------------------------------------------------------------


def _avg_worker(
    rank: int,
    world: int,
    numel: int,
    rounds: int,
    chunk_mib: int,
    encryption: str,
    addr_q: Any,
    barrier: Any,
    out: Any,
    options: dict[str, Any],
) -> None:
    try:
        _avg_worker_body(rank, world, numel, rounds, chunk_mib, encryption, addr_q, barrier, out, options)
    except BaseException:
        out.put(_error(f"peer {rank}"))
        barrier.abort()  # the other peers stop waiting for this one
        raise


def _avg_worker_body(
    rank: int,
    world: int,
    numel: int,
    rounds: int,
    chunk_mib: int,
    encryption: str,
    addr_q: Any,
    barrier: Any,
    out: Any,
    options: dict[str, Any],
) -> None:
    import torch

    from hivecli.averaging import DecentralizedAverager

    options = dict(options)
    if options.pop("cold_openmp", False):
        _cold_openmp()
    torch.manual_seed(rank)
    tensor = torch.randn(numel)
    mean = sum(_seeded(r, numel) for r in range(world)) / world
    dht = _join_swarm(rank, world, addr_q, encryption)
    averager = DecentralizedAverager(
        [tensor],
        dht,
        prefix=f"bench-{world}-{numel}",
        target_group_size=world,
        min_group_size=world,
        min_matchmaking_time=5.0,
        request_timeout=1.0,
        chunk_bytes=chunk_mib * 2**20,
        **options,
        start=True,
    )
    records = []
    try:
        for _ in range(rounds + 1):
            barrier.wait(timeout=120)
            cpu_start, start = _cpu_s(), time.perf_counter()
            control = averager.step(wait=False, timeout=60)
            control.result(timeout=120)
            end, cpu = time.perf_counter(), _cpu_s() - cpu_start
            # the check (a subtraction and a max over the whole tensor) waits for every peer's round
            # to end: on 2 cores a peer done first would otherwise take CPU from one still finishing
            barrier.wait(timeout=120)
            with averager.get_tensors() as (averaged,):
                error = (averaged - mean).abs().max().item()
            records.append((start, control.timings["running_allreduce"], end, error, control.group_size, cpu))
        out.put((rank, records, _peak_rss_mib(), _uss_mib()))
    finally:
        averager.shutdown()
        dht.shutdown()


def _cold_openmp() -> None:
    """This thread's ops (the inputs, the error check) start no OpenMP team: the averaging
    thread is then its process's first OpenMP user, as in a process that averages before it
    trains (the case hivecli.cores.single_threaded_here is for)."""
    from hivecli.cores import single_threaded_here

    single_threaded_here()


def _seeded(rank: int, numel: int) -> Any:
    import torch

    torch.manual_seed(rank)
    return torch.randn(numel)


def run_ours(
    world: int,
    numel: int,
    rounds: int,
    chunk_mib: int = 8,
    encryption: str = "on",
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One averaging configuration; `options`: more DecentralizedAverager arguments."""
    ctx = mp.get_context("spawn")
    out, addr_q, barrier = ctx.Queue(), ctx.Queue(), ctx.Barrier(world)
    procs = [
        WorkerProcess(
            target=_avg_worker,
            args=(r, world, numel, rounds, chunk_mib, encryption, addr_q, barrier, out, options or {}),
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    try:
        results = _collect(out, procs, world, timeout=600)
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
        # CPU of one peer's step, mean over the peers, median over the timed rounds
        "cpu": statistics.median(statistics.mean(r[1][i][5] for r in results) for i in range(1, rounds + 1)),
    }


# ---- state download --------------------------------------------------------------------------


def _donor(numel: int, encryption: str, addr_q: Any, stop: Any) -> None:
    import torch

    from hivecli import DHT
    from hivecli.averaging import DecentralizedAverager

    torch.manual_seed(1234)
    dht = DHT(start=True, net_settings=_net_settings(encryption))
    averager = DecentralizedAverager([torch.randn(numel)], dht, prefix="bench-state", start=True)
    addr_q.put([str(a) for a in dht.get_visible_maddrs()])
    stop.wait(timeout=600)
    averager.shutdown()
    dht.shutdown()


def _newcomer(numel: int, encryption: str, addrs: list[str], out: Any, bulk: str) -> None:
    try:
        _newcomer_body(numel, encryption, addrs, out, bulk)
    except BaseException:
        out.put(_error("newcomer"))
        raise


def _newcomer_body(numel: int, encryption: str, addrs: list[str], out: Any, bulk: str) -> None:
    import torch

    from hivecli import DHT
    from hivecli.averaging import DecentralizedAverager

    expected = _seeded(1234, numel)
    model = torch.zeros(numel)  # the newcomer's own model: it exists, and the state lands in it
    started = time.perf_counter()
    dht = DHT(initial_peers=addrs, start=True, net_settings=_net_settings(encryption))
    averager = DecentralizedAverager(
        [model], dht, prefix="bench-state", allow_state_sharing=False, bulk_links=bulk, start=True
    )
    joined = time.perf_counter()
    loaded = averager.load_state_from_peers(timeout=60, into=[model])
    first = time.perf_counter() - joined
    identical = loaded is not None and torch.equal(model, expected)
    model.zero_()
    again_start = time.perf_counter()
    averager.load_state_from_peers(timeout=60, into=[model])
    again = time.perf_counter() - again_start
    identical = identical and torch.equal(model, expected)
    out.put((joined - started, first, again, identical, _peak_rss_mib(), _uss_mib()))
    averager.shutdown()
    dht.shutdown()


def run_state(numel: int, trials: int, encryption: str = "on", bulk: str = "auto") -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    addr_q, out, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    donor = WorkerProcess(target=_donor, args=(numel, encryption, addr_q, stop))
    donor.start()
    try:
        addrs = addr_q.get(timeout=120)
        results = []
        for _ in range(trials):
            proc = WorkerProcess(target=_newcomer, args=(numel, encryption, addrs, out, bulk))
            proc.start()
            try:
                results.extend(_collect(out, [proc], 1, timeout=300))
            finally:
                _stop([proc])
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
    proc = WorkerProcess(target=_raw_receiver, args=(port_q, nbytes, reps, out))
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


def _ratio(a: float | None, b: float | None, fmt: str = "{:.2f}x") -> str:
    return "-" if a is None or b is None else fmt.format(a / b)


def _side_by_side(
    ra: dict[str, Any], rb: dict[str, Any], key: str, scale: float, digits: int, missing: str
) -> list[str]:
    """Three cells comparing one measure of two modes: a's value, b's value, and a / b
    (`missing` for a mode that failed, whose row is empty)."""
    values = [f"{r[key] * scale:.{digits}f}" if r else missing for r in (ra, rb)]
    return [*values, _ratio(ra.get(key), rb.get(key))]


def _avg_row(world: int, name: str, mode: str, ours: dict[str, Any], gloo: dict[str, Any], nbytes: int) -> str:
    gloo_ms = {k: v * 1e3 for k, v in gloo.items()}
    gloo_cells = f"{gloo_ms['t']:.1f} ({gloo_ms['min']:.1f}-{gloo_ms['max']:.1f}) | {nbytes / gloo['t'] / 1e6:.0f}"
    if "error" in ours:
        return f"| {world} | {name} | {mode} | FAILED: {ours['error']} | | | | | {gloo_cells} | | | | |"
    ms = {k: v * 1e3 for k, v in ours.items() if isinstance(v, float)}
    check = f"{ours['max_error']:.1e}"
    if ours["max_error"] > MAX_ERROR:
        check += " MISMATCH"
    if gloo["max_error"] > MAX_ERROR:
        check += f" (gloo MISMATCH {gloo['max_error']:.1e})"
    if ours["group_sizes"] != [world]:
        check += f" (groups of {ours['group_sizes']})"
    return (
        f"| {world} | {name} | {mode} | {ms['step']:.1f} ({ms['step_min']:.1f}-{ms['step_max']:.1f}) "
        f"| {ms['allreduce']:.1f} | {ms['matchmaking']:.1f} | {ms['first']:.0f} "
        f"| {nbytes / ours['step'] / 1e6:.0f} | {gloo_cells} | {ours['step'] / gloo['t']:.2f}x "
        f"| {ours['cpu'] * 1e3:.0f} ({gloo['cpu'] * 1e3:.0f}) | {check} "
        f"| {ours['rss']:.0f} / {ours['uss']:.0f} |"
    )


def _state_row(mode: str, state: dict[str, Any], raw: float) -> str:
    if "error" in state:
        return f"| {mode} | FAILED: {state['error']} | | | | | {raw:.2f} | | | |"
    return (
        f"| {mode} | {state['join']:.2f} | {state['first']:.3f} | {state['first_gbps']:.2f} | {state['again']:.3f} "
        f"| {state['again_gbps']:.2f} | {raw:.2f} | {state['first_gbps'] / raw:.2f} | {state['identical']} "
        f"| {state['rss']:.0f} / {state['uss']:.0f} |"
    )


def _attempt(fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """fn's result, or {"error": ...} when it failed, so that the other configurations still run."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # reported in the table; the other configurations go on
        return {"error": f"{type(e).__name__}: {e}".replace("|", "/")}


def main() -> None:
    from hivecli.averaging.settings import BULK_LINKS  # not at the top: spawned workers import this module

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--sizes", nargs="+", default=["1M", "10M", "50M"], choices=list(SIZES))
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm-up round")
    parser.add_argument("--state-trials", type=int, default=5)
    parser.add_argument("--chunk-mib", type=int, default=8, help="AveragingSettings.chunk_bytes, in MiB")
    parser.add_argument("--state-size", default="50M", choices=list(SIZES))
    parser.add_argument(
        "--encryption",
        choices=[*MODES, *GROUPS],
        default="both",
        help="links between hivecli peers: the defaults (on), sealed on this host too, plaintext, "
        "sealed and on in turn (both, the default), or all three",
    )
    parser.add_argument("--compression", default="none", help="the averagers' compression (none, fp16, auto, ...)")
    parser.add_argument("--no-audit", action="store_true", help="verify_reducers = False: what the reducer audit costs")
    parser.add_argument(
        "--no-shared-memory",
        action="store_true",
        help="shared_memory = False: peers on this host send their chunks over loopback TCP, as before step 9's end",
    )
    parser.add_argument(
        "--bulk-links",
        choices=BULK_LINKS,
        default="auto",
        help="AveragingSettings.bulk_links: which transfers get a TCP connection of their own (default auto)",
    )
    parser.add_argument(
        "--cold-openmp",
        action="store_true",
        help="the peers' main threads start no OpenMP team, so the averaging thread is the first to use it",
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    modes = GROUPS.get(args.encryption, [args.encryption])
    a, b = (modes + modes)[:2]  # the modes the comparison tables compare
    options: dict[str, Any] = {
        "compression": args.compression,
        "verify_reducers": not args.no_audit,
        "shared_memory": not args.no_shared_memory,
        "bulk_links": args.bulk_links,
        "cold_openmp": args.cold_openmp,  # not an averager argument: the worker takes it out
    }

    rows = []
    print(
        "| peers | numel | encryption | step ms (min-max) | allreduce ms | matchmaking ms | 1st round ms | algbw MB/s "
        "| gloo ms (min-max) | gloo algbw MB/s | step / gloo | CPU ms/peer (gloo) | max err | peak RSS / USS MiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for world in args.peers:
        for name in args.sizes:
            numel = SIZES[name]
            nbytes = 4 * numel
            gloo = run_gloo(world, numel, args.rounds, args.cold_openmp)
            # alternate which mode goes first, so that drift in the machine's load favours neither
            order = modes if len(rows) % 2 == 0 else modes[::-1]
            ours = {
                mode: _attempt(run_ours, world, numel, args.rounds, args.chunk_mib, mode, options) for mode in order
            }
            ratio = {mode: r["step"] / gloo["t"] for mode, r in ours.items() if "error" not in r}
            rows.append({"peers": world, "numel": name, "ours": ours, "gloo": gloo, "ratio": ratio})
            for mode in modes:
                print(_avg_row(world, name, mode, ours[mode], gloo, nbytes), flush=True)

    if len(modes) >= 2:
        print()
        print(f"Encryption {a} vs {b}, same run (medians; CPU per peer and step; gloo as above):")
        print(
            f"| peers | numel | step ms {a} | step ms {b} | step {a} / {b} | allreduce ms {a} | allreduce ms {b} "
            f"| allreduce {a} / {b} | CPU ms/peer {a} | CPU ms/peer {b} | CPU {a} / {b} "
            f"| gloo ms | {a} / gloo | {b} / gloo |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for row in rows:
            ra, rb = (row["ours"][m] if "error" not in row["ours"][m] else {} for m in (a, b))
            cells = [
                *_side_by_side(ra, rb, "step", 1e3, 1, "FAILED"),
                *_side_by_side(ra, rb, "allreduce", 1e3, 1, "-"),
                *_side_by_side(ra, rb, "cpu", 1e3, 0, "-"),
                f"{row['gloo']['t'] * 1e3:.1f}",
                _ratio(ra.get("step"), row["gloo"]["t"]),
                _ratio(rb.get("step"), row["gloo"]["t"]),
            ]
            print(f"| {row['peers']} | {row['numel']} | " + " | ".join(cells) + " |", flush=True)

    states: dict[str, Any] = {}
    if args.state_trials:
        numel = SIZES[args.state_size]
        raw = run_raw_tcp(4 * numel, 5)
        for mode in modes:
            states[mode] = _attempt(run_state, numel, args.state_trials, encryption=mode, bulk=args.bulk_links)
            states[mode]["raw_tcp_gbps"] = raw
        print()
        print(
            f"load_state_from_peers, {args.state_size} fp32 ({4 * numel / 1e6:.0f} MB), 1 donor, "
            f"{args.state_trials} fresh peers:"
        )
        print(
            "| encryption | join s | first load s | first GB/s | repeat load s | repeat GB/s | raw TCP GB/s "
            "| first / raw | bit-identical | peak RSS / USS MiB |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for mode in modes:
            print(_state_row(mode, states[mode], raw))
        if len(modes) >= 2:
            ra, rb = (states[m] if "error" not in states[m] else {} for m in (a, b))
            print()
            print(
                f"| first GB/s {a} | first GB/s {b} | first {a} / {b} "
                f"| repeat GB/s {a} | repeat GB/s {b} | repeat {a} / {b} |"
            )
            print("| --- | --- | --- | --- | --- | --- |")
            cells = [
                *_side_by_side(ra, rb, "first_gbps", 1.0, 2, "FAILED"),
                *_side_by_side(ra, rb, "again_gbps", 1.0, 2, "FAILED"),
            ]
            print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"averaging": rows, "state": states or None}, f, indent=2)


if __name__ == "__main__":
    main()
