"""DHT benchmark: swarm bootstrap, store/get latency and success, memory per node.

Modelled on the hivemind 1.1.12 measurement in /work/shared/reference/baselines.md (script
hivemind_dht.py): N nodes are started one after another, each joining through a random earlier
node; then `--ops` store() calls (random key, from a random node, expiration +600 s) and `--ops`
get() calls (each key once, from a random node other than the one that stored it), one at a time.

Two modes:

* process: the user-facing `hivecli.DHT`, one OS process per node. Workers are this same script
  started with `--worker` (subprocess, no fork); the parent sends them commands over pipes and
  every latency is measured inside the worker around the DHT call, so the IPC is not counted.
  Memory is the RSS / USS of each worker process after the ops.
* inprocess: `DHTNode` objects in one asyncio loop (real TCP on 127.0.0.1), each run in a fresh
  child process of its own. Memory is that process's RSS divided by N (pages are shared, so this is
  only indicative) and its USS growth since before the first node, divided by N.

`--big N` adds one more in-process run with N nodes (default 1024; 0 skips it), whatever `--mode`
says. It runs with idle_timeout 5 s and refresh_period 600 s by default (--big-idle-timeout,
--big-refresh-period; the row label names them): N nodes in one process share one fd table and
one core. In one process every connection costs two file descriptors (60-80 per node with the default
idle timeout of 300 s), so where the hard RLIMIT_NOFILE is lower than that, a large in-process TCP
run runs out of descriptors. Such a run (and any failed in-process run) is reported, then repeated
(unless --no-fallback) with idle_timeout 5 s, which closes unused connections, and refresh_period
3600 s, which keeps the periodic maintenance of all N nodes, all on one core here, out of the
measurement. See also --big-transport / --big-idle-timeout / --big-refresh-period.

Run (from the repository root):

    .venv/bin/python benchmarks/bench_dht.py                           # 16 64 256, both modes, big 1024
    .venv/bin/python benchmarks/bench_dht.py --nodes 16 64 --big 0     # quick
    .venv/bin/python benchmarks/bench_dht.py --nodes 16 64 256 --big 1024 --json results.json

Both modes use the event loop hivecli picks for its DHT threads (uvloop where installed);
HIVE_EVENT_LOOP=asyncio in the environment selects the standard loop for a comparison.
Workers never import torch. Every worker is stopped at the end, also on errors and Ctrl+C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import select
import signal
import string
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTEN_MADDR = "/ip4/127.0.0.1/tcp/0"
TTL_S = 600.0
MIB = 2**20

# hivemind 1.1.12, /work/shared/reference/baselines.md, section "hivemind DHT (200 ops each)".
# Times in seconds for bootstrap/start, milliseconds for store/get.
HIVEMIND_REFERENCE: dict[tuple[str, int], dict[str, float]] = {
    ("process", 16): {
        "bootstrap_s": 4.28,
        "start_med_s": 0.26,
        "start_p95_s": 0.36,
        "store_med_ms": 20.5,
        "store_p95_ms": 35.0,
        "get_med_ms": 5.26,
        "get_p95_ms": 7.25,
    },
    ("process", 64): {
        "bootstrap_s": 26.7,
        "start_med_s": 0.40,
        "start_p95_s": 0.62,
        "store_med_ms": 30.2,
        "store_p95_ms": 44.0,
        "get_med_ms": 7.04,
        "get_p95_ms": 9.26,
    },
    ("inprocess", 16): {
        "bootstrap_s": 3.93,
        "start_med_s": 0.24,
        "start_p95_s": 0.40,
        "store_med_ms": 14.7,
        "store_p95_ms": 27.8,
        "get_med_ms": 2.74,
        "get_p95_ms": 4.44,
    },
    ("inprocess", 64): {
        "bootstrap_s": 22.9,
        "start_med_s": 0.35,
        "start_p95_s": 0.55,
        "store_med_ms": 24.0,
        "store_p95_ms": 35.6,
        "get_med_ms": 4.66,
        "get_p95_ms": 6.47,
    },
}
# Memory per node in process mode: the DHT process (peak RSS 333 MiB, USS about 14 MiB) plus its
# p2pd (about 70 MiB, all private).
HIVEMIND_MEMORY_MIB = {"rss": 333.0 + 70.0, "uss": 14.0 + 70.0}

# Targets from the issue, checked at 64 nodes.
TARGET_N = 64
TARGET_STORE_MED_MS = 5.0
TARGET_GET_MED_MS = 2.0
TARGET_START_MED_MS = 50.0
TARGET_RSS_MIB = 60.0


# ---- helpers shared by parent and worker ---------------------------------------------------


def raise_nofile_limit(wanted: int | None = None) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (or both to `wanted`, which needs privilege).
    Returns the (soft, hard) limits in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if wanted is not None and (hard != resource.RLIM_INFINITY and wanted > hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
        except (ValueError, OSError):
            pass
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for an empty list."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def random_string(rng: random.Random, prefix: str, length: int = 16) -> str:
    return prefix + "".join(rng.choices(string.ascii_letters + string.digits, k=length))


# ---- worker (process mode) -----------------------------------------------------------------


def worker_main() -> None:
    """One DHT node in its own process, driven by JSON lines on stdin; answers on stdout."""
    raise_nofile_limit()
    out_fd = os.dup(1)
    os.dup2(2, 1)  # anything the library prints goes to stderr, not into the protocol stream

    def reply(obj: dict[str, Any]) -> None:
        os.write(out_fd, (json.dumps(obj) + "\n").encode())

    t0 = time.perf_counter()
    import psutil

    from hivecli import DHT, get_dht_time

    import_s = time.perf_counter() - t0
    proc = psutil.Process()
    reply({"hello": True, "pid": os.getpid(), "import_s": import_s, "torch": "torch" in sys.modules})
    dht: Any = None
    profiler = None
    try:
        while True:
            line = sys.stdin.buffer.readline()
            if not line:
                break
            cmd = json.loads(line)
            op = cmd["op"]
            try:
                if op == "start":
                    t = time.perf_counter()
                    dht = DHT(initial_peers=cmd["peers"], start=True, host_maddrs=[LISTEN_MADDR])
                    start_s = time.perf_counter() - t
                    if cmd.get("profile"):  # profile the DHT's own thread, where the work happens
                        import cProfile

                        profiler = cProfile.Profile()
                        dht.run_coroutine(lambda _dht, _node, p=profiler: _call_async(p.enable))
                    reply({"start_s": start_s, "maddrs": [str(m) for m in dht.get_visible_maddrs()]})
                elif op == "store":
                    expiration = get_dht_time() + cmd["ttl"]
                    t = time.perf_counter()
                    ok = dht.store(cmd["key"], cmd["value"], expiration)
                    reply({"ok": bool(ok), "t": time.perf_counter() - t})
                elif op == "get":
                    t = time.perf_counter()
                    found = dht.get(cmd["key"])
                    elapsed = time.perf_counter() - t
                    correct = found is not None and found.value == cmd["value"]
                    reply({"found": found is not None, "ok": correct, "t": elapsed})
                elif op == "mem":
                    mem = proc.memory_full_info()
                    peak = max(mem.rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux
                    reply(
                        {
                            "rss": mem.rss,
                            "uss": mem.uss,
                            "peak_rss": peak,
                            "fds": open_fds(),
                            "threads": proc.num_threads(),
                            "torch": "torch" in sys.modules,
                        }
                    )
                elif op == "stop":
                    break
                else:
                    reply({"error": f"unknown op {op!r}"})
            except Exception as e:
                reply({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
    except KeyboardInterrupt:
        pass
    finally:
        if profiler is not None:
            dht.run_coroutine(lambda _dht, _node, p=profiler: _call_async(p.disable))
            profile_dir = os.environ.get("BENCH_DHT_PROFILE_DIR", tempfile.gettempdir())
            profiler.dump_stats(os.path.join(profile_dir, f"worker-{os.getpid()}.prof"))
        if dht is not None:
            dht.shutdown()


async def _call_async(fn: Any) -> None:
    fn()


class WorkerError(RuntimeError):
    pass


class RunFailed(RuntimeError):
    """A run stopped early; the message says where and why."""


class Worker:
    """Parent-side handle of one worker process."""

    def __init__(self, index: int, log_dir: str, env: dict[str, str]):
        self.index = index
        self.log_path = os.path.join(log_dir, f"worker-{index}.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                start_new_session=True,  # Ctrl+C reaches only the parent, which then stops us
            )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._stdin = self.proc.stdin
        self._fd = self.proc.stdout.fileno()
        self._buf = b""

    def log_tail(self, chars: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-chars:]
        except OSError:
            return ""

    def _fail(self, what: str) -> WorkerError:
        return WorkerError(
            f"worker {self.index} (pid {self.proc.pid}) {what}; rc={self.proc.poll()}; stderr tail:\n{self.log_tail()}"
        )

    def send(self, msg: dict[str, Any]) -> None:
        try:
            self._stdin.write((json.dumps(msg) + "\n").encode())
            self._stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._fail("is gone (broken pipe)") from None

    def read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self._fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                raise self._fail(f"sent no answer within {timeout:g} s")
            chunk = os.read(self._fd, 65536)
            if not chunk:
                raise self._fail("exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        answer = json.loads(line)
        if "error" in answer:
            raise WorkerError(f"worker {self.index}: {answer['error']}\n{answer.get('traceback', '')}")
        return answer

    def request(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.send(msg)
        return self.read(timeout)


def stop_workers(workers: list[Worker], timeout: float = 15.0) -> None:
    """Ask every worker to stop, then terminate (and at last kill) those still running."""
    for w in workers:
        if w.proc.poll() is None:
            try:
                w._stdin.write(b'{"op": "stop"}\n')
                w._stdin.flush()
            except (BrokenPipeError, OSError):
                pass
        try:
            w._stdin.close()
        except (BrokenPipeError, OSError):
            pass
    deadline = time.monotonic() + timeout
    for w in workers:
        try:
            w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.proc.terminate()
    for w in workers:
        try:
            w.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait(timeout=3)
        if w.proc.stdout is not None:
            w.proc.stdout.close()


# ---- results -------------------------------------------------------------------------------


@dataclass
class RunResult:
    n: int
    mode: str
    bootstrap_s: float = math.nan
    start_s: list[float] = field(default_factory=list)
    store_s: list[float] = field(default_factory=list)
    get_s: list[float] = field(default_factory=list)
    store_ok: int = 0
    get_ok: int = 0
    get_found: int = 0
    ops: int = 0
    rss_mib: list[float] = field(default_factory=list)  # per node (process) or total / N (inprocess)
    uss_mib: list[float] = field(default_factory=list)
    peak_rss_mib: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "mode": self.mode,
            "bootstrap_s": self.bootstrap_s,
            "start_med_ms": percentile(self.start_s, 50) * 1e3,
            "start_p95_ms": percentile(self.start_s, 95) * 1e3,
            "store_med_ms": percentile(self.store_s, 50) * 1e3,
            "store_p95_ms": percentile(self.store_s, 95) * 1e3,
            "store_min_ms": min(self.store_s, default=math.nan) * 1e3,
            "store_max_ms": max(self.store_s, default=math.nan) * 1e3,
            "get_med_ms": percentile(self.get_s, 50) * 1e3,
            "get_p95_ms": percentile(self.get_s, 95) * 1e3,
            "get_min_ms": min(self.get_s, default=math.nan) * 1e3,
            "get_max_ms": max(self.get_s, default=math.nan) * 1e3,
            "store_ok": self.store_ok,
            "get_ok": self.get_ok,
            "get_found": self.get_found,
            "ops": self.ops,
            "rss_med_mib": percentile(self.rss_mib, 50),
            "rss_max_mib": max(self.rss_mib, default=math.nan),
            "uss_med_mib": percentile(self.uss_mib, 50),
            "uss_max_mib": max(self.uss_mib, default=math.nan),
            "peak_rss_max_mib": max(self.peak_rss_mib, default=math.nan),
            **self.extra,
        }


def make_workload(rng: random.Random, n: int, ops: int) -> list[tuple[str, str, int, int]]:
    """(key, value, storing node, getting node) for each op; the getter differs from the storer."""
    work = []
    for i in range(ops):
        storer = rng.randrange(n)
        getter = rng.randrange(n - 1)
        getter += getter >= storer
        work.append((random_string(rng, f"key{i}-"), random_string(rng, "value-", 24), storer, getter))
    return work


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- process mode --------------------------------------------------------------------------


def run_process_mode(n: int, ops: int, rng: random.Random, timeout: float, profile_dir: str | None) -> RunResult:
    result = RunResult(n=n, mode="process", ops=ops)
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if profile_dir:
        env["BENCH_DHT_PROFILE_DIR"] = profile_dir
    workers: list[Worker] = []
    maddrs: list[list[str]] = []
    spawn_s: list[float] = []
    import_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench_dht_") as log_dir:
        try:
            t_all = time.perf_counter()
            for i in range(n):
                t = time.perf_counter()
                worker = Worker(i, log_dir, env)
                workers.append(worker)
                hello = worker.read(timeout)
                spawn_s.append(time.perf_counter() - t)
                import_s.append(hello["import_s"])
                if hello["torch"]:
                    raise WorkerError(f"worker {i} imported torch")
                peers = rng.choice(maddrs) if maddrs else []
                answer = worker.request({"op": "start", "peers": peers, "profile": bool(profile_dir)}, timeout)
                result.start_s.append(answer["start_s"])
                maddrs.append(answer["maddrs"])
                if (i + 1) % 32 == 0 and i + 1 < n:
                    progress(f"  process N={n}: {i + 1} nodes up after {time.perf_counter() - t_all:.1f} s")
            result.bootstrap_s = time.perf_counter() - t_all
            progress(f"  process N={n}: all up in {result.bootstrap_s:.1f} s; running {ops} stores + {ops} gets")

            work = make_workload(rng, n, ops)
            for key, value, storer, _ in work:
                answer = workers[storer].request({"op": "store", "key": key, "value": value, "ttl": TTL_S}, timeout)
                result.store_s.append(answer["t"])
                result.store_ok += answer["ok"]
            for key, value, _, getter in work:
                answer = workers[getter].request({"op": "get", "key": key, "value": value}, timeout)
                result.get_s.append(answer["t"])
                result.get_ok += answer["ok"]
                result.get_found += answer["found"]

            fds, threads = [], []
            for worker in workers:
                mem = worker.request({"op": "mem"}, timeout)
                if mem["torch"]:
                    raise WorkerError(f"worker {worker.index} imported torch")
                result.rss_mib.append(mem["rss"] / MIB)
                result.uss_mib.append(mem["uss"] / MIB)
                result.peak_rss_mib.append(mem["peak_rss"] / MIB)
                fds.append(mem["fds"])
                threads.append(mem["threads"])
            result.extra.update(
                {
                    "spawn_med_ms": percentile(spawn_s, 50) * 1e3,
                    "import_med_ms": percentile(import_s, 50) * 1e3,
                    "start_sum_s": sum(result.start_s),
                    "worker_fds_max": max(fds),
                    "worker_threads_max": max(threads),
                }
            )
        finally:
            stop_workers(workers)
    return result


# ---- in-process mode -----------------------------------------------------------------------


@dataclass(frozen=True)
class InprocessVariant:
    """How an in-process run departs from the defaults (only the --big run uses anything else)."""

    transport: str = "tcp"  # or "memory": hivecli's MemoryTransport, no sockets
    idle_timeout: float | None = None  # NetSettings.idle_timeout; None keeps the default
    refresh_period: float | None = None  # DHTSettings.refresh_period; None keeps the default

    @property
    def label(self) -> str:
        label = "inprocess" if self.transport == "tcp" else f"inprocess-{self.transport}"
        if self.idle_timeout is not None:
            label += f"-idle{self.idle_timeout:g}s"
        if self.refresh_period is not None:
            label += f"-refresh{self.refresh_period:g}s"
        return label


async def _run_inprocess(n: int, ops: int, rng: random.Random, timeout: float, variant: InprocessVariant) -> RunResult:
    import psutil

    from hivecli import DHTSettings, NetSettings, get_dht_time
    from hivecli.dht.node import DHTNode
    from hivecli.net.host import Host
    from hivecli.net.multiaddr import Multiaddr
    from hivecli.net.transport import MemoryTransport

    label = variant.label
    result = RunResult(n=n, mode=label, ops=ops)
    network = MemoryTransport.Network()
    net_settings = NetSettings() if variant.idle_timeout is None else NetSettings(idle_timeout=variant.idle_timeout)
    settings = DHTSettings() if variant.refresh_period is None else DHTSettings(refresh_period=variant.refresh_period)

    def new_host() -> Host:
        memory = variant.transport == "memory"
        return Host(transport=MemoryTransport(network) if memory else None, settings=net_settings)

    loop_errors: dict[str, int] = {}

    def on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # Count what the loop would log (e.g. EMFILE on accept, never-retrieved task exceptions); show the first.
        exc = context.get("exception")
        key = str(context.get("message")).split("(")[0] + (f" ({type(exc).__name__}: {str(exc)[:80]})" if exc else "")
        loop_errors[key] = loop_errors.get(key, 0) + 1
        if loop_errors[key] == 1:
            loop.default_exception_handler(context)

    asyncio.get_running_loop().set_exception_handler(on_loop_error)
    result.extra["loop_errors"] = loop_errors
    result.extra["event_loop"] = type(asyncio.get_running_loop()).__module__.split(".")[0]
    proc = psutil.Process()
    base = proc.memory_full_info()
    base_fds = open_fds()
    # Hold a few descriptors back, so that the measurements at the end still work if the nodes use up
    # RLIMIT_NOFILE (reading /proc needs a descriptor).
    reserve = [os.open(os.devnull, os.O_RDONLY) for _ in range(16)]
    listen = [Multiaddr.parse(LISTEN_MADDR)]
    nodes: list[Any] = []
    try:
        t_all = time.perf_counter()
        for i in range(n):
            initial = rng.choice(nodes).host.visible_maddrs() if nodes else []
            t = time.perf_counter()
            try:
                create = DHTNode.create(new_host(), initial_peers=initial, host_maddrs=listen, settings=settings)
                node = await asyncio.wait_for(create, timeout)
            except Exception as e:
                soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
                fds = open_fds()
                raise RunFailed(
                    f"node {i} failed to start after {len(nodes)} nodes were up in "
                    f"{time.perf_counter() - t_all:.1f} s ({fds if fds >= 0 else 'all'} fds open, "
                    f"RLIMIT_NOFILE soft limit {soft}): {type(e).__name__}: {e}"
                ) from e
            result.start_s.append(time.perf_counter() - t)
            nodes.append(node)
            if (i + 1) % 128 == 0 and i + 1 < n:
                progress(f"  {label} N={n}: {i + 1} nodes up after {time.perf_counter() - t_all:.1f} s")
        result.bootstrap_s = time.perf_counter() - t_all
        progress(f"  {label} N={n}: all up in {result.bootstrap_s:.1f} s; running {ops} stores + {ops} gets")

        work = make_workload(rng, n, ops)
        for key, value, storer, _ in work:
            expiration = get_dht_time() + TTL_S
            t = time.perf_counter()
            ok = await asyncio.wait_for(nodes[storer].store(key, value, expiration), timeout)
            result.store_s.append(time.perf_counter() - t)
            result.store_ok += bool(ok)
        for key, value, _, getter in work:
            t = time.perf_counter()
            found = await asyncio.wait_for(nodes[getter].get(key), timeout)
            result.get_s.append(time.perf_counter() - t)
            result.get_found += found is not None
            result.get_ok += found is not None and found.value == value

        for fd in reserve:
            os.close(fd)
        reserve.clear()
        fds_used = open_fds() - base_fds
        mem = proc.memory_full_info()
        peak = max(mem.rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        result.rss_mib = [mem.rss / MIB / n]
        result.uss_mib = [(mem.uss - base.uss) / MIB / n]
        result.peak_rss_mib = [peak / MIB / n]
        result.extra.update(
            {
                "process_rss_mib": mem.rss / MIB,
                "process_uss_mib": mem.uss / MIB,
                "rss_growth_per_node_mib": (mem.rss - base.rss) / MIB / n,
                "fds_used": fds_used,
                "fd_limit_hit": any("Too many open files" in key for key in loop_errors),
                "connections": sum(len(node.host.open_connections()) for node in nodes),
                "routing_table_med": percentile([float(len(node.protocol.routing_table)) for node in nodes], 50),
            }
        )
    finally:
        for fd in reserve:
            os.close(fd)
        t = time.perf_counter()
        await asyncio.gather(*(node.shutdown() for node in nodes), return_exceptions=True)
        result.extra["shutdown_s"] = time.perf_counter() - t
    return result


def run_on_library_loop(coro: Any) -> Any:
    """Run `coro` to completion on the kind of event loop hivecli's DHT threads use (uvloop where
    installed, unless HIVE_EVENT_LOOP=asyncio), then cancel whatever is left and close the loop."""
    try:
        from hivecli.utils.loops import new_event_loop
    except ImportError:  # older hivecli: plain asyncio
        new_event_loop = asyncio.new_event_loop
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(coro)
    finally:
        try:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def run_inprocess_mode(
    n: int,
    ops: int,
    rng: random.Random,
    timeout: float,
    profile_dir: str | None,
    variant: InprocessVariant = InprocessVariant(),  # frozen, so sharing the default is safe
) -> RunResult:
    if not profile_dir:
        return run_on_library_loop(_run_inprocess(n, ops, rng, timeout, variant))
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        return run_on_library_loop(_run_inprocess(n, ops, rng, timeout, variant))
    finally:
        profiler.disable()
        profiler.dump_stats(os.path.join(profile_dir, f"{variant.label}-{n}.prof"))


def inprocess_child_main(spec_json: str) -> None:
    """Run one in-process measurement in this (fresh) process; print the RunResult as JSON."""
    raise_nofile_limit()
    out_fd = os.dup(1)
    os.dup2(2, 1)  # keep stdout for the result only
    spec = json.loads(spec_json)
    variant = InprocessVariant(**spec["variant"])
    try:
        result = run_inprocess_mode(
            spec["n"], spec["ops"], random.Random(spec["seed"]), spec["timeout"], spec["profile_dir"], variant
        )
        answer: dict[str, Any] = {"result": asdict(result)}
    except Exception as e:
        answer = {"error": str(e) if isinstance(e, RunFailed) else f"{type(e).__name__}: {e}"}
    os.write(out_fd, (json.dumps(answer) + "\n").encode())


def run_inprocess_isolated(
    n: int, ops: int, seed: str, timeout: float, profile_dir: str | None, variant: InprocessVariant
) -> RunResult:
    """`run_inprocess_mode` in a child process of its own, so that memory figures start from a clean
    interpreter and nothing (sockets, tasks, heap) carries over from one run to the next."""
    spec = {
        "n": n,
        "ops": ops,
        "seed": seed,
        "timeout": timeout,
        "profile_dir": profile_dir,
        "variant": asdict(variant),
    }
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, os.path.abspath(__file__), "--inprocess-child", json.dumps(spec)]
    child = subprocess.run(cmd, stdout=subprocess.PIPE, env=env, timeout=max(600.0, 4 * timeout + n * timeout / 10))
    lines = child.stdout.decode(errors="replace").strip().splitlines()
    if not lines:
        raise RunFailed(f"the in-process child exited with rc {child.returncode} and no result")
    answer = json.loads(lines[-1])
    if "error" in answer:
        raise RunFailed(answer["error"])
    return RunResult(**answer["result"])


# ---- reporting -----------------------------------------------------------------------------


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown-style table (fixed layout, whatever the terminal width)."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def display_mode(r: RunResult) -> str:
    return r.mode + (" [fd limit hit]" if r.extra.get("fd_limit_hit") else "")


def spread(summary: dict[str, Any], op: str) -> str:
    """'median / p95 (min-max)' of an op's latencies in ms."""
    med, p95, lo, hi = (fmt(summary[f"{op}_{stat}_ms"]) for stat in ("med", "p95", "min", "max"))
    return f"{med} / {p95} ({lo}-{hi})"


def results_table(results: list[RunResult]) -> str:
    headers = [
        "N",
        "mode",
        "bootstrap all (s)",
        "node start ms med / p95",
        "store ms med / p95 (min-max)",
        "get ms med / p95 (min-max)",
        "success store / get",
        "RSS MiB/node med / max",
        "USS MiB/node med / max",
    ]
    rows = []
    for r in results:
        s = r.summary()
        shared = r.mode != "process"
        rows.append(
            [
                str(r.n),
                display_mode(r),
                fmt(s["bootstrap_s"]),
                f"{fmt(s['start_med_ms'], 1)} / {fmt(s['start_p95_ms'], 1)}",
                spread(s, "store"),
                spread(s, "get"),
                f"{r.store_ok}/{r.ops}, {r.get_ok}/{r.ops}",
                f"{fmt(s['rss_med_mib'], 1)} (total/N)"
                if shared
                else f"{fmt(s['rss_med_mib'], 1)} / {fmt(s['rss_max_mib'], 1)}",
                f"{fmt(s['uss_med_mib'], 2)} (growth/N)"
                if shared
                else f"{fmt(s['uss_med_mib'], 1)} / {fmt(s['uss_max_mib'], 1)}",
            ]
        )
    return format_table(headers, rows)


def extras_table(results: list[RunResult]) -> str:
    rows = []
    for r in results:
        e = r.extra
        if r.mode == "process":
            detail = (
                f"launch+import med {fmt(e['spawn_med_ms'], 0)} ms (import {fmt(e['import_med_ms'], 0)} ms), "
                f"sum of DHT starts {fmt(e['start_sum_s'])} s, peak RSS max {fmt(max(r.peak_rss_mib), 1)} MiB, "
                f"fds max {e['worker_fds_max']}, threads max {e['worker_threads_max']}"
            )
        else:
            detail = (
                f"process RSS {fmt(e['process_rss_mib'], 0)} MiB, USS {fmt(e['process_uss_mib'], 0)} MiB, "
                f"RSS growth/N {fmt(e['rss_growth_per_node_mib'], 2)} MiB, fds {e['fds_used']}, "
                f"connections {e['connections']}, routing table med {fmt(e['routing_table_med'], 0)}, "
                f"shutdown {fmt(e['shutdown_s'])} s, loop {e.get('event_loop', '?')}"
            )
            errors = e.get("loop_errors") or {}
            if errors:
                detail += "; loop errors: " + "; ".join(f"{count}x {what}" for what, count in errors.items())
        rows.append([str(r.n), display_mode(r), f"{r.get_found}/{r.ops}", detail])
    return format_table(["N", "mode", "gets found", "details"], rows)


def comparison_table(results: list[RunResult]) -> str:
    rows = []
    for r in results:
        ref = HIVEMIND_REFERENCE.get((r.mode, r.n))
        if ref is None:
            continue
        s = r.summary()
        pairs = [
            ("bootstrap all (s)", s["bootstrap_s"], ref["bootstrap_s"], 2),
            ("node start median (ms)", s["start_med_ms"], ref["start_med_s"] * 1e3, 1),
            ("node start p95 (ms)", s["start_p95_ms"], ref["start_p95_s"] * 1e3, 1),
            ("store median (ms)", s["store_med_ms"], ref["store_med_ms"], 2),
            ("store p95 (ms)", s["store_p95_ms"], ref["store_p95_ms"], 2),
            ("get median (ms)", s["get_med_ms"], ref["get_med_ms"], 2),
            ("get p95 (ms)", s["get_p95_ms"], ref["get_p95_ms"], 2),
        ]
        if r.mode == "process":
            pairs += [
                ("RSS/node max (MiB) [hm: DHT peak+p2pd]", max(r.peak_rss_mib), HIVEMIND_MEMORY_MIB["rss"], 1),
                ("USS/node max (MiB) [hm: DHT+p2pd]", s["uss_max_mib"], HIVEMIND_MEMORY_MIB["uss"], 1),
            ]
        for name, ours, theirs, digits in pairs:
            rows.append([str(r.n), r.mode, name, fmt(ours, digits), fmt(theirs, digits), fmt(ours / theirs, 3)])
    if not rows:
        return "(no run matches a hivemind reference row: N must be 16 or 64)"
    return format_table(["N", "mode", "figure", "ours", "hivemind reference (baselines.md)", "ours/hivemind"], rows)


def targets_table(results: list[RunResult]) -> tuple[str, bool]:
    rows = []
    all_pass = True

    def check(what: str, value: float, limit: float, unit: str, mode: str) -> None:
        nonlocal all_pass
        ok = not math.isnan(value) and value <= limit
        all_pass &= ok
        rows.append([mode, what, f"{fmt(value)} {unit}", f"<= {limit:g} {unit}", "PASS" if ok else "FAIL"])

    at_target = [r for r in results if r.n == TARGET_N]
    for r in at_target:
        s = r.summary()
        check(f"store median @ {TARGET_N}", s["store_med_ms"], TARGET_STORE_MED_MS, "ms", r.mode)
        check(f"get median @ {TARGET_N}", s["get_med_ms"], TARGET_GET_MED_MS, "ms", r.mode)
        check(f"node start median @ {TARGET_N}", s["start_med_ms"], TARGET_START_MED_MS, "ms", r.mode)
        if r.mode == "process":
            check(f"RSS per node process, max @ {TARGET_N}", s["rss_max_mib"], TARGET_RSS_MIB, "MiB", r.mode)
            check(f"peak RSS per node process, max @ {TARGET_N}", max(r.peak_rss_mib), TARGET_RSS_MIB, "MiB", r.mode)
    if not at_target:
        rows.append(["-", f"latency / start / memory targets need a {TARGET_N}-node run", "-", "-", "n/a"])
    for r in results:
        ok = r.store_ok == r.ops and r.get_ok == r.ops
        all_pass &= ok
        rows.append(
            [
                display_mode(r),
                f"100% success, N={r.n}",
                f"{r.store_ok}/{r.ops}, {r.get_ok}/{r.ops}",
                "all",
                "PASS" if ok else "FAIL",
            ]
        )
    return format_table(["mode", "target", "measured", "target", "result"], rows), all_pass


# ---- main ----------------------------------------------------------------------------------


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", REPO_ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return rev or "(unknown revision)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[16, 64, 256], help="swarm sizes (default 16 64 256)")
    parser.add_argument("--mode", choices=["process", "inprocess", "both"], default="both")
    parser.add_argument("--ops", type=int, default=200, help="stores, and then gets, per run (default 200)")
    parser.add_argument(
        "--big", type=int, default=1024, help="nodes of one extra in-process run (default 1024; 0 skips it)"
    )
    parser.add_argument(
        "--big-transport",
        choices=["tcp", "memory"],
        default="tcp",
        help="transport of the --big run: real TCP on 127.0.0.1 (default) or hivecli's MemoryTransport",
    )
    parser.add_argument(
        "--big-idle-timeout",
        type=float,
        default=5.0,
        help="NetSettings.idle_timeout of the --big run (default 5 s): a few seconds keeps the "
        "number of open sockets, 2 per connection in one process, under RLIMIT_NOFILE",
    )
    parser.add_argument(
        "--big-refresh-period",
        type=float,
        default=600.0,
        help="DHTSettings.refresh_period of the --big run (default 600 s): N nodes share one core "
        "here, which cannot carry N nodes' maintenance every 30 s (hivemind's default is no refresh at all)",
    )
    parser.add_argument(
        "--no-fallback",
        dest="fallback",
        action="store_false",
        help="if an in-process run fails or runs out of file descriptors, do not repeat it with "
        "idle timeout 5 s and refresh period 3600 s",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed for any single step")
    parser.add_argument(
        "--nofile",
        type=int,
        default=None,
        help="try to raise the hard RLIMIT_NOFILE to this (needs privilege); "
        "by default only the soft limit is raised to the hard one",
    )
    parser.add_argument("--profile", metavar="DIR", help="write cProfile stats of workers / in-process runs here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--inprocess-child", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if any(n < 2 for n in args.nodes) or (args.big and args.big < 2):
        parser.error("every swarm needs at least 2 nodes (gets come from a node other than the storer)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main()
        return 0
    if args.inprocess_child:
        inprocess_child_main(args.inprocess_child)
        return 0
    sys.path.insert(0, REPO_ROOT)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up the workers on kill, as on Ctrl+C
    soft, hard = raise_nofile_limit(args.nofile)
    print(
        f"hivecli {git_revision()}; RLIMIT_NOFILE soft/hard {soft}/{hard}; {os.cpu_count()} cpus; "
        f"python {sys.version.split()[0]}"
    )
    if args.big and args.big_transport == "tcp" and soft != resource.RLIM_INFINITY and soft < 80 * args.big:
        print(
            f"note: with the default idle timeout an in-process TCP run needs 60-80 file descriptors per node "
            f"(2 per connection), about {80 * args.big} for --big {args.big}; the limit is {soft}. "
            f"Raising the hard limit (--nofile) needs CAP_SYS_RESOURCE."
        )
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    modes = ["process", "inprocess"] if args.mode == "both" else [args.mode]
    plan: list[tuple[str, int, InprocessVariant | None]] = [(mode, n, None) for mode in modes for n in args.nodes]
    big_variant = InprocessVariant(args.big_transport, args.big_idle_timeout, args.big_refresh_period)

    def fallback_of(variant: InprocessVariant) -> InprocessVariant:
        return InprocessVariant(
            variant.transport,
            5.0 if variant.transport == "tcp" and variant.idle_timeout is None else variant.idle_timeout,
            3600.0 if variant.refresh_period is None else variant.refresh_period,
        )

    if args.big:
        plan.append(("inprocess", args.big, big_variant))

    results: list[RunResult] = []
    failures: list[str] = []
    t_total = time.perf_counter()
    try:
        while plan:
            mode, n, variant = plan.pop(0)
            label = variant.label if variant is not None else mode
            seed = f"{args.seed}-{mode}-{n}"
            progress(f"[{time.perf_counter() - t_total:7.1f} s] {label} N={n} ...")
            t = time.perf_counter()
            try:
                if mode == "process":
                    result = run_process_mode(n, args.ops, random.Random(seed), args.timeout, args.profile)
                else:
                    variant = variant or InprocessVariant()
                    result = run_inprocess_isolated(n, args.ops, seed, args.timeout, args.profile, variant)
            except Exception as e:  # record the failure, go on with the other runs
                failures.append(f"{label} N={n}: {type(e).__name__}: {e}")
                progress(f"  FAILED: {failures[-1]}")
                result = None
            if result is not None:
                result.extra["run_wall_s"] = time.perf_counter() - t
                results.append(result)
                progress(f"  done in {result.extra['run_wall_s']:.1f} s")
            if mode == "inprocess" and (result is None or result.extra.get("fd_limit_hit")):
                assert variant is not None
                if args.fallback and fallback_of(variant) != variant:
                    why = "failed" if result is None else "ran out of file descriptors"
                    progress(f"  the run {why}; repeating it as {fallback_of(variant).label}")
                    plan.insert(0, ("inprocess", n, fallback_of(variant)))
    except KeyboardInterrupt:
        print("interrupted; every worker has been stopped", file=sys.stderr)
        return 130
    total_s = time.perf_counter() - t_total

    for mode in ("process", "inprocess"):
        mine = [r for r in results if r.mode.startswith(mode)]
        if mine:
            print(f"\n== DHT, mode {mode}: {args.ops} stores then {args.ops} gets, one at a time ==")
            print(results_table(mine))
            print(extras_table(mine))
    print("\n== Comparison with hivemind 1.1.12 (hivemind reference (baselines.md)) ==")
    print(comparison_table(results))
    table, all_pass = targets_table(results)
    print("\n== Targets ==")
    print(table)
    for failure in failures:
        print(f"\nFAILED RUN: {failure}")
    print(f"\ntotal benchmark time: {total_s:.1f} s")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "total_s": total_s,
                    "failures": failures,
                    "all_targets_pass": all_pass,
                    "summaries": [r.summary() for r in results],
                    "raw": [asdict(r) for r in results],
                },
                f,
                indent=1,
                default=str,
            )
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
