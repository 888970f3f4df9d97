"""Long runs of the default recipe: does training stay near its best, and does averaging help?

For each N (1, 2, 4 by default) it runs `hive local N RECIPE` to the recipe's goal (the run's
whole length: its samples are shared by the N peers, so each peer trains about 1/N of the
steps) or, with --steps S, to a goal of N x S x batch samples (about S steps per peer, and the
learning-rate schedule spans them). Every peer evaluates every
--every steps; the script reads each peer's metrics.jsonl and prints:

- accuracy every --every steps, per peer;
- for each peer: best accuracy, final accuracy, and the worst drop below its best-so-far after
  step --after (default 1,000), with the step where it happened; rollbacks by the divergence guard.

Targets (issue "Runs that last"): no peer drops more than 3 points below its best after step
1,000; N = 2 and N = 4 end above N = 1 (mean final accuracy of their peers).

Run from the repository root (the default recipe's whole run for 1, 2 and 4 peers takes about
half an hour on 2 cores):

    .venv/bin/python benchmarks/bench_long_run.py
    .venv/bin/python benchmarks/bench_long_run.py --peers 1 2 --steps 3000 --every 250
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
HIVE = [sys.executable, "-m", "hivecli.cli.main"]


def run_local(n: int, recipe: str, every: int, steps: int | None, workdir: Path) -> tuple[dict[str, list], float]:
    """Run `hive local n`; returns ({peer dir: metrics rows}, seconds)."""
    out = workdir / f"n{n}"
    args = [*HIVE, "local", str(n), recipe, "--set", f'output.dir="{out}"', "--set", f"output.eval_every_steps={every}"]
    if steps:  # the run's goal becomes N peers x steps x batch, so that the LR schedule spans it
        from hivecli.recipe import load_recipe

        batch = load_recipe(recipe).data.batch_size
        args += ["--set", f"run.total_samples={n * steps * batch}"]
    began = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, cwd=workdir, timeout=4 * 3600)
    seconds = time.perf_counter() - began
    if result.returncode != 0:
        raise RuntimeError(f"hive local {n} failed ({result.returncode}): {result.stderr[-3000:]}")
    rows = {}
    for metrics in sorted(out.glob("*/*/*/metrics.jsonl")):
        rows[metrics.parent.name] = [json.loads(line) for line in metrics.read_text().splitlines()]
    if len(rows) != n:
        raise RuntimeError(f"expected {n} peers' metrics under {out}, found {len(rows)}")
    return rows, seconds


def summarize(rows: list[dict], after: int) -> dict:
    evals = [(r["step"], r["accuracy"]) for r in rows if r.get("event") == "eval"]
    best, worst_drop, worst_at = 0.0, 0.0, None
    for step, accuracy in evals:
        best = max(best, accuracy)
        if step > after and best - accuracy > worst_drop:
            worst_drop, worst_at = best - accuracy, step
    return {
        "evals": evals,
        "best": best,
        "final": evals[-1][1] if evals else float("nan"),
        "steps": evals[-1][0] if evals else 0,
        "worst_drop": worst_drop,
        "worst_at": worst_at,
        "rollbacks": sum(1 for r in rows if r.get("event") == "rolled_back"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO_ROOT / "recipes" / "default.toml"))
    parser.add_argument("--peers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--every", type=int, default=500, help="evaluate every this many steps")
    parser.add_argument("--after", type=int, default=1000, help="count drops after this step")
    parser.add_argument(
        "--steps", type=int, default=None, help="a goal of about this many steps per peer instead of the recipe's"
    )
    args = parser.parse_args()

    finals: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="hive-long-") as tmp:
        for n in args.peers:
            rows, seconds = run_local(n, args.recipe, args.every, args.steps, Path(tmp))
            summaries = {peer: summarize(r, args.after) for peer, r in rows.items()}
            print(f"\n## N = {n} ({seconds / 60:.1f} min)")
            steps = sorted({step for s in summaries.values() for step, _ in s["evals"]})
            print("| step | " + " | ".join(f"peer {i}" for i in range(n)) + " |")
            print("|---" * (n + 1) + "|")
            for step in steps:
                cells = []
                for s in summaries.values():
                    found = [a for st, a in s["evals"] if st == step]
                    cells.append(f"{found[-1]:.3f}" if found else "")
                print(f"| {step} | " + " | ".join(cells) + " |")
            print(f"\n| peer | steps | best | final | worst drop after step {args.after} | at step | rollbacks |")
            print("|---|---|---|---|---|---|---|")
            for i, s in enumerate(summaries.values()):
                at = "-" if s["worst_at"] is None else str(s["worst_at"])
                print(
                    f"| {i} | {s['steps']} | {s['best']:.3f} | {s['final']:.3f} | {100 * s['worst_drop']:.1f} points"
                    f" | {at} | {s['rollbacks']} |"
                )
            finals[n] = sum(s["final"] for s in summaries.values()) / n
            worst = max(s["worst_drop"] for s in summaries.values())
            print(f"\nworst drop of any peer after step {args.after}: {100 * worst:.1f} points "
                  f"({'PASS' if worst <= 0.03 else 'FAIL'}: target <= 3)")  # fmt: skip
        if 1 in finals:
            print("\n| N | mean final accuracy | vs N = 1 |")
            print("|---|---|---|")
            for n, final in finals.items():
                print(f"| {n} | {final:.3f} | {final - finals[1]:+.3f} |")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
