"""Churn: do the collaborative and DiLoCo modes survive a long run with peers coming and going?

For each mode it runs the real CLI on loopback with the default recipe (offline digits): one
`hive start` and two `hive join` through the starter's address, for --seconds in all, with churn:

* 25%: SIGKILL joiner j1 (no goodbye, no checkpoint);
* 40%: a fresh joiner n1 joins (it must load the run's state: its `state_loaded` event);
* 60%: SIGTERM joiner j2 (a clean leave, after a checkpoint);
* 70%: j2 is started again with the same --identity (j2b): it resumes from its checkpoint, then
  loads the run's state since the run has moved on.

At the end every live peer gets SIGTERM at once. Printed per mode: per peer its steps (epochs in
collaborative mode, outer steps in DiLoCo), averaging rounds (collaborative: two per epoch, the
gradients' and the parameters'), last group size, failed rounds (its stderr's "failed: " and
"found no group" lines), the step it loaded vs the run's step then, its final test accuracy and
exit code; per phase the run's step (the highest step of the live peers) at its start and end,
and the epoch `hive peers --run` saw. The verdict: every late peer caught up (loaded step within
2 of the run's), the run's step rose in every phase, and every survivor exits 0 with accuracy
>= 0.85. Peers' logs stay in the printed work directory.

Run from the repository root (about 4.5 minutes per mode):

    .venv/bin/python benchmarks/bench_churn.py
    .venv/bin/python benchmarks/bench_churn.py --modes diloco --seconds 120
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT = str(REPO_ROOT / "recipes" / "default.toml")
HIVE = [sys.executable, "-m", "hivecli.cli.main"]
LOOPBACK = ["--host", "127.0.0.1"]
FAST = ["averaging.min_matchmaking_time=2", "averaging.request_timeout=1", "output.report_every_seconds=0.5"]
MODES = {
    "collaborative": ["averaging.target_batch_size=256"],
    "diloco": ["averaging.local_steps=20", 'optimizer.name="adamw"', "optimizer.lr=0.001"],
    "parameters": [],
}
PHASES = [(0.0, "3 peers"), (0.25, "j1 killed"), (0.40, "n1 joined"), (0.60, "j2 left"), (0.70, "j2b back")]
CAUGHT_UP, MIN_ACCURACY = 2, 0.85


class Peer:
    """A `hive start/join --json` process; a thread reads its events as they come."""

    def __init__(self, name: str, args: list[str], workdir: Path, swarm: list[Peer], t0: float) -> None:
        self.name, self.swarm, self.t0 = name, swarm, t0
        self.began, self.ended, self.how = time.monotonic() - t0, None, "end"
        self.stderr_path = workdir / f"{name}.stderr"
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                [*HIVE, *args, "--json", *LOOPBACK], stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=workdir
            )
        self.last: dict[str, dict[str, Any]] = {}
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()
        swarm.append(self)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            event["t"] = time.monotonic() - self.t0
            if event["event"] == "state_loaded":  # the run's step at that moment, from the others
                event["run_step"] = run_step(self.swarm, exclude=self)
            self.last[event["event"]] = event

    def alive(self) -> bool:
        return self.proc.poll() is None

    def step(self) -> int | None:
        event = self.last.get("finished") or self.last.get("progress")
        return event["step"] if event else None

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while name not in self.last:
            if not self.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no {name!r} event (exit {self.proc.poll()}), see {self.stderr_path}")
            time.sleep(0.2)
        return self.last[name]

    def signal(self, sig: int, how: str) -> None:
        if self.alive():
            self.proc.send_signal(sig)
            self.how, self.ended = how, time.monotonic() - self.t0

    def reap(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code, self.how = self.proc.wait(), self.how + " (hung: killed)"
        self.reader.join(timeout=10)
        return code

    def log_lines(self, *words: str) -> list[str]:
        text = self.stderr_path.read_text(errors="replace")
        return [line.strip() for line in text.splitlines() if any(word in line for word in words)]


def run_step(swarm: list[Peer], exclude: Peer | None = None) -> int | None:
    """The run's step: the highest step the live peers last reported."""
    steps = [p.step() for p in swarm if p is not exclude and p.alive() and p.step() is not None]
    return max(steps, default=None)


def dht_epoch(address: str, workdir: Path) -> dict[str, Any] | None:
    """The run's epoch as `hive peers --run` sees it in the DHT."""
    try:
        out = subprocess.run(
            [*HIVE, "peers", address, "--run", "digits-demo", "--json"], capture_output=True, text=True,
            cwd=workdir, timeout=30,
        )  # fmt: skip
        return json.loads(out.stdout)["runs"]["digits-demo"]["epoch"] if out.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError, KeyError):
        return None


def poll_dht(address: str, workdir: Path, stop: threading.Event, samples: list, t0: float) -> None:
    while not stop.wait(15.0):
        samples.append((time.monotonic() - t0, dht_epoch(address, workdir)))


def run_mode(mode: str, seconds: float, workdir: Path) -> dict[str, Any]:
    """One churn run; returns its peers, the run's step over time and the DHT's epochs."""
    workdir.mkdir(parents=True)
    sets = [f'averaging.mode="{mode}"', *MODES[mode], *FAST, f'output.dir="{workdir / "runs"}"']
    common = [arg for value in sets for arg in ("--set", value)] + ["--max-steps", "100000"]
    identity = workdir / "j2.key"
    subprocess.run([*HIVE, "keygen", "--identity", str(identity)], check=True, capture_output=True, timeout=60)
    swarm: list[Peer] = []
    history: list[tuple[float, int | None]] = []
    dht_epochs: list[tuple[float, Any]] = []
    stop_polling = threading.Event()
    t0 = time.monotonic()
    try:
        starter = Peer("start", ["start", DEFAULT, *common], workdir, swarm, t0)
        address = starter.wait_event("listening", timeout=90)["maddrs"][0]
        t0 = time.monotonic()  # the churn's clock starts once the run can be joined
        starter.t0 = t0
        join = ["join", address, *common]
        peers = {"start": starter, "j1": Peer("j1", join, workdir, swarm, t0)}
        peers["j2"] = Peer("j2", [*join, "--identity", str(identity)], workdir, swarm, t0)
        threading.Thread(target=poll_dht, args=(address, workdir, stop_polling, dht_epochs, t0), daemon=True).start()
        actions = [
            (0.25, lambda: peers["j1"].signal(signal.SIGKILL, "SIGKILL")),
            (0.40, lambda: peers.update(n1=Peer("n1", join, workdir, swarm, t0))),
            (0.60, lambda: peers["j2"].signal(signal.SIGTERM, "SIGTERM")),
            (0.70, lambda: peers["j2"].reap(timeout=30)),  # its run directory is free again
            (0.70, lambda: peers.update(j2b=Peer("j2b", [*join, "--identity", str(identity)], workdir, swarm, t0))),
        ]
        while (now := time.monotonic() - t0) < seconds:
            while actions and now >= actions[0][0] * seconds:
                actions.pop(0)[1]()
            history.append((now, run_step(swarm)))
            if not starter.alive():
                raise RuntimeError(f"the starter exited {starter.proc.returncode}, see {starter.stderr_path}")
            time.sleep(0.5)
        final_step = run_step(swarm)
        final_epoch = dht_epoch(address, workdir)  # before anyone leaves
        dht_epochs.append((math.inf, final_epoch))
        for peer in swarm:
            peer.signal(signal.SIGTERM, "end")
        codes = {peer.name: peer.reap(timeout=90) for peer in swarm}
        return {"peers": peers, "codes": codes, "history": history, "dht": dht_epochs, "final_step": final_step,
                "final_epoch": final_epoch}  # fmt: skip
    finally:
        stop_polling.set()
        for peer in swarm:
            if peer.alive():
                peer.proc.kill()
                peer.proc.wait()


def at(samples: list[tuple[float, Any]], t: float) -> Any:
    """The last sample taken at or before t."""
    return next((value for when, value in reversed(samples) if when <= t and value is not None), None)


def cell(value: Any, width: int, spec: str = "") -> str:
    return f"{'-' if value is None else format(value, spec):>{width}}"


def report(mode: str, result: dict[str, Any], seconds: float) -> bool:
    peers, codes = result["peers"], result["codes"]
    print(f"\n=== mode {mode}: {seconds:.0f} s, churn at 25/40/60/70% ===")
    head = f"{'peer':5} {'joined':>6} {'left':>13} {'loaded':>7} {'run':>5} {'final':>5} {'rounds':>6} {'group':>5}"
    print(head + f" {'fails':>5} {'acc':>6} {'exit':>4}  errors")
    late_ok, survivors_ok, spread = True, True, []
    for name, peer in peers.items():
        loaded = peer.last.get("state_loaded")
        progress, finished = peer.last.get("progress") or {}, peer.last.get("finished")
        accuracy = (finished or {}).get("accuracy")  # none for a killed peer
        left = f"{peer.ended:.0f} s {peer.how}" if peer.how != "end" else "-"
        fails = len(peer.log_lines("failed: ", "found no group"))
        errors = peer.log_lines("Traceback", "ERROR")
        first_error = ": " + errors[0][:80] if errors else ""
        cells = [
            name.ljust(5), cell(peer.began, 6, ".0f"), f"{left:>13}", cell(loaded and loaded["step"], 7),
            cell(loaded and loaded.get("run_step"), 5), cell(peer.step(), 5),
            cell((finished or progress).get("rounds"), 6), cell(progress.get("last_group_size"), 5), cell(fails, 5),
            cell(accuracy, 6, ".3f"), cell(codes[name], 4), f" {len(errors)}{first_error}",
        ]  # fmt: skip
        print(" ".join(cells))
        if name in ("n1", "j2b"):  # the late peers must catch up with the run
            run = loaded.get("run_step") if loaded else None
            late_ok &= loaded is not None and run is not None and abs(loaded["step"] - run) <= CAUGHT_UP
        if peer.how == "end":
            survivors_ok &= accuracy is not None and accuracy >= MIN_ACCURACY and codes[name] == 0
            spread.append(peer.step() or 0)
    print(f"\n{'phase':10} {'from':>5} {'to':>5} {'run step':>14} {'DHT epoch':>14}")
    ends = [start for start, _ in PHASES[1:]] + [1.0]
    rising = True
    for (start, label), end in zip(PHASES, ends, strict=True):
        a, b = at(result["history"], start * seconds) or 0, at(result["history"], end * seconds - 0.5)
        e0, e1 = at(result["dht"], start * seconds), at(result["dht"], end * seconds if end < 1 else math.inf)
        dht = f"{e0['epoch'] if e0 else '-'} -> {e1['epoch'] if e1 else '-'}"
        rising &= b is not None and b > a
        print(f"{label:10} {start * seconds:5.0f} {end * seconds:5.0f} {f'{a} -> {b}':>14} {dht:>14}")
    last_dht = result["final_epoch"]
    total = f"{result['final_step']} (DHT: epoch {last_dht['epoch'] if last_dht else '-'})"
    spread = max(spread, default=0) - min(spread, default=0)
    print(f"\nrun's step at the end: {total}; survivors' final-step spread: {spread}")
    ok = late_ok and rising and survivors_ok
    print(
        f"verdict {mode}: {'PASS' if ok else 'FAIL'} (late peers caught up: {late_ok}; the run's step rose in "
        f"every phase: {rising}; survivors exit 0 with accuracy >= {MIN_ACCURACY}: {survivors_ok})"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["collaborative", "diloco"])
    parser.add_argument("--seconds", type=float, default=240.0, help="length of each mode's run")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_churn_"))
    print(f"work directory (peers' stderr, runs): {root}")
    results = []
    for mode in args.modes:
        try:
            results.append(report(mode, run_mode(mode, args.seconds, root / mode), args.seconds))
        except RuntimeError as e:
            print(f"\nverdict {mode}: FAIL ({e})")
            results.append(False)
    leftovers = subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True).stdout.split()
    print(f"\nleftover processes: {leftovers or 'none'}")
    return 0 if all(results) and not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
