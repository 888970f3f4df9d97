"""DecentralizedOptimizer benchmark: training speed overhead and convergence.

Speed: steps/s of the quick-start CNN (3 x 32 x 32 input, batch 256, SGD lr 0.001 momentum
0.9) on the offline digits data resized to 32 x 32, measured over `--seconds` after a warm-up.
Each configuration runs in fresh processes, `--reps` times interleaved with the others (the
table shows medians), and is compared with plain torch running the same
number of processes at once (on 2 cores, two trainers share the CPU, so plain torch with two
processes is the fair reference for two peers):

* plain torch, 1 process            vs  DecentralizedOptimizer alone (rounds find nobody)
* plain torch, 2 processes at once  vs  2 peers averaging parameters every step

Every process gets cores // processes intra-op threads. overhead = 1 - ours / plain.

Convergence: N = 1, 2, 4 peers, each `--steps` steps from the same initialisation on its own
shuffle of the digits training split, averaging every step in the background (target group
size N). Test accuracy on the held-out split (360 images) every `--eval-every` steps,
averaged over the peers; the table shows the curve per N.

Run from the repository root:

    .venv/bin/python benchmarks/bench_optimizer.py                 # about 4 minutes
    .venv/bin/python benchmarks/bench_optimizer.py --seconds 10 --steps 200
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from _swarm import WorkerProcess  # noqa: E402  (benchmarks/, the script's own folder)

BATCH = 256


def _model() -> Any:
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(3, 16, (5, 5)), nn.MaxPool2d(2, 2), nn.ReLU(),
        nn.Conv2d(16, 32, (5, 5)), nn.MaxPool2d(2, 2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 5 * 5, 10),
    )  # fmt: skip


def _setup(rank: int, procs: int, averaging: bool, world: int, addr_q: Any) -> Any:
    """Model, optimizer (wrapped when averaging), DHT; the caller shuts them down."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // procs))
    torch.manual_seed(0)  # every peer starts from the same model, as after load_state_from_peers
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    dht = None
    if averaging:
        from _swarm import join_swarm

        from hivecli.optim import DecentralizedOptimizer

        dht = join_swarm(rank, world, addr_q)
        opt = DecentralizedOptimizer(opt, dht, prefix="bench-opt", target_group_size=max(2, world))
    return model, opt, dht


def _batches(rank: int) -> tuple[list[Any], Any]:
    import torch

    from hivecli.datasets import load_digits

    train, test = load_digits(image_size=32, channels=3)
    x, y = train.tensors
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(100 + rank))
    x, y = x[order], y[order]
    batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(y) - BATCH + 1, BATCH)]
    return batches, test.tensors


def _train_step(model: Any, opt: Any, batch: Any) -> float:
    import torch.nn.functional as F

    opt.zero_grad()
    loss = F.cross_entropy(model(batch[0]), batch[1])
    loss.backward()
    opt.step()
    return loss.item()


def _speed_worker(rank: int, procs: int, averaging: bool, seconds: float, warmup: float, addr_q, barrier, out) -> None:
    model, opt, dht = _setup(rank, procs, averaging, procs if averaging else 1, addr_q)
    batches, _ = _batches(rank)
    barrier.wait(timeout=120)
    i, start = 0, time.perf_counter()
    while time.perf_counter() - start < warmup:
        _train_step(model, opt, batches[i % len(batches)])
        i += 1
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _train_step(model, opt, batches[(i + steps) % len(batches)])
        steps += 1
    elapsed = time.perf_counter() - start
    rounds = getattr(opt, "rounds_finished", 0)
    barrier.wait(timeout=120)  # nobody leaves while another is still measuring with it
    out.put((rank, steps / elapsed, rounds))
    if dht is not None:
        opt.shutdown()
        dht.shutdown()


def _accuracy(model: Any, test: Any) -> float:
    import torch

    with torch.no_grad():
        return (model(test[0]).argmax(1) == test[1]).float().mean().item()


def _converge_worker(rank: int, world: int, steps: int, every: int, addr_q, barrier, out) -> None:
    model, opt, dht = _setup(rank, world, world > 1, world, addr_q)
    batches, test = _batches(rank)
    barrier.wait(timeout=120)
    curve = []
    for step in range(1, steps + 1):
        _train_step(model, opt, batches[step % len(batches)])
        if step % every == 0:
            curve.append(_accuracy(model, test))
    rounds = getattr(opt, "rounds_finished", 0)
    barrier.wait(timeout=600)
    out.put((rank, curve, rounds))
    if dht is not None:
        opt.shutdown()
        dht.shutdown()


def _run(target: Any, n: int, *args: Any) -> list[Any]:
    ctx = mp.get_context("spawn")
    out, addr_q, barrier = ctx.Queue(), ctx.Queue(), ctx.Barrier(n)
    procs = [WorkerProcess(target=target, args=(r, n, *args, addr_q, barrier, out)) for r in range(n)]
    for p in procs:
        p.start()
    try:
        return sorted(out.get(timeout=900) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per speed run")
    parser.add_argument("--reps", type=int, default=3, help="runs per speed configuration (median reported)")
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=300, help="steps per peer in the convergence runs")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--peers", type=int, nargs="+", default=[1, 2, 4], help="convergence runs")
    args = parser.parse_args()

    configs = [
        ("plain torch, 1 process", 1, False),
        ("DecentralizedOptimizer alone", 1, True),
        ("plain torch, 2 processes", 2, False),
        ("DecentralizedOptimizer, 2 peers", 2, True),
    ]
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in configs}
    for rep in range(args.reps):  # interleaved, so that drifts in machine speed hit every configuration alike
        for label, procs, averaging in configs:
            results = _run(_speed_worker, procs, averaging, args.seconds, args.warmup)
            samples[label].append((statistics.mean(r[1] for r in results), sum(r[2] for r in results) / len(results)))
            print(
                f"  rep {rep + 1}: {label}: {samples[label][-1][0]:.2f} steps/s per process",
                file=sys.stderr,
                flush=True,
            )
    speed = {
        label: (statistics.median(x[0] for x in runs), statistics.median(x[1] for x in runs))
        for label, runs in samples.items()
    }

    print(
        f"\nSpeed: quick-start CNN, batch {BATCH}, averaging every step; median of {args.reps} interleaved "
        f"runs of {args.seconds:g} s"
    )
    print("| configuration | steps/s per process | rounds per peer | vs plain torch | overhead |")
    print("| --- | --- | --- | --- | --- |")
    for label, reference in [
        ("plain torch, 1 process", None),
        ("DecentralizedOptimizer alone", "plain torch, 1 process"),
        ("plain torch, 2 processes", None),
        ("DecentralizedOptimizer, 2 peers", "plain torch, 2 processes"),
    ]:
        rate, rounds = speed[label]
        if reference is None:
            print(f"| {label} | {rate:.2f} | - | 1.00x | - |")
        else:
            ratio = rate / speed[reference][0]
            print(f"| {label} | {rate:.2f} | {rounds:.0f} | {ratio:.2f}x | {100 * (1 - ratio):.1f}% |")

    curves = {}
    for n in args.peers:
        results = _run(_converge_worker, n, args.steps, args.eval_every)
        curves[n] = ([statistics.mean(r[1][i] for r in results) for i in range(len(results[0][1]))], results)
        print(f"  converged N={n}", file=sys.stderr, flush=True)
    print(f"\nConvergence: digits test accuracy (mean over peers), {args.steps} steps per peer, batch {BATCH}")
    print("| step | " + " | ".join(f"N={n}" for n in args.peers) + " |")
    print("| --- |" + " --- |" * len(args.peers))
    for i in range(args.steps // args.eval_every):
        row = " | ".join(f"{curves[n][0][i]:.3f}" for n in args.peers)
        print(f"| {(i + 1) * args.eval_every} | {row} |")
    rounds = " | ".join(f"{statistics.mean(r[2] for r in curves[n][1]):.0f}" for n in args.peers)
    print(f"| rounds per peer | {rounds} |")
    if 1 in curves:
        single = curves[1][0][-1]
        for n in args.peers:
            if n > 1:
                verdict = "PASS" if curves[n][0][-1] >= single else "FAIL"
                print(f"N={n} final accuracy {curves[n][0][-1]:.3f} vs one peer {single:.3f}: {verdict}")


if __name__ == "__main__":
    main()
