"""benchmarks/_swarm.py: a benchmark's spawned workers do not outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
DEADLINE = 30.0

PARENT = textwrap.dedent(
    f"""
    import sys, threading
    sys.path.insert(0, {str(BENCHMARKS)!r})
    from _swarm import WorkerProcess

    def worker(path):
        with open(path + ".tmp", "w") as f:
            f.write("ready")
        import os
        os.replace(path + ".tmp", path)
        threading.Event().wait(120)  # busy until killed; bounded, in case it is not

    if __name__ == "__main__":
        WorkerProcess(target=worker, args=(sys.argv[1],)).start()
        threading.Event().wait(120)
    """
)


def _wait(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_worker_dies_with_the_benchmark_that_started_it_even_when_that_is_killed(tmp_path: Path) -> None:
    script, ready = tmp_path / "parent.py", tmp_path / "ready"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(ready)])
    try:
        _wait(ready.exists, "the worker to start")
        workers = psutil.Process(parent.pid).children()
        assert len(workers) >= 1
        os.kill(parent.pid, signal.SIGKILL)  # no finally, no atexit: only the kernel can stop the worker
        parent.wait(timeout=DEADLINE)
        for worker in workers:
            _wait(lambda w=worker: _gone(w.pid), f"worker {worker.pid} to exit")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
