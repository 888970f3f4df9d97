"""Shared memory between peers on one host (hivecli/averaging/sharedmem.py): the buffers, the
checks before mapping another side's, and rounds that move their chunks through them."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import stat
import subprocess
import sys
import time

import pytest
import torch
from test_averaging import DHT_FAST, FAST, averagers, declared_donors, run_round, snapshot

from hivecli import HiveError
from hivecli.averaging import DecentralizedAverager, sharedmem
from hivecli.averaging.sharedmem import SharedBuffer, SharedBuffers
from hivecli.net import NetSettings
from hivecli.net.secure import SecuritySettings
from hivecli.testing import local_swarm, wait_for


def our_files() -> set[str]:
    return {name for name in os.listdir(sharedmem.DIRECTORY) if name.startswith(f"hive-{os.getpid()}-")}


@pytest.fixture
def directory(tmp_path, monkeypatch):
    """A directory of our own in place of /dev/shm, and orphans looked for again."""
    monkeypatch.setattr(sharedmem, "DIRECTORY", str(tmp_path))
    monkeypatch.setattr(sharedmem, "_next_orphan_scan", 0.0)
    return tmp_path


ME, OTHER = b"me" * 17, b"other" * 7  # peer ids' bytes: the writer a buffer names, and another peer
LAYOUT = sharedmem.layout_tag([0, 500, 1000])


def test_a_buffer_is_a_file_only_we_may_open_and_its_writer_maps_it(directory):
    mine = SharedBuffer.create(1000, ME)
    path = directory / mine.name
    info = os.stat(path)
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_size == sharedmem.HEADER + 1000
    assert info.st_blocks * 512 >= info.st_size  # its space reserved up front
    theirs = SharedBuffer.attach(mine.offer(LAYOUT), 1000, ME)
    theirs.region(1000)[10:20] = 7
    assert mine.region(1000)[10:20].tolist() == [7] * 10  # one memory, past the header
    assert SharedBuffer.attach(mine.offer(LAYOUT), 600, ME).capacity == 1000  # a buffer may be larger
    with pytest.raises(HiveError, match="holds 1000 bytes, we need 1001"):
        SharedBuffer.attach(mine.offer(LAYOUT), 1001, ME)
    mine.free()
    assert not path.exists()
    with pytest.raises(HiveError, match="cannot open shared buffer"):
        SharedBuffer.attach(mine.offer(LAYOUT), 1000, ME)
    assert theirs.region(1000)[15] == 7  # a mapping outlives the file's name


def test_a_buffer_is_mapped_only_by_the_peer_it_was_offered_to_with_its_token(directory):
    """A peer of another user sees the files' names in /dev/shm: it must not be able to make us
    write into a buffer that was not offered to us (another peer's, or one of our own)."""
    mine = SharedBuffer.create(100, ME)
    name, token, layout = mine.offer(LAYOUT)
    with pytest.raises(HiveError, match="was not offered to us"):
        SharedBuffer.attach([name, token, layout], 100, OTHER)
    with pytest.raises(HiveError, match="was not offered to us"):
        SharedBuffer.attach([name, "0" * 32, layout], 100, ME)
    buffers = SharedBuffers(ME)
    assert buffers.attach([name, token, "another layout"], 100, LAYOUT) is None  # chunks would straddle
    assert buffers.attach([name, token, layout], 100, LAYOUT) is not None


@pytest.mark.parametrize(
    "offer",
    [
        ["../../etc/passwd", "0" * 32, LAYOUT],
        ["hive-1-zz", "0" * 32, LAYOUT],
        ["hive-12-" + "a" * 31, "0" * 32, LAYOUT],
        ["hive-99999999-" + "a" * 32, "0" * 32, LAYOUT],  # no pid has 8 digits (os.kill would overflow)
        ["hive-12-" + "a" * 32, "zz", LAYOUT],
        "hive-12-" + "a" * 32,
        None,
    ],
)
def test_only_offers_of_shared_buffers_are_opened(directory, offer):
    with pytest.raises(HiveError, match="is not"):
        SharedBuffer.attach(offer, 10, ME)


def test_a_file_others_may_open_or_not_ours_or_a_link_is_not_mapped(directory):
    buffer = SharedBuffer.create(64, ME)
    path = directory / buffer.name
    os.chmod(path, 0o640)
    with pytest.raises(HiveError, match="not a file of our own user"):
        SharedBuffer.attach(buffer.offer(LAYOUT), 64, ME)
    os.chmod(path, 0o600)
    if os.getuid() == 0:  # root can give it away: then it is another user's
        os.chown(path, 12345, -1)
        with pytest.raises(HiveError, match="not a file of our own user"):
            SharedBuffer.attach(buffer.offer(LAYOUT), 64, ME)
        os.chown(path, 0, -1)
    alias = f"hive-{os.getpid()}-{'b' * 32}"
    os.link(path, directory / alias)  # a second name for it: refused, by either name
    with pytest.raises(HiveError, match="not a file of our own user"):
        SharedBuffer.attach(buffer.offer(LAYOUT), 64, ME)
    os.unlink(directory / alias)
    os.symlink(path, directory / alias)
    with pytest.raises(HiveError, match="cannot open"):
        SharedBuffer.attach([alias, *buffer.offer(LAYOUT)[1:]], 64, ME)
    assert SharedBuffer.attach(buffer.offer(LAYOUT), 64, ME).capacity == 64


def test_without_room_for_a_buffer_the_peers_stay_on_the_stream_and_say_so_once(directory, monkeypatch, caplog):
    monkeypatch.setattr(sharedmem, "DIRECTORY", str(directory / "missing"))
    buffers = SharedBuffers(ME)
    with caplog.at_level(logging.INFO, logger="hivecli.averaging.sharedmem"):
        assert buffers.get(("recv", "a"), 100, OTHER) is None
        assert buffers.get(("recv", "b"), 100, OTHER) is None  # not tried again at once
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "loopback TCP, not shared memory" in lines[0] and "missing" in lines[0]
    monkeypatch.setattr(sharedmem, "DIRECTORY", str(directory))
    monkeypatch.setattr(sharedmem.time, "monotonic", lambda: 1e9)  # a while later: tried again
    assert buffers.get(("recv", "b"), 100, OTHER) is not None


def test_our_buffers_take_at_most_half_the_free_space_together(directory, monkeypatch):
    free = 100 * 4096  # as statvfs sees it, our own buffers' space already taken out
    monkeypatch.setattr(
        os, "statvfs", lambda path: os.statvfs_result((4096, 4096, 1000, free // 4096, free // 4096, 0, 0, 0, 0, 255))
    )
    buffers = SharedBuffers(ME)
    assert buffers.get("a", 40 * 4096, OTHER) is not None
    free -= 40 * 4096
    assert buffers.get("b", 11 * 4096, OTHER) is None  # 51 of 100 pages: more than half
    monkeypatch.setattr(sharedmem.time, "monotonic", lambda: 1e9)
    assert buffers.get("b", 10 * 4096, OTHER) is not None  # 50 of 100


def test_files_nobody_holds_are_removed_every_few_seconds(directory, monkeypatch):
    code = (
        "import sys; from hivecli.averaging import sharedmem as s; s.DIRECTORY = sys.argv[1]; "
        "b = s.SharedBuffer.create(10, b'x'); print(b.name); b._finalizer.detach()"  # killed, as it were
    )
    gone = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True, check=True)
    orphan = directory / gone.stdout.strip()
    buffers = SharedBuffers(ME)
    alive = buffers.get("a", 10, OTHER)  # we hold its lock
    other = directory / "something-else"
    other.write_bytes(b"x")
    assert orphan.exists()  # too young to tell from one whose creator has not locked it yet
    later = time.monotonic() + sharedmem.ORPHAN_AGE_S + 1
    monkeypatch.setattr(sharedmem, "ORPHAN_AGE_S", 0.0)  # the file is old enough by then
    monkeypatch.setattr(sharedmem.time, "monotonic", lambda: later)
    buffers.end_round()  # a round ends a while later: the files nobody holds go
    assert not orphan.exists() and (directory / alive.name).exists() and other.exists()


def test_a_round_keeps_at_most_twice_the_buffers_it_used_the_latest_first(directory):
    buffers = SharedBuffers(ME)
    first = {key: buffers.get(("recv", key), 100, OTHER) for key in "abcd"}
    buffers.end_round()
    assert buffers.get(("recv", "a"), 50, OTHER) is first["a"]  # kept, and large enough: the same file
    assert buffers.get(("recv", "a"), 200, OTHER) is not first["a"]  # grown: a new file, the old one removed
    buffers.end_round()  # one used: two kept, the most recent
    assert len(os.listdir(directory)) == 2
    buffers.clear()
    assert os.listdir(directory) == []


def test_a_peer_that_could_not_share_memory_is_not_offered_it_for_a_while(monkeypatch):
    buffers = SharedBuffers(ME)
    assert buffers.usable("peer")
    buffers.refuse("peer")
    assert not buffers.usable("peer") and buffers.usable("another")
    monkeypatch.setattr(sharedmem.time, "monotonic", lambda: 1e9)
    assert buffers.usable("peer")


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


def test_peers_on_one_host_average_through_shared_memory_and_remove_its_files(monkeypatch):
    from hivecli.averaging import matchmaking

    turns = itertools.count()
    monkeypatch.setattr(  # the members' order flips from round to round: with an odd total, so do the spans
        matchmaking.random,
        "shuffle",
        lambda members: members.sort(key=lambda m: str(m.peer_id), reverse=next(turns) % 2),
    )
    torch.manual_seed(1)
    inputs = [torch.randn(200_001) for _ in range(2)]
    before = our_files()
    with local_swarm(2, **DHT_FAST) as dhts:
        shared, files = average_twice(dhts, inputs, prefix="shm")
        streamed, no_files = average_twice(dhts, inputs, prefix="noshm", shared_memory=False)
    assert streamed == [2 * 2 * 200_001 * 4 // 2] * 2  # per round, the other's part of our span and its averages
    assert shared == [0, 0]  # every chunk went through shared memory, whichever span was larger
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


# ---- published averages ---------------------------------------------------------------------


def test_a_published_buffer_takes_chunks_only_as_written_there():
    """A sender reads a reducer's published averages where they are: a chunk that comes with a
    body is refused, and nothing is ever written into the reducer's buffer."""
    from hivecli.averaging.buffers import BufferPool, ChunkedBuffer
    from hivecli.averaging.compression import NoCompression
    from hivecli.averaging.partition import Layout

    chunks = Layout([8]).chunks(0, 8, 4)
    results = ChunkedBuffer(BufferPool(), "k", chunks, NoCompression())
    published = torch.arange(8, dtype=torch.float32).view(torch.uint8).clone()
    results.read_from(published)
    assert results.sink([0, None], 16) is None
    with pytest.raises(ValueError, match="came with a body"):
        results.place(0, [0, None], bytes(16))
    assert torch.equal(results.place(0, [0, None, sharedmem.SHM], b""), torch.arange(4, dtype=torch.float32))
    assert torch.equal(published.view(torch.float32), torch.arange(8, dtype=torch.float32))  # untouched


def test_a_published_buffer_is_read_only_as_its_publishers_and_never_written_into(directory):
    """A reader learns a published buffer's name and token, and may be of another user: offered
    back as a buffer to write into (to its publisher, or to anyone), or as another peer's
    published buffer, it is refused, even where the mapping is cached already."""
    published = SharedBuffer.create(100, ME, published=True)
    offer = published.offer(LAYOUT)
    reader = SharedBuffers(OTHER)
    assert reader.attach(offer, 100, LAYOUT, publisher=ME) is not None  # as ME's published averages
    assert reader.attach(offer, 100, LAYOUT) is None  # cached, but not as a buffer to write into
    assert reader.attach(offer, 100, LAYOUT, publisher=b"third" * 7) is None  # nor as another's
    for me in (ME, OTHER):
        with pytest.raises(HiveError, match="was not offered to us"):
            SharedBuffer.attach(offer, 100, me)
    publisher = SharedBuffers(ME)
    own = publisher.get(("avg", 0), 100, ME, published=True)
    assert publisher.attach(own.offer(LAYOUT), 100, LAYOUT) is None  # one of our own: never
    assert publisher.attach(own.offer(LAYOUT), 100, LAYOUT, publisher=ME) is None
    writable = SharedBuffer.create(100, OTHER)  # a buffer OTHER may write into is no published one
    assert reader.attach(writable.offer(LAYOUT), 100, LAYOUT) is not None
    assert reader.attach(writable.offer(LAYOUT), 100, LAYOUT, publisher=OTHER) is None
    publisher.clear()
    for buffer in (published, writable):
        buffer.free()


@pytest.fixture
def publishing(monkeypatch):
    """Every published buffer a sender maps, recorded: (round, reader, reducer, the buffer's name)."""
    from hivecli.averaging import allreduce

    mapped = []
    read_published = allreduce.AllReduceRunner._read_published

    def spy(self, connection, offer, results):
        readable = read_published(self, connection, offer, results)
        if readable:
            mapped.append((self.group.group_id, self.host.peer_id, connection.remote_peer, offer[0]))
        return readable

    monkeypatch.setattr(allreduce.AllReduceRunner, "_read_published", spy)
    return mapped


@contextlib.contextmanager
def three_peers(prefix, seed, **settings):
    """Three averagers on one host, of 30,000 random floats each: yields them and their inputs."""
    torch.manual_seed(seed)
    inputs = [torch.randn(30_000) for _ in range(3)]
    with (
        local_swarm(3, **DHT_FAST) as dhts,
        averagers(dhts, [[t.clone()] for t in inputs], prefix=prefix, **FAST, **settings) as avs,
    ):
        yield avs, inputs


def hold_the_mean(avs, inputs):
    for av in avs:
        torch.testing.assert_close(snapshot(av)[0], sum(inputs) / 3, rtol=0, atol=1e-6)


def test_a_reducer_with_several_readers_publishes_its_averages_once(publishing):
    """3 peers on one host: each reducer writes its averages into one buffer, which both of its
    senders read; it alternates between two such buffers from round to round."""
    before = our_files()
    with three_peers("pub", 3, chunk_bytes=16384) as (avs, inputs):
        for _ in range(3):
            run_round(avs)
        hold_the_mean(avs, inputs)
        assert all(av.bytes_received == 0 for av in avs)  # every chunk through shared memory
        rounds = list(dict.fromkeys(group for group, *_ in publishing))
        assert len(rounds) == 3 and len(publishing) == 3 * 6  # each peer read 2 reducers' averages a round
        names = {}  # (round, reducer) -> the names its readers mapped
        for group, _, reducer, name in publishing:
            names.setdefault((rounds.index(group), reducer), set()).add(name)
        assert all(len(found) == 1 for found in names.values())  # one buffer for both readers
        for av in avs:
            first, second, third = (names[(r, av.peer_id)] for r in range(3))
            assert first != second and first == third  # two buffers, by the parity of the rounds
        assert len(our_files() - before) == 3 * (2 + 2 + 2)  # parts, own averages' offers, 2 published
    assert our_files() == before


def test_a_reducer_ends_its_round_only_once_its_readers_copied_their_averages_out(publishing, monkeypatch):
    """A reader says it is done with a published buffer (its END) only after copying its
    averages into its tensors, and the reducer waits for that before its round may end."""
    from hivecli.averaging import allreduce

    events = []
    apply, answer = allreduce.AllReduceRunner._apply, allreduce.AllReduceRunner._answer_audit_or_end

    def slow_apply(self, chunks, results):
        time.sleep(0.2)  # a slow copy: without the wait, the reducer would be done before it
        apply(self, chunks, results)
        reducer = next(j for j, (lo, _) in enumerate(self.spans) if lo == chunks[0].start)
        events.append(("copied", self.host.peer_id, self.group.members[reducer].peer_id, time.monotonic()))

    async def recorded(self, stream, sender, reads_published):
        await answer(self, stream, sender, reads_published)
        events.append(("served", self.group.members[sender].peer_id, self.host.peer_id, time.monotonic()))

    monkeypatch.setattr(allreduce.AllReduceRunner, "_apply", slow_apply)
    monkeypatch.setattr(allreduce.AllReduceRunner, "_answer_audit_or_end", recorded)
    with three_peers("wait", 4) as (avs, inputs):
        run_round(avs)
        hold_the_mean(avs, inputs)
    copied = {(reader, reducer): at for kind, reader, reducer, at in events if kind == "copied"}
    served = {(reader, reducer): at for kind, reader, reducer, at in events if kind == "served"}
    assert len(publishing) == 6 and copied.keys() == served.keys() and len(served) == 6
    assert all(served[pair] >= copied[pair] for pair in served)


def test_a_reducer_without_a_buffer_for_a_part_still_publishes_the_averages(publishing, monkeypatch):
    """A reducer that could not make a buffer for one sender's part answers it {"shm": None,
    "avg": offer}: that sender sends its part on the stream, and still reads its averages in the
    published buffer."""
    from hivecli.averaging import allreduce
    from hivecli.averaging.buffers import BufferPool, ChunkedBuffer

    part_buffer = allreduce.AllReduceRunner._part_buffer
    unshared = []  # (reducer, sender) pairs without a shared buffer for the part

    def without_room(self, sender, stream, request):
        if (self.host.peer_id, stream.remote_peer) in unshared:
            return ChunkedBuffer(BufferPool(), None, self.my_chunks, self.codec)
        return part_buffer(self, sender, stream, request)

    monkeypatch.setattr(allreduce.AllReduceRunner, "_part_buffer", without_room)
    with three_peers("noroom", 7) as (avs, inputs):
        unshared.append((avs[0].peer_id, avs[1].peer_id))
        run_round(avs)
        hold_the_mean(avs, inputs)
        assert (avs[1].peer_id, avs[0].peer_id) in {(reader, reducer) for _, reader, reducer, _ in publishing}
        assert avs[0].bytes_received > 0  # avs[1]'s part came on the stream


def test_older_senders_and_readers_that_cannot_map_get_their_averages_the_old_ways(publishing, monkeypatch, caplog):
    """A sender of step 9 and earlier does not say "read": its reducers write into its own
    buffer as before. A reader that cannot map a published buffer keeps its local values for
    that span once (its part still counts), and takes the stream with that reducer from then on."""
    from hivecli.averaging import allreduce

    caplog.set_level(logging.INFO, logger="hivecli.averaging")
    request, attach = allreduce.AllReduceRunner._request, SharedBuffers.attach
    old, blind = [], []  # a peer of step 9; (reader, reducer) whose published buffer it cannot map

    def older(self, span_bytes, shared):
        sent = request(self, span_bytes, shared)
        if self.host.peer_id in old:
            sent.pop("read", None)
        return sent

    def cannot_map(self, offer, nbytes, layout, publisher=None):
        return None if (self.me, publisher) in blind else attach(self, offer, nbytes, layout, publisher)

    monkeypatch.setattr(allreduce.AllReduceRunner, "_request", older)
    monkeypatch.setattr(SharedBuffers, "attach", cannot_map)
    with three_peers("old", 5) as (avs, inputs):
        old.append(avs[0].peer_id)
        blind.append((avs[1].peer_id.to_bytes(), avs[2].peer_id.to_bytes()))
        run_round(avs)
        readers = {(reader, reducer) for _, reader, reducer, _ in publishing}
        # avs[2] reads avs[1]'s too, unless avs[1] had refused it shared memory before serving it
        first = {(avs[1].peer_id, avs[0].peer_id), (avs[2].peer_id, avs[0].peer_id)}
        assert readers - {(avs[2].peer_id, avs[1].peer_id)} == first
        assert len(named(caplog, "we cannot map the shared buffer it publishes")) == 1
        hold_the_mean([avs[0], avs[2]], inputs)  # avs[1]'s part of every span counted
        run_round(avs)  # avs[1] takes the stream with avs[2] now: every peer ends with the same values
        assert avs[1].bytes_received > 0
        assert all(torch.equal(snapshot(av)[0], snapshot(avs[0])[0]) for av in avs)


def named(caplog, fragment):
    return [r for r in caplog.records if fragment in r.getMessage()]


# ---- state downloads from a donor's published snapshot (state.py) ------------------------------


def test_a_published_snapshot_is_read_into_our_memory_only_as_its_publishers(directory):
    """A downloader reads a donor's snapshot with preadv, without mapping it; the file must name
    the offering donor as its publisher: a buffer to write into, or another's, is refused."""
    published = SharedBuffer.create(1000, ME, published=True)
    published.region(1000)[:] = torch.arange(1000) % 251
    reader = sharedmem.PublishedReader.open(published.offer(LAYOUT), 1000, ME)
    into = torch.zeros(600, dtype=torch.uint8)
    reader.readinto(memoryview(into.numpy()), 400)
    assert torch.equal(into, torch.arange(400, 1000) % 251)
    with pytest.raises(HiveError, match="ends before byte 1001"):
        reader.readinto(memoryview(bytearray(2)), 999)
    reader.close()
    with pytest.raises(HiveError, match="was not offered to us"):
        sharedmem.PublishedReader.open(published.offer(LAYOUT), 1000, OTHER)  # not OTHER's
    writable = SharedBuffer.create(1000, ME)
    with pytest.raises(HiveError, match="was not offered to us"):
        sharedmem.PublishedReader.open(writable.offer(LAYOUT), 1000, ME)  # a writer's, not published
    with pytest.raises(HiveError, match="holds 1000 bytes, we need 1001"):
        sharedmem.PublishedReader.open(published.offer(LAYOUT), 1001, ME)
    os.chmod(directory / published.name, 0o640)
    with pytest.raises(HiveError, match="not a file of our own user"):
        sharedmem.PublishedReader.open(published.offer(LAYOUT), 1000, ME)
    for buffer in (published, writable):
        buffer.free()


class StateHolder(DecentralizedAverager):
    """Averages one float and shares `state` (any dtypes: a model and its optimizer's counters)."""

    def __init__(self, state, *args, **kwargs):
        self.state = state
        super().__init__([torch.zeros(1)], *args, **kwargs)

    def get_current_state(self):
        return {"step": 3}, self.state


@contextlib.contextmanager
def donor_and_newcomers(prefix, state, newcomers=1, **settings):
    """A donor of `state` and `newcomers` peers that share no state of their own, on one host."""
    with local_swarm(1 + newcomers, **DHT_FAST) as dhts, contextlib.ExitStack() as stack:
        donor = stack.enter_context(StateHolder([t.clone() for t in state], dhts[0], prefix=prefix, **settings))
        others = [
            stack.enter_context(
                StateHolder(
                    [torch.zeros_like(t) for t in state], dht, prefix=prefix, allow_state_sharing=False, **settings
                )
            )
            for dht in dhts[1:]
        ]
        wait_for(lambda: str(donor.peer_id) in declared_donors(dhts[1], prefix), 10, "the donor's declaration")
        yield donor, others


def odd_state():
    """Tensors of several dtypes and sizes that are not multiples of 64 bytes (the file aligns them)."""
    torch.manual_seed(11)
    return [
        torch.randn(1_500_001),
        torch.randn(3, 7, dtype=torch.float64),
        torch.empty(0),
        torch.randn(5).to(torch.bfloat16),
        torch.arange(13, dtype=torch.int64),
        torch.tensor([True, False, True]),
    ]


def test_a_newcomer_reads_the_donors_published_snapshot_into_its_model(monkeypatch):
    state = odd_state()
    read = []
    readinto = sharedmem.PublishedReader.readinto

    def counted(self, view, offset):
        read.append(len(view))
        return readinto(self, view, offset)

    monkeypatch.setattr(sharedmem.PublishedReader, "readinto", counted)
    with donor_and_newcomers("pubstate", state) as (_, (newcomer,)):
        model = [torch.zeros_like(t) for t in state]
        addresses = [t.data_ptr() for t in model if t.numel()]
        metadata, placed = newcomer.load_state_from_peers(timeout=30, into=model)
        assert metadata == {"step": 3} and [t.data_ptr() for t in placed if t.numel()] == addresses
        for got, want in zip(model, state, strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want)
        assert sum(read) == sum(t.numel() * t.element_size() for t in state)
        assert max(read) <= 4 << 20  # read and checked a cache's worth at a time


def test_a_newcomer_that_cannot_open_the_published_snapshot_gets_it_on_the_stream(monkeypatch, caplog):
    state = odd_state()

    def cannot(*args):
        raise HiveError("no /dev/shm in this namespace")

    monkeypatch.setattr(sharedmem.PublishedReader, "open", cannot)
    caplog.set_level(logging.DEBUG, logger="hivecli.averaging.state")
    with donor_and_newcomers("blindstate", state) as (_, (newcomer,)):
        _, tensors = newcomer.load_state_from_peers(timeout=30)
        for got, want in zip(tensors, state, strict=True):
            assert torch.equal(got, want)
        assert any("no /dev/shm in this namespace" in r.getMessage() for r in caplog.records)


@contextlib.contextmanager
def first_reader_held(monkeypatch):
    """The first PublishedReader that reads stops after its first piece until `release` is set
    (`held` is set once it waits there)."""
    import threading

    held, release, first = threading.Event(), threading.Event(), []
    readinto = sharedmem.PublishedReader.readinto

    def slowly(self, view, offset):
        if not first:
            first.append(self)
        if self is first[0] and offset > 0:
            held.set()
            assert release.wait(30)
        return readinto(self, view, offset)

    monkeypatch.setattr(sharedmem.PublishedReader, "readinto", slowly)
    try:
        yield held, release
    finally:
        release.set()


@pytest.mark.parametrize("quiet", [False, True], ids=["reading", "gone-quiet"])
def test_a_reader_always_gets_one_whole_snapshot_and_others_the_newest_they_can(monkeypatch, quiet):
    """While a download reads the published snapshot, the donor does not copy into it again: a
    download that comes meanwhile gets that same snapshot. One that goes quiet for longer
    than the donor waits (LINK_TIMEOUT) may still read it: the donor's next copy goes into a
    new file, and the quiet one still reads the old snapshot whole."""
    from concurrent.futures import ThreadPoolExecutor

    from hivecli.averaging import state as statemod

    monkeypatch.setattr(statemod, "LINK_TIMEOUT", 0.5 if quiet else 60.0)
    state = [torch.randn(3_000_000)]  # 12 MB: three pieces
    with (
        first_reader_held(monkeypatch) as (held, release),
        donor_and_newcomers("heldstate", state, newcomers=3) as (donor, (first, second, third)),
        ThreadPoolExecutor(1) as pool,
    ):
        loading = pool.submit(first.load_state_from_peers, timeout=60)
        assert held.wait(30)
        server = donor._state_server
        if quiet:  # a peek across threads, of a flag
            wait_for(lambda: server._file_retired, 10, "the donor to give up waiting for the reader")
        with donor.shared_state.lock:
            donor.state[0].add_(1.0)
        _, meanwhile = second.load_state_from_peers(timeout=30)
        release.set()
        _, held_back = loading.result(timeout=30)
        assert torch.equal(held_back[0], state[0])  # one whole snapshot, never a mix
        assert torch.equal(meanwhile[0], state[0] + 1.0 if quiet else state[0])
        _, after = third.load_state_from_peers(timeout=30)
        assert torch.equal(after[0], state[0] + 1.0)


def test_a_donor_that_misstates_its_progress_is_refused(monkeypatch, caplog):
    from hivecli.averaging import state as statemod

    async def overstated(self, stream, snapshot, total):
        await stream.send({"copied": total + 1})
        await stream.recv(timeout=5)

    monkeypatch.setattr(statemod.StateServer, "_tell_progress", overstated)
    caplog.set_level(logging.INFO, logger="hivecli.averaging")
    with donor_and_newcomers("liarstate", [torch.randn(1000)]) as (donor, (newcomer,)):
        assert newcomer.load_state_from_peers(timeout=10) is None
        assert donor.peer_id in newcomer.banned_peers
        assert named(caplog, "bytes of its state; expected more than 0 and at most 4000")


def test_a_download_that_fails_keeps_no_file_of_the_donor_open(monkeypatch):
    """A reader holds the donor's snapshot in /dev/shm for as long as its fd is open: a
    download that fails right after opening it must close it."""
    from hivecli.net.connection import Stream

    send, failing = Stream.send, []

    async def fails(self, payload, body=b""):
        if failing and payload == {"shm": True}:
            raise HiveError("the link broke")
        return await send(self, payload, body)

    def held(path):
        names = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                names.append(os.readlink(f"/proc/self/fd/{fd}"))
        return names.count(path)

    monkeypatch.setattr(Stream, "send", fails)
    with donor_and_newcomers("failstate", [torch.randn(1000)]) as (donor, (newcomer,)):
        assert newcomer.load_state_from_peers(timeout=5) is not None
        published = donor._state_server._file  # a peek across threads: the donor published its copy
        assert published is not None
        path = os.path.join(sharedmem.DIRECTORY, published.name)
        donors_own = held(path)  # its lock, and its mapping's
        failing.append(True)
        assert newcomer.load_state_from_peers(timeout=5) is None
        assert held(path) == donors_own
