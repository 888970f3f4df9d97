"""The README's Python snippets run as written: each fenced python block under the sections
below runs in a fresh interpreter (CPU, loopback, no download) and must exit 0."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

# section heading -> what its snippet prints when it works
SECTIONS = {
    "Quick start in Python: hivemind's code runs as written": [
        "To join the training, use initial_peers = ['/ip4/127.0.0.1/tcp/",
        "20 steps, loss ",
    ],
    "hivemind 1.x's Optimizer and DiLoCo": ["epoch 2"],
    "The DHT on its own": ["ValueWithExpiration(value={'any': 'msgpack value'}"],
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
            assert expected in result.stdout, f"{expected!r} not in {result.stdout!r}"
