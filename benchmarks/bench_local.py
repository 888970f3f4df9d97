"""`hive local` on a recipe: test accuracy of N averaging peers against one peer, same steps;
and the time from `hive start` to its printed address.

For each repetition, `hive local 1 RECIPE` and `hive local N RECIPE` run one after the other
(every peer trains the recipe's max_steps steps of the run); the table shows each peer's final
test accuracy and the single peer's. Peers shuffle the data by their (random) peer ID, so
repetitions differ.

Time to address: `hive start RECIPE --json` is launched `--starts` times; the time until its
first stdout line (the `listening` event with the multiaddrs) is measured from just before the
process is spawned, so it includes the Python start and the imports.

Run from the repository root:

    .venv/bin/python benchmarks/bench_local.py                       # 3 repetitions, N = 3 (about 4 min)
    .venv/bin/python benchmarks/bench_local.py --peers 2 --reps 1 --max-steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIVE = [sys.executable, "-m", "hivecli.cli.main"]


def time_to_address(recipe: str, workdir: str) -> float:
    began = time.perf_counter()
    proc = subprocess.Popen(
        [*HIVE, "start", recipe, "--json", "--host", "127.0.0.1", "--max-steps", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=workdir,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        elapsed = time.perf_counter() - began
        assert json.loads(line)["event"] == "listening", line
        return elapsed
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        proc.stdout.close()  # type: ignore[union-attr]


def local_accuracies(recipe: str, n: int, max_steps: int | None, workdir: str) -> list[float]:
    args = [*HIVE, "local", str(n), recipe, "--json"]
    if max_steps:
        args += ["--max-steps", str(max_steps)]
    result = subprocess.run(args, capture_output=True, text=True, cwd=workdir, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"hive local {n} failed ({result.returncode}): {result.stderr[-2000:]}")
    finished = {}
    for line in result.stdout.splitlines():
        event = json.loads(line)
        if event["event"] == "finished":
            finished[event["peer"]] = event["accuracy"]
    return [finished[i] for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default=os.path.join(REPO_ROOT, "recipes", "default.toml"))
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=None, help="override the recipe's limits.max_steps")
    parser.add_argument("--starts", type=int, default=5, help="launches for the time-to-address figure")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        starts = [time_to_address(args.recipe, workdir) for _ in range(args.starts)]
        print(f"Time from `hive start` to its printed address ({args.starts} launches):")
        print(f"| median | min | max |\n| --- | --- | --- |\n| {statistics.median(starts):.2f} s | "
              f"{min(starts):.2f} s | {max(starts):.2f} s |")  # fmt: skip

        rows = []
        for rep in range(args.reps):
            single = local_accuracies(args.recipe, 1, args.max_steps, workdir)[0]
            group = local_accuracies(args.recipe, args.peers, args.max_steps, workdir)
            rows.append((single, group))
            print(f"  rep {rep + 1}: single {single:.3f}, peers {group}", file=sys.stderr, flush=True)

    steps = f"{args.max_steps} steps" if args.max_steps else "the recipe's max_steps"
    print(f"\nTest accuracy at the end, {steps}: one peer alone vs {args.peers} peers averaging (`hive local`)")
    header = " | ".join(f"peer {i}" for i in range(args.peers))
    print(f"| rep | one peer | {header} | mean of {args.peers} | peers above the single peer |")
    print("| --- |" + " --- |" * (args.peers + 3))
    for rep, (single, group) in enumerate(rows, 1):
        above = sum(acc > single for acc in group)
        cells = " | ".join(f"{acc:.3f}" for acc in group)
        print(f"| {rep} | {single:.3f} | {cells} | {statistics.mean(group):.3f} | {above} of {args.peers} |")
    singles = [s for s, _ in rows]
    means = [statistics.mean(g) for _, g in rows]
    print(
        f"| all | {statistics.mean(singles):.3f} | " + " | ".join("" for _ in range(args.peers))
        + f" | {statistics.mean(means):.3f} | |"
    )  # fmt: skip


if __name__ == "__main__":
    main()
