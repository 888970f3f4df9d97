"""The quick-start program as two real processes: the second joins the first's printed address."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "examples" / "quickstart.py"


def _start(args, tmp_path, name):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(tmp_path / f"{name}.out", "w") as out, open(tmp_path / f"{name}.err", "w") as err:
        # the child keeps its own copies of the descriptors
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=out, stderr=err, cwd=tmp_path, env=env)
    return proc, tmp_path / f"{name}.out", tmp_path / f"{name}.err"


def _wait_for_address(proc, out_path, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"'(/ip4/[^']+)'", out_path.read_text())
        if found:
            return found.group(1)
        assert proc.poll() is None, f"the first peer exited early: {out_path.with_suffix('.err').read_text()[-2000:]}"
        time.sleep(0.1)
    raise TimeoutError("the first peer did not print its address within 60 s")


@pytest.mark.slow
def test_two_quickstart_peers_train_average_and_stay_close(tmp_path):
    first, first_out, first_err = _start(
        ["--dataset", "digits", "--max-seconds", "16", "--save", "a.pt"], tmp_path, "a"
    )
    second = None
    try:
        address = _wait_for_address(first, first_out)
        second, second_out, second_err = _start(
            ["--dataset", "digits", "--initial-peers", address, "--max-seconds", "12", "--save", "b.pt"], tmp_path, "b"
        )
        assert second.wait(timeout=120) == 0, second_err.read_text()[-3000:]
        assert first.wait(timeout=120) == 0, first_err.read_text()[-3000:]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    for err, out in ((first_err, first_out), (second_err, second_out)):
        log = err.read_text()
        assert "Starting a new averaging round with current parameters." in log
        assert re.search(r"Finished averaging round in [\d.]+ s with 2 peers\.", log), log[-3000:]
        steps, rounds = map(int, re.search(r"Done: (\d+) steps, (\d+) averaging rounds", out.read_text()).groups())
        assert steps > 0 and rounds >= 1
    assert "Downloaded the state of peer" in second_err.read_text()
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    flat_a = torch.cat([v.flatten() for v in a.values()])
    flat_b = torch.cat([v.flatten() for v in b.values()])
    # independent initialisations differ by about 100%; averaging keeps them within a few percent, up to
    # about 15% on a loaded machine, where one peer may train alone for its last seconds (seen: 13%)
    assert (flat_a - flat_b).norm() / flat_a.norm() < 0.25
