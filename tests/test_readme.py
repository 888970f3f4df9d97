"""The README's Python snippets run as written: each fenced python block under the sections
below runs in a fresh interpreter (CPU, loopback, no download) and must exit 0."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

# section heading -> what its snippet prints when it works (regular expressions)
SECTIONS = {
    "Quick start in Python: hivemind's code runs as written": [
        re.escape("To join the training, use initial_peers = ['/ip4/127.0.0.1/tcp/"),
        re.escape("20 steps, loss "),
    ],
    # 256 samples for a target of 128: 2 epochs, or more where a step slow enough to pass the
    # run's ETA ended one early (as hivemind's tracker does: a straggler must not hold the run)
    "hivemind 1.x's Optimizer and DiLoCo": [r"^epoch [2-8]$"],
    "The DHT on its own": [re.escape("ValueWithExpiration(value={'any': 'msgpack value'}")],
}


def python_blocks(section: str) -> list[str]:
    """The ```python blocks between `## section` and the next heading of level 2 or less."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^#{{1,2}} |\Z)", text, flags=re.S | re.M)
    assert match, f"README.md has no section {section!r}"
    return re.findall(r"^```python\n(.*?)^```$", match.group(1), flags=re.S | re.M)


@pytest.mark.parametrize("section", list(SECTIONS))
def test_readme_python_snippets_run_as_written(section, tmp_path):
    blocks = python_blocks(section)
    assert blocks, f"no ```python block under {section!r}"
    for block in blocks:
        result = subprocess.run(
            [sys.executable, "-c", block], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        assert result.returncode == 0, f"{block}\nstdout: {result.stdout}\nstderr: {result.stderr[-3000:]}"
        for expected in SECTIONS[section]:
            assert re.search(expected, result.stdout, flags=re.M), f"{expected!r} not in {result.stdout!r}"
