"""Training modes compared on the same task: torch DDP, DecentralizedOptimizer, Optimizer, DiLoCo.

The task is the default recipe's (recipes/default.toml: the quick-start CNN on the offline digits
resized to 3 x 32 x 32, batch 16 per peer, SGD lr 0.01 momentum 0.9 weight decay 5e-4, warm-up
then cosine over the budget). 4 peers, one process each (spawned), torch.set_num_threads(1).
Every mode starts from the same model (the recipe's seed), and peer r sees the same batches in
every mode: shard r of a fixed permutation of the training split, reshuffled each pass.
Each peer processes --samples-per-peer samples, then:

* ddp: torch DistributedDataParallel, gloo over tcp://127.0.0.1 (global batch 4 x 16);
* decentralized: `DecentralizedOptimizer` (averaging.mode = "parameters"): parameters averaged
  in the background, a round every step;
* optimizer: `Optimizer` (averaging.mode = "collaborative"), use_local_updates=False,
  target_batch_size 4 x 16: gradients averaged once per epoch, then the same step on every peer;
* diloco: `DiLoCoOptimizer` (averaging.mode = "diloco"), --local-steps (H) inner steps of the
  recipe's SGD, then an outer SGD step (lr 0.7, momentum 0.9, Nesterov) on the averaged
  pseudo-gradients.

The hive optimizers are built as `hive start` builds them (hivecli.training.build_run_optimizer)
from the default recipe with averaging.mode set: groups of target size 4, minimum 2, matchmaking
time 2 s and request timeout 1 s (--matchmaking-time overrides). Each hive peer starts its own
DHT on 127.0.0.1 (port 0); peers 1-3 join through peer 0's visible maddrs. The learning-rate
schedule follows each mode's optimizer step (DDP's step, the Optimizer's epoch, which all its
peers share, the local or inner step otherwise) over the budget's nominal steps.

Measured per mode: test accuracy (359 held-out digits; mean over the peers) after each fifth of
the budget, the final accuracy (decentralized: after one last averaging round, as `hive start`
does) with the peers' min-max spread, wall time (slowest peer, from the barrier after setup to
the end of training, evaluations included), and bytes sent per peer (mean). Hive bytes are
counted inside each process: every byte it hands to a TCP socket (hivecli.net.tcp._TCPStream.write:
DHT, tracker, matchmaking and all-reduce, encryption and framing included, TCP/IP headers not).
DDP bytes are the ring all-reduce volume, 2 * (n - 1) / n * model bytes per step per process
(a formula: loopback counters are shared with every other process on the machine). The 4 peer
processes are started once and train every mode in turn.

Run from the repository root:

    .venv/bin/python benchmarks/bench_modes.py              # about 4-5 minutes on 2 cores
    .venv/bin/python benchmarks/bench_modes.py --quick      # about 1-2 minutes
    .venv/bin/python benchmarks/bench_modes.py --modes ddp diloco --samples-per-peer 4000 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import socket
import statistics
import sys
import threading
import time
import traceback
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from _swarm import WorkerProcess  # noqa: E402  (benchmarks/, the script's own folder)

PEERS = 4
CHECKPOINTS = 5
MODES = ("ddp", "decentralized", "optimizer", "diloco")
HIVE_MODES = {"decentralized": "parameters", "optimizer": "collaborative", "diloco": "diloco"}
LABELS = {
    "ddp": "torch DDP (gloo)",
    "decentralized": "DecentralizedOptimizer",
    "optimizer": "Optimizer",
    "diloco": "DiLoCoOptimizer",
}


def _recipe(mode: str, local_steps: int, matchmaking_time: float | None) -> Any:
    """The default recipe with `mode`'s averaging.mode (and the benchmark's overrides)."""
    from hivecli.recipe import load_recipe

    overrides = [f"averaging.mode={HIVE_MODES.get(mode, 'parameters')}", f"averaging.local_steps={local_steps}"]
    if matchmaking_time is not None:
        overrides += [f"averaging.min_matchmaking_time={matchmaking_time}",
                      f"averaging.request_timeout={min(1.0, matchmaking_time / 2)}"]  # fmt: skip
    return load_recipe(os.path.join(REPO_ROOT, "recipes", "default.toml"), overrides, env={})  # no HIVE_* variables


def _count_sent_bytes() -> list[int]:
    """Count every byte this process hands to a hivecli TCP stream; returns the live counter."""
    from hivecli.net import tcp

    counter, lock, original = [0], threading.Lock(), tcp._TCPStream.write

    def write(self: Any, data: Any) -> None:
        original(self, data)
        with lock:
            counter[0] += memoryview(data).nbytes

    tcp._TCPStream.write = write  # type: ignore[method-assign]
    return counter


def _batches(train: Any, rank: int, batch: int, steps: int) -> Any:
    """Peer `rank`'s batches: its shard of a fixed permutation, reshuffled each pass (same in every mode)."""
    import torch

    x, y = train.tensors
    shard = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[rank::PEERS]
    done, passes = 0, 0
    while True:
        order = shard[torch.randperm(len(shard), generator=torch.Generator().manual_seed(1000 * rank + passes))]
        for i in range(0, len(order) - batch + 1, batch):
            if done == steps:
                return
            yield x[order[i : i + batch]], y[order[i : i + batch]]
            done += 1
        passes += 1


def _accuracy(model: Any, test: Any) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        correct = (model(test.tensors[0]).argmax(1) == test.tensors[1]).sum().item()
    model.train()
    return correct / len(test.tensors[1])


def _build(mode: str, rank: int, cfg: dict[str, Any], model: Any, base_opt: Any, addr_q: Any) -> tuple[Any, Any, Any]:
    """The module to train, the optimizer to step, and the DHT (None for DDP)."""
    if mode == "ddp":
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        url, limit = f"tcp://127.0.0.1:{cfg['port']}", datetime.timedelta(seconds=120)
        dist.init_process_group("gloo", init_method=url, rank=rank, world_size=PEERS, timeout=limit)
        return DistributedDataParallel(model), base_opt, None
    from _swarm import join_swarm

    from hivecli.training import build_run_optimizer

    dht = join_swarm(rank, PEERS, addr_q)
    return model, build_run_optimizer(cfg["recipes"][mode], base_opt, model, dht, cfg["prefix"]), dht


def _worker(rank: int, cfg: dict[str, Any], links: dict[str, Any], out: Any) -> None:
    """One peer: trains every mode in turn (a process start and imports paid once, not once per mode)."""
    import torch

    torch.set_num_threads(1)
    sent = _count_sent_bytes()
    for mode, (addr_q, barrier) in links.items():
        try:
            out.put((mode, rank, _train(mode, rank, cfg, sent, addr_q, barrier)))
        except BaseException:
            out.put((mode, rank, {"error": f"peer {rank}: {traceback.format_exc().strip().splitlines()[-1]}"}))
            barrier.abort()  # the other peers stop waiting for this one


def _train(mode: str, rank: int, cfg: dict[str, Any], sent: list[int], addr_q: Any, barrier: Any) -> dict[str, Any]:
    import torch.nn.functional as F

    from hivecli.registry import load_dataset
    from hivecli.schedule import Schedule
    from hivecli.training import build_model_and_optimizer

    recipe, steps, batch = cfg["recipes"][mode], cfg["steps"], cfg["batch"]
    data = load_dataset(recipe.data)
    model, base_opt = build_model_and_optimizer(recipe, data.input_shape, data.num_classes)
    trained, opt, dht = _build(mode, rank, {**cfg, "prefix": f"{cfg['prefix']}-{mode}"}, model, base_opt, addr_q)
    o = recipe.optimizer
    schedule, base_lr = Schedule(o.schedule, o.warmup_steps, o.final_lr_fraction), o.lr
    checkpoints = {round(steps * k / CHECKPOINTS) for k in range(1, CHECKPOINTS + 1)}
    accuracies, group_sizes, rounds = [], [], 0
    barrier.wait(timeout=300)
    sent_start, start = sent[0], time.perf_counter()
    for step, (x, y) in enumerate(_batches(data.train, rank, batch, steps), start=1):
        at = opt.local_epoch if mode == "optimizer" else step - 1  # the step this batch's update is part of
        for g in base_opt.param_groups:
            g["lr"] = base_lr * schedule.factor(at, at / steps)
        opt.zero_grad()
        F.cross_entropy(trained(x), y).backward()
        opt.step()
        if dht is not None and opt.rounds_finished > rounds:  # rounds applied in this step: the last one's size
            group_sizes += [opt.last_group_size] * (opt.rounds_finished - rounds)
            rounds = opt.rounds_finished
        if step in checkpoints:
            accuracies.append(_accuracy(model, data.test))
    final = accuracies[-1]
    if mode == "decentralized":  # leave with an averaged model, as hive's Trainer does
        a = recipe.averaging
        try:
            if opt.average_now(timeout=2 * a.min_matchmaking_time + a.request_timeout):
                group_sizes += [opt.last_group_size] * (opt.rounds_finished - rounds)
        except TimeoutError:
            pass
        final = _accuracy(model, data.test)
    elapsed, nbytes = time.perf_counter() - start, sent[0] - sent_start
    result = {"acc": accuracies, "final": final, "wall": elapsed, "bytes": nbytes, "groups": group_sizes,
              "failed": getattr(opt, "rounds_failed", 0), "epochs": getattr(opt, "local_epoch", steps)}  # fmt: skip
    barrier.wait(timeout=600)  # nobody leaves while another still averages with it
    if dht is not None:
        opt.shutdown()
        dht.shutdown()
    else:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_modes(modes: list[str], cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Train each mode with the same PEERS processes, one mode after the other; each mode's results."""
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    out = ctx.Queue()
    links = {mode: (ctx.Queue(), ctx.Barrier(PEERS)) for mode in modes}  # per mode: a failure stays in it
    cfg = {**cfg, "port": _free_port(), "prefix": f"bench-modes-{os.getpid()}"}
    procs = [WorkerProcess(target=_worker, args=(r, cfg, links, out)) for r in range(PEERS)]
    began = time.monotonic()
    for p in procs:
        p.start()
    peers: dict[str, dict[int, Any]] = {mode: {} for mode in modes}
    deadline = time.monotonic() + 120 + 5 * cfg["steps"] * len(modes)  # generous: Optimizer takes < 1 s a step
    try:
        while any(len(r) < PEERS for r in peers.values()):
            try:
                mode, rank, result = out.get(timeout=1.0)
            except queue.Empty:
                if all(p.exitcode is not None for p in procs) or time.monotonic() > deadline:
                    break
                continue
            peers[mode][rank] = result
            if len(peers[mode]) == PEERS:
                print(f"  {mode}: done at {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    return {mode: _combine(mode, list(peers[mode].values()), cfg) for mode in modes}


def _combine(mode: str, results: list[dict[str, Any]], cfg: dict[str, Any]) -> dict[str, Any]:
    """The peers' results of one mode, as one row."""
    errors = [r["error"] for r in results if "error" in r]
    if errors or len(results) < PEERS:
        return {"error": (errors[0] if errors else f"{len(results)}/{PEERS} peers reported").replace("|", "/")}
    groups = [g for r in results for g in r["groups"]]
    ring = 2 * (PEERS - 1) / PEERS * cfg["model_bytes"] * cfg["steps"]  # per process, ring all-reduce every step
    return {
        "acc": [statistics.mean(r["acc"][i] for r in results) for i in range(CHECKPOINTS)],
        "final": statistics.mean(r["final"] for r in results),
        "spread": max(r["final"] for r in results) - min(r["final"] for r in results),
        "wall": max(r["wall"] for r in results),
        "bytes": ring if mode == "ddp" else statistics.mean(r["bytes"] for r in results),
        "rounds": len(groups) / PEERS if mode != "ddp" else cfg["steps"],
        "full_rounds": sum(g == PEERS for g in groups) / PEERS if mode != "ddp" else cfg["steps"],
        "failed": sum(r["failed"] for r in results),  # all peers together
        "epochs": statistics.mean(r["epochs"] for r in results),
    }


def _print_tables(results: dict[str, dict[str, Any]], cfg: dict[str, Any]) -> dict[str, Any]:
    fifths = [f"{k}/{CHECKPOINTS}" for k in range(1, CHECKPOINTS + 1)]
    print("\nTest accuracy (%) after each fifth of the budget, mean over the 4 peers:")
    print(
        "| mode | " + " | ".join(f"acc {f}" for f in fifths)
        + " | final (spread) | wall s | MB sent/peer | rounds/peer (all 4 in) | optimizer steps/peer |"
    )  # fmt: skip
    print("| --- |" + " --- |" * (CHECKPOINTS + 5))
    for mode, r in results.items():
        if "error" in r:
            print(f"| {LABELS[mode]} | FAILED: {r['error']} |")
            continue
        accs = " | ".join(f"{100 * a:.1f}" for a in r["acc"])
        mb = f"{r['bytes'] / 1e6:.2f}" + (" (formula)" if mode == "ddp" else "")
        rounds = f"{r['rounds']:.0f} ({r['full_rounds']:.0f})"
        rounds += f", {r['failed']} failed (all peers)" if r["failed"] else ""
        print(
            f"| {LABELS[mode]} | {accs} | {100 * r['final']:.1f} ({100 * r['spread']:.1f}) | {r['wall']:.1f} "
            f"| {mb} | {rounds} | {r['epochs']:.0f} |"
        )
    ddp = results.get("ddp")
    verdicts: dict[str, Any] = {}
    if ddp is None or "error" in ddp:
        print("\nNo DDP reference in this run: no ratios, no targets.")
        return verdicts
    print("\nAgainst DDP, same run (accuracy difference in points, mode - DDP; bytes ratio DDP / mode):")
    print("| mode | " + " | ".join(f"d acc {f}" for f in fifths) + " | d final | wall / DDP | bytes DDP / mode |")
    print("| --- |" + " --- |" * (CHECKPOINTS + 3))
    diffs = {}
    for mode, r in results.items():
        if mode == "ddp" or "error" in r:
            continue
        diffs[mode] = [100 * (a - b) for a, b in zip(r["acc"], ddp["acc"], strict=True)]
        cells = " | ".join(f"{d:+.1f}" for d in diffs[mode])
        print(
            f"| {LABELS[mode]} | {cells} | {100 * (r['final'] - ddp['final']):+.1f} | {r['wall'] / ddp['wall']:.2f}x "
            f"| {ddp['bytes'] / max(1, r['bytes']):.1f}x |"
        )
    print("\nTargets:")
    if "optimizer" in diffs:
        ok = all(abs(d) <= 1.0 for d in diffs["optimizer"])
        worst = max(diffs["optimizer"], key=abs)
        verdicts["optimizer_within_1pt_every_checkpoint"] = ok
        print(
            f"  Optimizer within 1 point of DDP at every checkpoint: {'MET' if ok else 'NOT MET'} (worst {worst:+.1f})"
        )
    if "diloco" in diffs:
        d = results["diloco"]
        gap, ratio = 100 * (d["final"] - ddp["final"]), ddp["bytes"] / max(1, d["bytes"])
        acc_ok, bytes_ok = gap >= -1.0, ratio >= 25.0  # more accurate than DDP is no miss
        verdicts.update(diloco_within_1pt_final=acc_ok, diloco_25x_fewer_bytes=bytes_ok)
        verdict = "MET" if acc_ok else "NOT MET"
        print(f"  DiLoCo within 1 point of DDP (or above) at the end: {verdict} ({gap:+.1f} points)")
        print(f"  DiLoCo sends >= 25x fewer bytes than DDP: {'MET' if bytes_ok else 'NOT MET'} ({ratio:.1f}x)")
    return verdicts


def _settings(cfg: dict[str, Any], data: Any) -> list[str]:
    """The settings, as printed above the tables."""
    import torch

    recipe = next(iter(cfg["recipes"].values()))
    o, a = recipe.optimizer, recipe.averaging
    steps, batch, model_bytes = cfg["steps"], cfg["batch"], cfg["model_bytes"]
    shape = "x".join(map(str, data.input_shape))
    passes = PEERS * steps * batch / len(data.train)
    return [
        f"Task: recipes/default.toml: {recipe.model.name} on {recipe.data.name} {shape} ({len(data.train)} train / "
        f"{len(data.test)} test), {model_bytes / 1e3:.1f} KB of fp32 parameters",
        f"  {PEERS} peers x {steps} steps x batch {batch} = {steps * batch} samples per peer ({passes:.1f} passes "
        f"over the training split in all); torch {torch.__version__}, 1 thread per peer, {os.cpu_count()} cores",
        f"  {o.name} lr {o.lr:g} momentum {o.momentum:g} weight decay {o.weight_decay:g}; {o.schedule} schedule over "
        f"{steps} optimizer steps, warm-up {o.warmup_steps} steps, final lr fraction {o.final_lr_fraction:g}",
        f"  hive (hivecli.training.build_run_optimizer): target group {a.target_group_size}, min {a.min_group_size}, "
        f"matchmaking time {a.min_matchmaking_time:g} s, request timeout {a.request_timeout:g} s, all-reduce timeout "
        f"{a.allreduce_timeout:g} s; parameters: a round every {a.every_steps} step(s); collaborative: "
        f"target_batch_size {a.target_batch_size or 4 * batch}, average_state_every {a.average_state_every}; "
        f"diloco: H = {a.local_steps}, outer SGD lr {a.outer_lr:g} momentum {a.outer_momentum:g} Nesterov",
        f"  MB sent/peer: DDP = ring all-reduce formula 2*({PEERS}-1)/{PEERS} x {model_bytes} B per step per process "
        f"({1.5 * model_bytes / 1e3:.1f} KB/step, payload only); hive = counted at each peer's TCP streams",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples-per-peer", type=int, help="training samples each peer processes (default 20000)")
    parser.add_argument("--quick", action="store_true", help="1600 samples per peer (unless --samples-per-peer)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--local-steps", type=int, default=50, help="DiLoCo's H (inner steps per outer step)")
    parser.add_argument("--matchmaking-time", type=float, help="seconds, hive modes (default: the recipe's, 2)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from hivecli.registry import build_model, load_dataset

    recipes = {mode: _recipe(mode, args.local_steps, args.matchmaking_time) for mode in args.modes}
    recipe = recipes[args.modes[0]]
    batch = recipe.data.batch_size
    steps = max(CHECKPOINTS, (args.samples_per_peer or (1600 if args.quick else 20000)) // batch)
    data = load_dataset(recipe.data)
    model = build_model(recipe.model, data.input_shape, data.num_classes)
    cfg = {
        "recipes": recipes,
        "steps": steps,
        "batch": batch,
        "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    for line in _settings(cfg, data):
        print(line)
    if "diloco" in args.modes and steps % args.local_steps:
        print(f"  note: {steps} steps is no multiple of H = {args.local_steps}: DiLoCo ends on local steps")

    results = run_modes(args.modes, cfg)
    verdicts = _print_tables(results, cfg)
    if args.json:
        settings = {**cfg, "recipes": {mode: r.to_dict() for mode, r in recipes.items()}}
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "results": results, "targets": verdicts}, f, indent=2)


if __name__ == "__main__":
    main()
