"""Shared memory between peers on one host (hivecli/averaging/sharedmem.py): the buffers, the
checks before mapping another side's, and rounds that move their chunks through them."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys

import pytest
import torch
from test_averaging import DHT_FAST, FAST, averagers, run_round, snapshot

from hivecli import HiveError
from hivecli.averaging import sharedmem
from hivecli.averaging.sharedmem import SharedBuffer, SharedBuffers
from hivecli.net import NetSettings
from hivecli.net.secure import SecuritySettings
from hivecli.testing import local_swarm


def our_files() -> set[str]:
    return {name for name in os.listdir(sharedmem.DIRECTORY) if name.startswith(f"hive-{os.getpid()}-")}


@pytest.fixture
def directory(tmp_path, monkeypatch):
    """A directory of our own in place of /dev/shm, and orphans looked for again."""
    monkeypatch.setattr(sharedmem, "DIRECTORY", str(tmp_path))
    monkeypatch.setattr(sharedmem, "_orphans_removed", False)
    return tmp_path


def test_a_buffer_is_a_file_only_we_may_open_and_the_other_side_maps_it_at_its_size(directory):
    mine = SharedBuffer.create(1000)
    path = directory / mine.name
    info = os.stat(path)
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_size == 1000 and info.st_blocks > 0  # space reserved
    theirs = SharedBuffer.attach(mine.name, 1000)
    theirs.tensor[10:20] = 7
    assert mine.tensor[10:20].tolist() == [7] * 10  # one memory
    with pytest.raises(HiveError, match="holds 1000 bytes, expected 999"):
        SharedBuffer.attach(mine.name, 999)
    mine.free()
    assert not path.exists()
    with pytest.raises(HiveError, match="cannot open shared buffer"):
        SharedBuffer.attach(mine.name, 1000)
    assert theirs.tensor[15] == 7  # a mapping outlives the file's name


@pytest.mark.parametrize("name", ["../../etc/passwd", "hive-1-zz", "hive-12-" + "a" * 31, 5, None])
def test_only_names_of_shared_buffers_are_opened(directory, name):
    with pytest.raises(HiveError, match="is not the name of a shared buffer"):
        SharedBuffer.attach(name, 10)


def test_a_file_others_may_open_or_not_ours_or_a_link_is_not_mapped(directory):
    buffer = SharedBuffer.create(64)
    path = directory / buffer.name
    os.chmod(path, 0o640)
    with pytest.raises(HiveError, match="not a file of our own user"):
        SharedBuffer.attach(buffer.name, 64)
    os.chmod(path, 0o600)
    if os.getuid() == 0:  # root can give it away: then it is another user's
        os.chown(path, 12345, -1)
        with pytest.raises(HiveError, match="not a file of our own user"):
            SharedBuffer.attach(buffer.name, 64)
        os.chown(path, 0, -1)
    link = f"hive-{os.getpid()}-{'b' * 32}"
    os.symlink(path, directory / link)
    with pytest.raises(HiveError, match="cannot open"):
        SharedBuffer.attach(link, 64)
    assert SharedBuffer.attach(buffer.name, 64).tensor.numel() == 64


def test_without_room_for_a_buffer_the_peers_stay_on_the_stream_and_say_so_once(directory, monkeypatch, caplog):
    monkeypatch.setattr(sharedmem, "DIRECTORY", str(directory / "missing"))
    buffers = SharedBuffers()
    with caplog.at_level(logging.INFO, logger="hivecli.averaging.sharedmem"):
        assert buffers.get(("recv", "a"), 100) is None
        assert buffers.get(("recv", "b"), 100) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "loopback TCP, not shared memory" in lines[0] and "missing" in lines[0]


def test_a_buffer_takes_at_most_half_the_free_space(directory, monkeypatch):
    assert SharedBuffer.create(4096).tensor.numel() == 4096
    monkeypatch.setattr(os, "statvfs", lambda path: os.statvfs_result((4096, 4096, 100, 100, 100, 0, 0, 0, 0, 255)))
    with pytest.raises(OSError, match="more than half the free space"):
        SharedBuffer.create(4096 * 51)
    assert SharedBuffer.create(4096 * 50).tensor.numel() == 4096 * 50


def test_files_whose_creator_is_gone_are_removed_by_the_next_creator(directory):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = directory / f"hive-{int(gone.stdout)}-{'c' * 32}"
    alive = directory / f"hive-1-{'d' * 32}"  # pid 1 is always there
    other = directory / "something-else"
    for path in (orphan, alive, other):
        path.write_bytes(b"x")
    SharedBuffer.create(10)
    assert not orphan.exists() and alive.exists() and other.exists()


def test_a_round_keeps_at_most_twice_the_buffers_it_used_the_latest_first(directory):
    buffers = SharedBuffers()
    first = {key: buffers.get(("recv", key), 100) for key in "abcd"}
    buffers.end_round()
    assert buffers.get(("recv", "a"), 100) is first["a"]  # kept, and the same file: mapped once
    assert buffers.get(("recv", "a"), 200) is not first["a"]  # grown: a new file, the old one removed
    buffers.end_round()  # one used: two kept, the most recent
    assert len(os.listdir(directory)) == 2
    buffers.clear()
    assert os.listdir(directory) == []


# ---- rounds ---------------------------------------------------------------------------------


def average_twice(dhts, inputs, **settings):
    """Two rounds of two averagers; returns each one's bytes received on streams, and the files
    under /dev/shm our averagers had while they ran."""
    with averagers(dhts, [[t.clone()] for t in inputs], chunk_bytes=65536, **FAST, **settings) as avs:
        for _ in range(2):
            run_round(avs)
        for av in avs:
            torch.testing.assert_close(snapshot(av)[0], (inputs[0] + inputs[1]) / 2, rtol=0, atol=1e-6)
        return [av.bytes_received for av in avs], our_files()


def test_peers_on_one_host_average_through_shared_memory_and_remove_its_files():
    torch.manual_seed(1)
    inputs = [torch.randn(200_000) for _ in range(2)]
    before = our_files()
    with local_swarm(2, **DHT_FAST) as dhts:
        shared, files = average_twice(dhts, inputs, prefix="shm")
        streamed, no_files = average_twice(dhts, inputs, prefix="noshm", shared_memory=False)
    part = 100_000 * 4  # each peer's span: the other's part of it and its averages came in each round
    assert streamed == [2 * 2 * part] * 2
    # through shared memory only the first chunks, sent before the reducer's "ready", use the stream
    assert all(0 < received <= 2 * 4 * 65536 for received in shared)
    assert len(files - before) == 4  # each peer's buffer for the other's part and for its averages
    assert no_files == before and our_files() == before  # all removed at shutdown


def test_a_peer_without_shared_memory_and_a_sealed_link_take_the_stream():
    torch.manual_seed(2)
    inputs = [torch.randn(200_000) for _ in range(2)]
    full = 2 * 2 * 100_000 * 4
    settings = {"prefix": "mixed", "chunk_bytes": 65536, **FAST}
    with (
        local_swarm(2, **DHT_FAST) as dhts,
        averagers(dhts[:1], [[inputs[0].clone()]], **settings) as first,
        averagers(dhts[1:], [[inputs[1].clone()]], shared_memory=False, **settings) as second,
    ):
        avs = first + second
        for _ in range(2):
            run_round(avs)
        for av in avs:
            torch.testing.assert_close(snapshot(av)[0], (inputs[0] + inputs[1]) / 2, rtol=0, atol=1e-6)
        assert [av.bytes_received for av in avs] == [full, full]
    sealed = NetSettings(security=SecuritySettings(encrypt_same_host=True))
    with local_swarm(2, **DHT_FAST, net_settings=sealed) as dhts:
        received, _ = average_twice(dhts, inputs, prefix="sealed")
        assert received == [full, full]
