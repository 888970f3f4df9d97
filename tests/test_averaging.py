"""Decentralized averaging through its public API: real DHT peers on loopback TCP, in one process.

Every peer runs its own event loop thread, so steps really run concurrently. Tests wait on
conditions with deadlines (`wait_for`, `result(timeout=...)`) and never sleep and hope.
"""

import asyncio
import contextlib
import gc
import itertools
import logging
import math
import random
import sys
import threading
import time
from concurrent.futures import CancelledError

import pytest
import torch

from hivecli import DHT, ConfigError
from hivecli._exceptions import AllreduceError, MatchmakingError
from hivecli.averaging import DecentralizedAverager, Stage, channel, load_balance, matchmaking, pacing
from hivecli.averaging.compression import AutoCompression
from hivecli.averaging.group import GroupInfo, Member
from hivecli.averaging.link import AUTO_BULK_MIN_RATE, RoundPlan, spans_take_bulk_links
from hivecli.averaging.partition import Layout
from hivecli.averaging.settings import PACING_SHARE
from hivecli.averaging.sharedmem import PublishedReader
from hivecli.averaging.slices import SliceWorkers
from hivecli.dht.records import owned_entries
from hivecli.net.bulk import BulkLinks
from hivecli.net.connection import Connection
from hivecli.net.transport import SendStats
from hivecli.testing import local_swarm, redeemed_bulk_links, wait_for

DHT_FAST = {"wait_timeout": 1.0}
FAST = {"min_matchmaking_time": 2.0, "request_timeout": 1.0}
ROOMY = {
    "min_matchmaking_time": 10.0,
    "request_timeout": 1.0,
}  # a head start margin of 1 s, for timing on busy machines


@contextlib.contextmanager
def averagers(dhts, tensor_sets, **kwargs):
    """One started averager per DHT, shut down on exit whatever happens."""
    avs = []
    try:
        for dht, tensors in zip(dhts, tensor_sets, strict=True):
            avs.append(DecentralizedAverager(tensors, dht, start=True, **kwargs))
        yield avs
    finally:
        for av in avs:
            av.shutdown()


def run_round(avs, weights=None, gathers=None, order=None, timeout=30.0):
    """Start a step on every averager (in `order`) and wait for all of them."""
    weights = weights or [1.0] * len(avs)
    gathers = gathers if gathers is not None else list(range(len(avs)))
    order = order or list(range(len(avs)))
    controls = {}
    for i in order:
        controls[i] = avs[i].step(wait=False, weight=weights[i], gather=gathers[i], timeout=timeout)
    return [controls[i].result(timeout=timeout + 30) for i in range(len(avs))]


def snapshot(av):
    with av.get_tensors() as tensors:
        return [t.clone() for t in tensors]


def flat(tensors):
    return torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])


def declared_donors(dht, prefix):
    """{peer id text: [priority, addrs]} of the live state-sharing declarations under `prefix`."""
    found = dht.get(f"{prefix}.all_averagers", latest=True)
    return {str(owner): value for owner, value, _ in owned_entries(found) if value is not None}


# ---- plain averaging --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shapes", "chunk_bytes"),
    [([(123,), (3,)], 8 * 1024 * 1024), ([(5000,), (3,), (2, 3, 4)], 4096)],
    ids=["one-chunk", "many-chunks"],
)
def test_group_of_four_gets_the_exact_mean_and_everyone_gathers(shapes, chunk_bytes):
    torch.manual_seed(0)
    with local_swarm(4, **DHT_FAST) as dhts:
        inputs = [[torch.randn(*shape) for shape in shapes] for _ in dhts]
        expected = [torch.stack([peer[k] for peer in inputs]).mean(0) for k in range(len(shapes))]
        local = [[t.clone() for t in peer] for peer in inputs]
        with averagers(dhts, local, prefix="mean4", target_group_size=4, chunk_bytes=chunk_bytes, **FAST) as avs:
            gathers = [{"rank": i, "loss": 0.5 * i} for i in range(4)]
            results = run_round(avs, gathers=gathers)
            everyone = {dht.peer_id: gathers[i] for i, dht in enumerate(dhts)}
            for result in results:
                assert result == everyone
                assert list(result) == list(results[0])  # every member sees the same group order
            for av in avs:
                for got, want in zip(snapshot(av), expected, strict=True):
                    assert got.shape == want.shape
                    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            # the averager works in place on the tensors it was given
            for peer in local:
                for got, want in zip(peer, expected, strict=True):
                    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_senders_first_chunks_land_in_the_reducers_buffer_when_its_runner_is_set_up(monkeypatch):
    """The first chunks follow a part request at once, before the stream's handler runs: where
    the reducer's runner is registered by then, they land in its buffer
    (AllReduceRunner.prepare_sender) instead of in fresh bytes that are copied there later.
    Here every sender waits until its reducer's runner is registered, so all of them land."""
    from hivecli.averaging import allreduce

    landed, copied = [], []
    place, exchange = allreduce.ChunkedBuffer.place, allreduce.AllReduceRunner._exchange_with
    by_peer = {}

    def spy(self, expected, payload, body):
        if expected == 0:
            (landed if self.sunk[0] is not None and body is self.sunk[0] else copied).append(self.offsets[-1])
        return place(self, expected, payload, body)

    async def after_the_reducer_registers(self, j):
        reducer = by_peer[self.group.members[j].peer_id]
        deadline = asyncio.get_running_loop().time() + 10
        while reducer._registry.registered(self.group.group_id) is None:
            assert asyncio.get_running_loop().time() < deadline, "the reducer never registered its runner"
            await asyncio.sleep(0.001)
        await exchange(self, j)

    monkeypatch.setattr(allreduce.ChunkedBuffer, "place", spy)
    monkeypatch.setattr(allreduce.AllReduceRunner, "_exchange_with", after_the_reducer_registers)
    torch.manual_seed(1)
    with local_swarm(2, **DHT_FAST) as dhts:
        inputs = [[torch.randn(3000)] for _ in dhts]
        # on the stream: shared memory has no sink to land in (test_sharedmem.py)
        local = [[t.clone() for t in peer] for peer in inputs]
        with averagers(dhts, local, prefix="landed", shared_memory=False, **FAST) as avs:
            by_peer.update({av.dht.peer_id: av for av in avs})
            for _ in range(3):
                expected = torch.stack([snapshot(av)[0] for av in avs]).mean(0)
                run_round(avs)
                for av in avs:
                    torch.testing.assert_close(snapshot(av)[0], expected, rtol=0, atol=1e-6)
    # per round, two parts and two averages, each of one chunk (the parts sent before "ready")
    assert (len(landed), copied) == (3 * 4, [])


def test_weighted_average_with_uneven_bandwidths():
    torch.manual_seed(1)
    weights = [1.0, 2.0, 0.5, 3.0]
    bandwidths = [1.0, None, 3.0, 0.5]  # uneven spans: the result must not depend on who reduces what
    with local_swarm(4, **DHT_FAST) as dhts:
        inputs = [[torch.randn(1000), torch.randn(3)] for _ in dhts]
        expected = [sum(w * peer[k] for w, peer in zip(weights, inputs, strict=True)) / sum(weights) for k in range(2)]
        avs = []
        try:
            for dht, peer, bandwidth in zip(dhts, inputs, bandwidths, strict=True):
                avs.append(
                    DecentralizedAverager(
                        [t.clone() for t in peer],
                        dht,
                        prefix="weighted",
                        target_group_size=4,
                        bandwidth=bandwidth,
                        chunk_bytes=4096,
                        start=True,
                        **FAST,
                    )
                )
            run_round(avs, weights=weights)
            for av in avs:
                for got, want in zip(snapshot(av), expected, strict=True):
                    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        finally:
            for av in avs:
                av.shutdown()


@pytest.mark.parametrize("bulk_links", ["none", "all"])
def test_the_data_plane_runs_torch_ops_on_one_openmp_thread(monkeypatch, bulk_links):
    """Checks and reductions run on the DHT's thread and on bulk links' receiving threads, each
    on one OpenMP thread (hivecli.cores: a team per thread spins and starves other peers), while
    the calling thread keeps its own count."""
    from hivecli.averaging import allreduce

    torch.set_num_threads(2)  # what the training thread uses; OpenMP honours it even on one core
    seen = set()
    check = allreduce.all_finite

    def recording(tensor):
        seen.add((threading.current_thread().name.split("_")[0], torch.get_num_threads()))
        return check(tensor)

    monkeypatch.setattr(allreduce, "all_finite", recording)
    with local_swarm(2, **DHT_FAST) as dhts:
        inputs = [torch.randn(600_000) for _ in dhts]
        with averagers(  # bulk links between hosts, as shared memory on one host would take their place
            dhts, [[t.clone()] for t in inputs], prefix="threads", bulk_links=bulk_links, shared_memory=False, **FAST
        ) as avs:
            run_round(avs)
            torch.testing.assert_close(snapshot(avs[0])[0], (inputs[0] + inputs[1]) / 2)
    threads = {name.rsplit("-", 1)[0] if name.startswith("hive-dht") else name for name, _ in seen}
    assert threads == ({"hive-bulk-recv"} if bulk_links == "all" else {"hive-dht"})
    assert {count for _, count in seen} == {1}
    assert torch.get_num_threads() == 2


@pytest.fixture
def redeemed():
    """The bulk links this process's hosts accepted during the test (hivecli.testing)."""
    with redeemed_bulk_links() as links:
        yield links


def test_auto_bulk_links_need_the_cores_a_fast_link_and_no_pacing():
    fast, slow = AUTO_BULK_MIN_RATE * 2, 12.5e6  # loopback at 0.6 GB/s; 100 Mbit/s
    assert spans_take_bulk_links(fast, cores=4, paced=False)
    assert not spans_take_bulk_links(None, cores=16, paced=False)  # no round measured the link yet
    assert not spans_take_bulk_links(slow, cores=16, paced=False)
    assert not spans_take_bulk_links(fast, cores=2, paced=False)
    assert not spans_take_bulk_links(fast, cores=16, paced=True)


@pytest.mark.parametrize(
    ("cores", "min_rate", "uplink_mbps", "bulk"),
    [(16, 1.0, None, True), (2, 1.0, None, False), (16, 1e15, None, False), (16, 1.0, 1000.0, False)],
    ids=["many-cores", "two-cores", "slow-link", "paced"],
)
def test_auto_bulk_links_follow_the_machine_and_the_measured_link(
    caplog, monkeypatch, redeemed, cores, min_rate, uplink_mbps, bulk
):
    """bulk_links = "auto" (the default): the first round's spans take the part streams; once a
    round measured the link, spans of 1 MiB or more take bulk links on a machine with the cores
    to drive them and a link at least AUTO_BULK_MIN_RATE fast (`min_rate` here, so that the
    test does not depend on this machine's speed), and never where the uplink is paced. The
    rounds average either way. Each peer says once that its rounds moved to bulk links."""
    caplog.set_level(logging.INFO, logger="hivecli.averaging")
    monkeypatch.setattr("hivecli.averaging.averager.cores_per_peer", lambda: cores)
    monkeypatch.setattr("hivecli.averaging.link.AUTO_BULK_MIN_RATE", min_rate)
    with local_swarm(2, **DHT_FAST) as dhts:
        inputs = [torch.randn(600_000) for _ in dhts]  # spans of 1.2 MB
        local = [[t.clone()] for t in inputs]  # as between hosts: on one host shared memory takes their place
        with averagers(dhts, local, prefix="auto", uplink_mbps=uplink_mbps, shared_memory=False, **FAST) as avs:
            assert all(av.settings.bulk_links == "auto" for av in avs)
            run_round(avs)
            assert not redeemed, "the first round took bulk links before the link was measured"
            run_round(avs)
            for av in avs:
                torch.testing.assert_close(snapshot(av)[0], (inputs[0] + inputs[1]) / 2)
    assert (sum(redeemed) == 2) if bulk else not redeemed  # one link per sender, or none
    said = [r for r in caplog.records if "now send their spans on bulk links" in r.getMessage()]
    assert len(said) == (2 if bulk else 0)


@pytest.mark.parametrize(("cores", "threads"), [(2, 1), (16, 4)])
def test_big_copies_and_reductions_split_across_threads_where_the_peer_has_cores_to_spare(monkeypatch, cores, threads):
    """A round's reductions and copies of spans of a million floats or more run in slices on a
    few threads where the peer has cores to spare (slices.threads_for), and average exactly as
    on one; the threads stop with the averager."""
    monkeypatch.setattr("hivecli.averaging.averager.cores_per_peer", lambda: cores)
    split: list[int] = []
    real_apply = SliceWorkers.apply

    def apply(self: SliceWorkers, op, *tensors):
        split.append(self.count)
        return real_apply(self, op, *tensors)

    monkeypatch.setattr(SliceWorkers, "apply", apply)
    with local_swarm(2, **DHT_FAST) as dhts:
        inputs = [torch.randn(2_500_000) for _ in dhts]  # spans of 1.25M floats
        with averagers(dhts, [[t.clone()] for t in inputs], prefix="slices", **FAST) as avs:
            run_round(avs)
            for av in avs:
                torch.testing.assert_close(snapshot(av)[0], (inputs[0] + inputs[1]) / 2)
                assert av._slices.count == threads
            # each peer: its audit's copy, one reduction and the copy of its averages back, per chunk
            assert split and set(split) == {threads}
    assert not [t for t in threading.enumerate() if t.name.startswith("hive-slices")]


def test_cores_are_counted_again_in_the_background_while_rounds_use_the_last_count(monkeypatch):
    """A peer counts its cores (a scan of the process table) before its first round, and again
    every CORES_RECOUNT_S in the background: a round does not wait for the scan (its group would),
    and uses the last count until the new one lands."""
    machine = {"cores": 16}
    scanning = threading.Event()  # a slow scan: held until set

    def cores_per_peer() -> int:
        if machine["cores"] == 2:
            scanning.wait(30)
        return machine["cores"]

    monkeypatch.setattr("hivecli.averaging.averager.cores_per_peer", cores_per_peer)
    with local_swarm(2, **DHT_FAST) as dhts:
        inputs = [torch.randn(1000) for _ in dhts]
        with averagers(dhts, [[t.clone()] for t in inputs], prefix="recount", **FAST) as avs:
            run_round(avs)
            assert [av._slices.count for av in avs] == [4, 4]  # 16 cores: counted before the first round
            machine["cores"] = 2
            for av in avs:
                av._cores = (av._cores[0] - 3600, av._cores[1])  # an hour old: due again
            run_round(avs)  # while both scans hang
            assert [av._slices.count for av in avs] == [4, 4]
            assert all(av._counting is not None and not av._counting.done() for av in avs)
            scanning.set()
            wait_for(lambda: all(av._cores[1] == 2 for av in avs), 10, "the new counts")
            run_round(avs)
            assert [av._slices.count for av in avs] == [1, 1]
            for av in avs:
                torch.testing.assert_close(snapshot(av)[0], (inputs[0] + inputs[1]) / 2)


def test_pooled_buffers_follow_the_member_order_and_hold_the_model_once_and_a_half(monkeypatch):
    """Member indices change from round to round; each peer keeps one receive and one result
    buffer per other member (and a copy of its own span for audits), not one per index seen."""
    from hivecli.averaging import matchmaking

    turns = itertools.count()
    monkeypatch.setattr(  # whoever leads, the order of the members flips from one round to the next
        matchmaking.random,
        "shuffle",
        lambda members: members.sort(key=lambda m: str(m.peer_id), reverse=next(turns) % 2),
    )
    with local_swarm(2, **DHT_FAST) as dhts:
        inputs = [torch.randn(100_000) for _ in dhts]
        local = [[t.clone()] for t in inputs]  # the pool's buffers: the stream's (test_sharedmem.py: the shared ones)
        with averagers(dhts, local, prefix="pool", chunk_bytes=65536, shared_memory=False, **FAST) as avs:
            orders = set()
            for _ in range(4):
                gathered = run_round(avs)[0]  # {peer id: gather}, in member order
                orders.add(tuple(gathered))
            assert len(orders) == 2  # each peer was member 0 in one round and member 1 in another
            for av in avs:
                torch.testing.assert_close(snapshot(av)[0], (inputs[0] + inputs[1]) / 2)
                assert set(av._pool._buffers) == {("own",), ("recv", 1), ("result", 1)}
                assert sum(b.numel() for b in av._pool._buffers.values()) == 3 * 50_000 * 4


def test_auto_compression_uses_the_codec_its_leader_chose_from_the_link_rate():
    torch.manual_seed(3)
    with local_swarm(3, **DHT_FAST) as dhts:
        inputs = [torch.randn(5000) for _ in dhts]
        local = [[t.clone()] for t in inputs]
        with averagers(dhts, local, prefix="auto", target_group_size=3, compression="auto", **FAST) as avs:
            exact = torch.stack(inputs).mean(0)
            codecs = [av.codec for av in avs]
            assert all(isinstance(codec, AutoCompression) for codec in codecs)

            def errors_after_a_round(link_rate: float | None) -> list[float]:
                for av, peer in zip(avs, inputs, strict=True):
                    with av.get_tensors() as (tensor,):
                        tensor.copy_(peer)
                    av._link.rate = link_rate  # as if measured (a 5,000-float round is too small to)
                run_round(avs)
                return [(snapshot(av)[0] - exact).abs().max().item() for av in avs]

            assert max(errors_after_a_round(None)) < 1e-6  # nothing measured yet: exact
            bound = 2**-11 * exact.abs().max().item() * 2 + 1e-4  # fp16's bound on inputs and averages
            assert all(1e-5 < error < bound for error in errors_after_a_round(1e6))  # 1 MB/s: fp16, everyone
            assert max(errors_after_a_round(1e12)) < 1e-6  # a fast link: exact again
            # a leader that picks a codec "auto" never picks is refused
            with pytest.raises(AllreduceError, match="uniform8bit"):
                avs[0]._round_codec(GroupInfo(b"g" * 20, (), RoundPlan("uniform8bit")))


def test_the_leader_sizes_chunks_for_its_link_and_every_member_follows():
    torch.manual_seed(4)
    with local_swarm(2, **DHT_FAST) as dhts:
        inputs = [torch.randn(300_000) for _ in dhts]
        local = [[t.clone()] for t in inputs]
        with averagers(dhts, local, prefix="chunks", target_group_size=2, **FAST) as avs:
            assert avs[0]._plan_round() == RoundPlan(None, 8 * 2**20)  # nothing measured: the setting
            for av in avs:
                av._link.rate = 10e6  # 10 MB/s: chunks of 0.05 s = 500 kB
                assert av._plan_round().chunk_bytes == 499712
                av._link.rate = 1e3  # never below 256 KiB
                assert av._plan_round().chunk_bytes == 256 * 1024
            run_round(avs)  # 300,000 floats: 5 chunks per span of 150,000 elements
            exact = torch.stack(inputs).mean(0)
            for av in avs:
                torch.testing.assert_close(snapshot(av)[0], exact, rtol=0, atol=1e-6)
    members = (Member(dhts[0].peer_id, (), False, None),)
    for plan in (RoundPlan("fp16", 1 << 20), RoundPlan()):
        assert GroupInfo.from_wire(GroupInfo(b"g" * 20, members, plan).to_wire()).plan == plan
    for bad in ({"chunk_bytes": 1}, {"chunk_bytes": 2**40}, {"codec": 5}, {"x": 1}, [1]):
        with pytest.raises(ValueError, match="plan"):
            GroupInfo.from_wire([b"g" * 20, [members[0].to_wire()], bad])


def test_a_round_paces_each_members_connection_to_its_share_of_the_uplink_and_then_lifts_it(monkeypatch):
    calls = []  # (connection, bytes per second or None), from every peer's thread
    original = Connection.set_max_rate

    def recording(self, rate):
        calls.append((self, rate))
        return original(self, rate)

    monkeypatch.setattr(Connection, "set_max_rate", recording)
    torch.manual_seed(5)
    with local_swarm(3, **DHT_FAST) as dhts:
        inputs = [torch.randn(100_000) for _ in dhts]
        local = [[t.clone()] for t in inputs]
        with averagers(dhts, local, prefix="paced", target_group_size=3, uplink_mbps=80, **FAST) as avs:
            assert not calls  # nothing is paced outside a round
            run_round(avs)
            exact = torch.stack(inputs).mean(0)
            for av in avs:
                torch.testing.assert_close(snapshot(av)[0], exact, rtol=0, atol=1e-6)
    paced = {id(c): c for c, rate in calls if rate is not None}
    # 80 Mbit/s is 10 MB/s; PACING_SHARE of it, shared by the connections to the 2 other members
    assert {rate for _, rate in calls if rate is not None} == {10e6 * PACING_SHARE / 2}
    # every peer paced its connections to both others: 3 x 2 connection ends, each lifted once the round ended
    assert len(paced) == 6
    assert sorted(str(c.remote_peer) for c in paced.values()) == sorted(2 * [str(d.peer_id) for d in dhts])
    last = {id(c): rate for c, rate in calls}
    assert all(last[key] is None for key in paced)


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_auto_pacing_paces_the_rounds_after_one_that_lost_bytes_to_the_rate_it_measured(monkeypatch, mode):
    # loopback loses nothing and its rounds last milliseconds: the connections report TCP counters
    # of a link that acknowledges RATE bytes/s on each connection and retransmits 1% of them, and
    # the sampler's windows shrink to fit a round
    rate, start = 50e6, time.monotonic()

    def lossy_link(self):
        acked = int(rate * (time.monotonic() - start))
        return SendStats(acked, acked // 100, 1)  # never done sending: the link sets the pace

    calls = []  # (connection, bytes per second or None)
    original = Connection.set_max_rate

    def recording(self, value):
        calls.append((self, value))
        return original(self, value)

    monkeypatch.setattr(Connection, "send_stats", lossy_link)
    monkeypatch.setattr(Connection, "set_max_rate", recording)
    monkeypatch.setattr(pacing, "SAMPLE_S", 0.001)  # a round needs only 7 ms of samples (even on a fast machine)
    monkeypatch.setattr(pacing, "WINDOW_S", 0.004)
    monkeypatch.setattr(pacing, "MIN_WINDOWS", 3)
    monkeypatch.setattr(pacing, "probes", lambda group_id: False)  # a round that probes sends faster (test_pacing)
    complete = []  # samplers told that the last part of their peer's span arrived
    monkeypatch.setattr(pacing.RoundSampler, "inputs_arrived", lambda self: complete.append(self))
    torch.manual_seed(6)
    with local_swarm(3, **DHT_FAST) as dhts:
        inputs = [torch.randn(2_000_000) for _ in dhts]
        with averagers(
            dhts, [[t.clone()] for t in inputs], prefix="autopace", target_group_size=3, pacing=mode, **FAST
        ) as avs:
            assert [av.uplink_pace_mbps for av in avs] == [None] * 3  # nothing measured yet
            run_round(avs)
            assert not [value for _, value in calls if value is not None]  # the first round is not paced
            learned = [av.uplink_pace_mbps for av in avs]
            run_round(avs)
            exact = torch.stack(inputs).mean(0)
            for av in avs:
                torch.testing.assert_close(snapshot(av)[0], exact, rtol=0, atol=1e-6)
    paced = [value for _, value in calls if value is not None]
    if mode == "off":
        assert learned == [None] * 3 and not paced and not complete  # no sampler
        return
    assert len(complete) == 6 == len({id(sampler) for sampler in complete})  # each peer, each round, once
    # each peer measured its 2 connections together: 2 x RATE (windows that began before its second
    # connection was counted measure less); the next round paced them to a little less, each to its half
    top = 2 * rate * pacing.PACE_GAIN * 8 / 1e6
    assert all(value is not None and top / 2 < value <= top * 1.01 for value in learned), (learned, top)
    assert len(paced) == 6  # 3 peers x 2 connections
    assert all(rate * pacing.PACE_GAIN / 2 < value <= rate * pacing.PACE_GAIN * 1.01 for value in paced), paced


def test_zero_weight_peer_contributes_nothing_but_receives_the_average():
    torch.manual_seed(2)
    weights = [0.0, 1.0, 1.0, 1.0]
    with local_swarm(4, **DHT_FAST) as dhts:
        inputs = [[torch.randn(500)] for _ in dhts]
        expected = torch.stack([peer[0] for peer in inputs[1:]]).mean(0)
        with averagers(
            dhts, [[t.clone() for t in p] for p in inputs], prefix="zero", target_group_size=4, **FAST
        ) as avs:
            run_round(avs, weights=weights)
            for av in avs:
                torch.testing.assert_close(snapshot(av)[0], expected, rtol=0, atol=1e-6)


class PartCounter(DecentralizedAverager):
    """Counts the parts other peers send it to reduce."""

    def __init__(self, *args, **kwargs):
        self.parts_served = 0
        super().__init__(*args, **kwargs)

    async def _serve_part(self, stream, payload, body):
        self.parts_served += 1
        return await super()._serve_part(stream, payload, body)


@pytest.mark.parametrize("client_dht", [False, True], ids=["client-averager", "client-dht"])
def test_client_mode_peer_sends_but_reduces_nothing(client_dht):
    torch.manual_seed(3)
    with local_swarm(3, **DHT_FAST) as dhts:
        address = [str(dhts[0].get_visible_maddrs()[0])]
        with DHT(initial_peers=address, client_mode=client_dht, start=True, **DHT_FAST) as client_node:
            inputs = [[torch.randn(777), torch.randn(2, 2)] for _ in range(4)]
            expected = [torch.stack([peer[k] for peer in inputs]).mean(0) for k in range(2)]
            nodes = [*dhts, client_node]
            avs = []
            try:
                for i, (dht, peer) in enumerate(zip(nodes, inputs, strict=True)):
                    kwargs = {"client_mode": True} if i == 3 and not client_dht else {}
                    avs.append(
                        PartCounter(
                            [t.clone() for t in peer],
                            dht,
                            prefix="clients",
                            target_group_size=4,
                            start=True,
                            chunk_bytes=4096,
                            **FAST,
                            **kwargs,
                        )
                    )
                client = avs[3]
                assert client.client_mode and not client.allow_state_sharing
                results = run_round(avs, gathers=["a", "b", "c", "client"])
                for result in results:
                    assert result == {dht.peer_id: g for dht, g in zip(nodes, ["a", "b", "c", "client"], strict=True)}
                for av in avs:
                    for got, want in zip(snapshot(av), expected, strict=True):
                        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
                # each node reduced a part sent by the 3 others, the client included; nobody sent to the client
                assert [av.parts_served for av in avs] == [3, 3, 3, 0]
                with pytest.raises(ConfigError, match="client-mode"):
                    client.allow_state_sharing = True
            finally:
                for av in avs:
                    av.shutdown()


def hang_lookups(monkeypatch, hangs):
    """Every peer's DHT lookup for candidates counts itself, then hangs (until cancelled) where
    `hangs(peer id, lookups it made so far)` is true. Returns {peer id: lookups made}."""
    from hivecli.averaging import matchmaking

    fetch = matchmaking._Search.fetch_candidates
    lookups: dict[object, int] = {}

    async def counted(self):
        peer = self.mm.peer_id
        lookups[peer] = lookups.get(peer, 0) + 1
        if hangs(peer, lookups[peer]):
            await asyncio.sleep(60)
        return await fetch(self)

    monkeypatch.setattr(matchmaking._Search, "fetch_candidates", counted)
    return lookups


def test_a_full_group_begins_without_waiting_for_the_leaders_own_lookup(monkeypatch):
    """The leader's DHT lookups after its first one hang; the others join it meanwhile, and it
    must begin the round as soon as its group is full, not when the lookup returns."""
    leader = None
    lookups = hang_lookups(monkeypatch, lambda peer, made: peer == leader and made > 1)
    with (
        local_swarm(3, **DHT_FAST) as dhts,
        averagers(
            dhts, [[torch.full((8,), float(i))] for i in range(3)], prefix="begin", target_group_size=3, **FAST
        ) as avs,
    ):
        leader = avs[0].peer_id
        first = avs[0].step(wait=False, timeout=30)
        wait_for(lambda: lookups.get(leader, 0) >= 2, 10, "the leader's second lookup")  # declared, and hanging
        others = [av.step(wait=False, timeout=30) for av in avs[1:]]
        for control in [first, *others]:
            assert len(control.result(timeout=20)) == 3
        for av in avs:
            assert torch.equal(snapshot(av)[0], torch.full((8,), 1.0))


def test_lockstep_rounds_ask_the_last_leader_at_once_and_need_no_lookup(monkeypatch):
    """In a swarm the size of a group, a follower asks its last leader alongside the DHT lookup:
    with every lookup of the second round hanging, the group must still form, led by the same
    peer, and average exactly."""
    from hivecli.averaging import matchmaking

    hang = threading.Event()
    lookups = hang_lookups(monkeypatch, lambda peer, made: hang.is_set())
    with (
        local_swarm(3, **DHT_FAST) as dhts,
        averagers(
            dhts, [[torch.full((8,), float(i))] for i in range(3)], prefix="lockstep", target_group_size=3, **ROOMY
        ) as avs,
    ):
        run_round(avs)
        leaders = [av for av in avs if av._matchmaker._last.joined is None]
        assert len(leaders) == 1
        leader = leaders[0]
        guesses = {av.peer_id: getattr(av._matchmaker.likely_leader(), "peer_id", None) for av in avs}
        assert guesses == {av.peer_id: None if av is leader else leader.peer_id for av in avs}
        assert leader._matchmaker.head_start() == pytest.approx(matchmaking.HEAD_START * ROOMY["min_matchmaking_time"])

        hang.set()
        for av in avs:
            av._matchmaker._looked_up = -math.inf  # the followers' lookouts are due: they look up, and hang
        made = {av.peer_id: lookups.get(av.peer_id, 0) for av in avs}
        first = leader.step(wait=False, timeout=30)
        wait_for(lambda: leader._matchmaker._search is not None, 10, "the leader to look for a group")
        others = [av.step(wait=False, timeout=30) for av in avs if av is not leader]
        for control in [first, *others]:
            assert len(control.result(timeout=20)) == 3
        assert all(lookups[peer] > made[peer] for peer in made)  # each looked up, and hung: no lookup formed it
        assert leader._matchmaker._last.joined is None  # it led again
        for av in avs:
            assert torch.equal(snapshot(av)[0], torch.full((8,), 1.0))

        # The followers start first: the leader holds their requests until it looks (its head
        # start keeps it first), then tells them to ask again, which they do at once.
        asked = count_requests(monkeypatch)
        others = [av.step(wait=False, timeout=30) for av in avs if av is not leader]
        wait_for(lambda: len(leader._matchmaker._held) == 2, 10, "the followers' requests, held by the leader")
        first = leader.step(wait=False, timeout=30)
        for control in [first, *others]:
            assert len(control.result(timeout=20)) == 3
        assert leader._matchmaker._last.joined is None
        again = [(leader.peer_id, matchmaking.ASK_AGAIN), (leader.peer_id, None)]
        assert asked == {av.peer_id: again for av in avs if av is not leader}


def count_requests(monkeypatch):
    """{peer id: [(the peer it asked to join, why that one refused or None)]} from now on."""
    from hivecli.averaging import matchmaking

    try_join = matchmaking._Search.try_join
    asked: dict[object, list] = {}

    async def counted(self, candidate, hold=0.0):
        group = await try_join(self, candidate, hold)
        asked.setdefault(self.mm.peer_id, []).append((candidate.peer_id, self.refusal))
        return group

    monkeypatch.setattr(matchmaking._Search, "try_join", counted)
    return asked


def test_a_held_request_is_refused_once_its_hold_runs_out():
    """A leader that does not look within a request's hold (nor its own head start margin)
    refuses it as not looking: the follower then goes on by itself. Only members of the group
    it led last are held, one request each."""
    from hivecli.averaging import matchmaking
    from hivecli.net.identity import Identity

    with (
        local_swarm(3, **DHT_FAST) as dhts,
        averagers(
            dhts, [[torch.full((4,), float(i))] for i in range(3)], prefix="held", target_group_size=3, **ROOMY
        ) as avs,
    ):
        run_round(avs)
        leader = next(av for av in avs if av._matchmaker._last.joined is None)
        follower = next(av for av in avs if av is not leader)
        mm = leader._matchmaker

        async def ask(hold):
            search = matchmaking._Search(follower._matchmaker, follower._matchmaker._last.me, 1e9, mm.group_key)
            search.new_expiration()
            guess = follower._matchmaker.likely_leader()
            start = asyncio.get_running_loop().time()
            group = await search.try_join(guess, hold=hold)
            return group, search.refusal, asyncio.get_running_loop().time() - start

        margin = mm.head_start_margin()  # 1 s
        group, refusal, took = follower.dht.run_coroutine(lambda _dht, _node: ask(60.0))
        assert group is None and refusal == matchmaking.NOT_LOOKING
        assert margin * 0.9 <= took < margin + 5  # held for the leader's margin, not the asked 60 s
        assert mm._hold_ran_out  # so its next search looks up at once instead of waiting for it
        group, refusal, took = follower.dht.run_coroutine(lambda _dht, _node: ask(0.0))
        assert group is None and refusal == matchmaking.NOT_LOOKING and took < margin  # no hold asked: at once
        assert not mm._held

        async def held(member):  # whether the leader holds a request from `member`
            return await mm._hold(member, {"hold": 60.0})

        stranger = Member(Identity.generate().peer_id, (), False, None)
        assert not leader.dht.run_coroutine(lambda _dht, _node: held(stranger))  # not in its last group
        mm._held.add(follower.peer_id)  # as if a request of the follower's were held already
        try:
            assert not leader.dht.run_coroutine(lambda _dht, _node: held(follower._matchmaker._last.me))
        finally:
            mm._held.discard(follower.peer_id)


def test_lockstep_peers_look_up_the_group_at_most_once_per_lookout_interval(monkeypatch):
    """Back-to-back lockstep rounds: a follower, and the leader, look up the declared peers once
    per LOOKOUT_SHARE of min_matchmaking_time, not every round, and the rounds still form."""
    from hivecli.averaging import matchmaking

    lookups = hang_lookups(monkeypatch, lambda peer, made: False)
    settings = {"target_group_size": 3, "min_matchmaking_time": 30.0, "request_timeout": 1.0}
    with (
        local_swarm(3, **DHT_FAST) as dhts,
        averagers(dhts, [[torch.full((4,), float(i))] for i in range(3)], prefix="lookout", **settings) as avs,
    ):
        run_round(avs)
        leader = next(av for av in avs if av._matchmaker._last.joined is None)
        for av in avs:
            av._matchmaker._looked_up = -math.inf  # as if its last lookup was long ago
        made = {av.peer_id: lookups.get(av.peer_id, 0) for av in avs}
        start = time.monotonic()
        for _ in range(5):
            assert all(len(result) == 3 for result in run_round(avs))
        assert time.monotonic() - start < matchmaking.LOOKOUT_SHARE * 30.0  # all within one interval
        assert leader._matchmaker._last.joined is None  # lockstep throughout
        assert {av.peer_id: lookups[av.peer_id] - made[av.peer_id] for av in avs} == {av.peer_id: 1 for av in avs}


def count_declarations(monkeypatch):
    """{peer id: declarations it stored} for every peer's group searches from now on."""
    from hivecli.averaging import matchmaking

    store = matchmaking._Search.store_declaration
    stored: dict[object, int] = {}

    async def counted(self):
        stored[self.mm.peer_id] = stored.get(self.mm.peer_id, 0) + 1
        return await store(self)

    monkeypatch.setattr(matchmaking._Search, "store_declaration", counted)
    return stored


def test_lockstep_followers_declare_nothing_yet_a_newcomer_finds_the_group(monkeypatch):
    """A follower that its last leader takes at once stores no declaration (two DHT stores per
    round saved): only the leader declares. A newcomer must still find the group through the
    leader's declaration and average in it."""
    torch.manual_seed(5)
    with local_swarm(4, **DHT_FAST) as dhts:
        inputs = [torch.randn(16) for _ in dhts]
        settings = {"target_group_size": 4, "min_matchmaking_time": 1.0, "request_timeout": 0.5}
        with averagers(dhts, [[t.clone()] for t in inputs], prefix="quiet", **settings) as avs:
            first_three = avs[:3]
            run_round(first_three)  # nobody else looks: the group is the swarm, lockstep from now on
            leader = next(av for av in first_three if av._matchmaker._last.joined is None)
            assert all(av._matchmaker.likely_leader() is not None for av in first_three if av is not leader)

            stored = count_declarations(monkeypatch)
            run_round(first_three)
            assert stored == {leader.peer_id: 1}
            assert leader._matchmaker._last.joined is None  # it led again

            results = run_round(avs)  # the newcomer, whom no follower declared for, joins the group
            assert all(len(result) == 4 for result in results)
            expected = torch.stack(inputs).mean(0)
            for av in avs:
                torch.testing.assert_close(snapshot(av)[0], expected, rtol=0, atol=1e-6)


def test_a_lockstep_leader_whose_followers_fill_the_group_declares_nothing(monkeypatch):
    """The last leader's followers ask it at once; where they fill the group within its head
    start, it stores no declaration either (a full group has no room for a newcomer who finds
    one): a lockstep round of a full group stores nothing in the DHT."""
    torch.manual_seed(6)
    with local_swarm(3, **DHT_FAST) as dhts:
        inputs = [torch.randn(16) for _ in dhts]
        settings = {"target_group_size": 3, "min_matchmaking_time": 1.0, "request_timeout": 0.5}
        with averagers(dhts, [[t.clone()] for t in inputs], prefix="full", **settings) as avs:
            run_round(avs)
            leader = next(av for av in avs if av._matchmaker._last.joined is None)
            stored = count_declarations(monkeypatch)
            for _ in range(2):
                run_round(avs)
                assert leader._matchmaker._last.joined is None  # it led again
            assert stored == {}
            assert leader._matchmaker._last.declared_expiration is None  # and withdrew nothing
            for av in avs:
                torch.testing.assert_close(snapshot(av)[0], torch.stack(inputs).mean(0), rtol=0, atol=1e-6)


def test_followers_forget_their_join_streams_without_a_cancel(monkeypatch):
    """The leader's BEGIN is its last word (DATA and END in one frame), so a follower drops
    the join stream without telling it: no CANCEL per follower and round, and no stream left
    behind on either side."""
    from hivecli.net.connection import Stream

    cancelled, cancel = [], Stream.cancel

    async def recorded(self):
        if not (self._local_done and self._remote_done):
            cancelled.append(self.method)
        return await cancel(self)

    monkeypatch.setattr(Stream, "cancel", recorded)
    with local_swarm(3, **DHT_FAST) as dhts:
        inputs = [torch.randn(16) for _ in dhts]
        settings = {"target_group_size": 3, "min_matchmaking_time": 1.0, "request_timeout": 0.5}
        with averagers(dhts, [[t.clone()] for t in inputs], prefix="forget", **settings) as avs:
            for _ in range(3):
                run_round(avs)
            assert not [method for method in cancelled if method.startswith(matchmaking.JOIN_METHOD)]

            def join_streams_left():  # a peek across threads: counts only
                left = 0
                for av in avs:
                    for conn in list(av.dht._node.host._connections.values()):
                        left += sum(s.method.startswith(matchmaking.JOIN_METHOD) for s in list(conn._streams.values()))
                return left

            wait_for(lambda: join_streams_left() == 0, 10, "every join stream to be forgotten")


def test_a_lockstep_follower_whose_leader_left_declares_and_finds_a_group():
    """The last leader is gone: its followers' requests fail, so they declare after all and form
    a group of their own."""
    with local_swarm(3, **DHT_FAST) as dhts:
        settings = {"target_group_size": 3, "min_group_size": 2, **FAST}
        with averagers(dhts, [[torch.full((8,), float(i))] for i in range(3)], prefix="gone", **settings) as avs:
            run_round(avs)
            leader = next(av for av in avs if av._matchmaker._last.joined is None)
            followers = [av for av in avs if av is not leader]
            assert all(av._matchmaker.likely_leader() is not None for av in followers)
            leader.shutdown()  # its DHT stays up: the connection lives, the join requests fail

            for av, value in zip(followers, [5.0, 9.0], strict=True):
                with av.get_tensors() as (tensor,):
                    tensor.fill_(value)
            results = run_round(followers)
            assert all(len(result) == 2 for result in results)
            for av in followers:
                assert av._matchmaker._last.declared_expiration is not None  # it declared this time
                assert torch.equal(snapshot(av)[0], torch.full((8,), 7.0))


def test_a_guessed_leaders_claimed_expiration_is_checked_and_bounded_by_ours():
    """A leader asked before any lookup says its expiration in ACCEPTED, which we wait on and
    pass to our own followers: it must be a finite number, and at most ours (only a peer before
    us may take us). Without it (older peers), ours bounds it."""
    from types import SimpleNamespace

    from hivecli.averaging import matchmaking
    from hivecli.averaging.settings import AveragingSettings
    from hivecli.net.identity import Identity

    async def check():
        mm = SimpleNamespace(settings=AveragingSettings(), node=SimpleNamespace(rejoins=0))
        me = Member(Identity.generate().peer_id, (), False, None)
        search = matchmaking._Search(mm, me, asyncio.get_running_loop().time() + 30, "key")
        search.expiration = 100.0
        claims = [{"expiration": 50.0}, {"expiration": 1e12}, {"expiration": float("nan")}]
        claims += [{"expiration": True}, {"expiration": "50"}, {}]
        return [search.accepted_expiration(claim) for claim in claims]

    assert asyncio.run(check()) == [50.0, 100.0, 100.0, 100.0, 100.0, 100.0]


def test_declarations_are_withdrawn_once_the_group_formed():
    """Otherwise the next round's first lookup, run while the new declarations are being stored,
    finds them still live and asks those peers first: a round trip lost per peer on a WAN."""
    with local_swarm(2, **DHT_FAST) as dhts:
        settings = {"target_group_size": 2, "min_matchmaking_time": 60.0, "request_timeout": 1.0}
        with averagers(dhts, [[torch.zeros(4)] for _ in dhts], prefix="withdrawn", **settings) as avs:
            run_round(avs)

            def live_declarations():
                found = dhts[0].get("withdrawn.0b", latest=True)
                return [owner for owner, value, _ in owned_entries(found) if value is not None]

            wait_for(lambda: not live_declarations(), 10, "both declarations withdrawn")
            run_round(avs)  # and the next round declares anew
            wait_for(lambda: not live_declarations(), 10, "both declarations withdrawn again")


def test_pairs_out_of_eight_converge_and_keep_the_mean():
    rng = random.Random(4)
    start_values = [float(i) for i in range(8)]
    with local_swarm(8, **DHT_FAST) as dhts:
        tensor_sets = [[torch.full((4,), v)] for v in start_values]
        with averagers(
            dhts, tensor_sets, prefix="pairs", target_group_size=2, min_matchmaking_time=1.0, request_timeout=0.5
        ) as avs:

            def values():
                return torch.stack([snapshot(av)[0] for av in avs]).to(torch.float64)

            initial_spread = max(start_values) - min(start_values)
            spreads = [initial_spread]
            for _ in range(15):
                order = list(range(8))
                rng.shuffle(order)  # who declares first decides the pairs: vary it like real peers would
                results = run_round(avs, order=order)
                for result in results:
                    assert len(result) == 2
                current = values()
                assert torch.equal(current, current[:, :1].expand_as(current))  # each tensor stays uniform
                torch.testing.assert_close(
                    current.mean(0), torch.full((4,), 3.5, dtype=torch.float64), rtol=0, atol=1e-5
                )
                spreads.append((current.max(0).values - current.min(0).values).max().item())
                # averaging within pairs never widens the range
                assert spreads[-1] <= spreads[-2] + 1e-6
                if spreads[-1] < 0.05 * initial_spread:
                    break
            assert spreads[-1] < 0.05 * initial_spread, f"spreads over the rounds: {spreads}"


def test_too_few_peers_raises_matchmaking_error_in_bounded_time():
    with (
        local_swarm(2, **DHT_FAST) as dhts,
        averagers(dhts[:1], [[torch.zeros(5)]], prefix="alone", min_group_size=2, **FAST) as (av,),
    ):
        began = time.perf_counter()
        with pytest.raises(MatchmakingError, match="found 1 of the needed 2 peers"):
            av.step(timeout=1.5)
        elapsed = time.perf_counter() - began
        assert 1.4 <= elapsed < 10, elapsed
        control = av.step(wait=False, timeout=1.0)
        with pytest.raises(MatchmakingError):
            control.result(timeout=10)
        assert control.done() and control.stage is Stage.FINISHED
        assert torch.equal(snapshot(av)[0], torch.zeros(5))


@contextlib.contextmanager
def leftovers_collected():
    """For tests that shut a DHT down under a running averager: its tasks stay pending on the
    closed loop and are destroyed, with errors, whenever the garbage collector finds them.
    Collect them on exit, here rather than in a later test, and yield the list of what the
    destruction reported."""
    caught = []
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: caught.append(f"{u.err_msg or 'Exception ignored in'} {u.object!r}: {u.exc_value!r}")
    try:
        yield caught
    finally:
        try:
            for _ in range(3):  # destroying one coroutine can leave another one to destroy
                gc.collect()
        finally:
            sys.unraisablehook = previous


def kill(av, dht):
    """A peer vanishes: its step is abandoned, its streams and connections close.

    The averager goes first: `dht.shutdown()` alone would leave the step's task pending on a
    closed loop (see test_shutting_down_the_dht_ends_a_step_in_flight)."""
    av.shutdown()
    dht.shutdown()


def test_shutting_down_the_dht_ends_a_step_in_flight():
    with leftovers_collected() as destroyed:
        dht = DHT(start=True, **DHT_FAST)
        av = DecentralizedAverager([torch.zeros(3)], dht, prefix="orphan", start=True, **FAST)
        control = av.step(wait=False, timeout=30)
        try:
            wait_for(lambda: control.stage is Stage.LOOKING_FOR_GROUP, timeout=10, what="matchmaking to begin")
            dht.shutdown()
            # a thread blocked in step() (or in result() without a timeout) must not wait forever
            deadline = time.monotonic() + 10
            while not control.done() and time.monotonic() < deadline:
                time.sleep(0.02)
            ended = control.done()
        finally:
            av.shutdown()
            dht.shutdown()
            av = control = dht = None  # drop our references before the collection
    assert ended, "the step is still pending 10 s after its DHT shut down: step() would block forever"
    assert not destroyed, "tasks left pending on the closed loop:\n" + "\n".join(destroyed)


def assert_survivors_averaged(dhts, avs, inputs, results, weights, atol):
    """The first len(weights) members (the survivors) agree on the group, which held every
    peer. The last member left: nobody reduced its span, where each survivor kept its own
    values; everywhere else they hold their mean, weighted by `weights`."""
    order = list(results[0])
    assert all(list(r) == order for r in results) and set(order) == {d.peer_id for d in dhts}
    numels = [t.numel() for t in inputs[0]]
    spans = Layout(numels).spans(load_balance(sum(numels), [None] * len(dhts)))
    lo, hi = spans[order.index(dhts[-1].peer_id)]
    survivors = inputs[: len(weights)]
    mean = flat(
        [sum(w * p[k] for w, p in zip(weights, survivors, strict=True)) / sum(weights) for k in range(len(numels))]
    )
    for av, original in zip(avs[: len(weights)], survivors, strict=True):
        got, mine = flat(snapshot(av)), flat(original)
        assert torch.equal(got[lo:hi], mine[lo:hi])  # nobody reduced it: local values stay
        keep = torch.ones(sum(numels), dtype=torch.bool)
        keep[lo:hi] = False
        torch.testing.assert_close(got[keep], mean[keep], rtol=0, atol=atol)


def test_peer_dying_before_it_sends_leaves_its_span_local_and_the_rest_averaged():
    torch.manual_seed(5)
    numels = [3000, 7]
    with local_swarm(4, **DHT_FAST) as dhts:
        inputs = [[torch.randn(n) for n in numels] for _ in dhts]
        settings = {"next_chunk_timeout": 1.0, "request_timeout": 0.5, "allreduce_timeout": 20.0}
        with averagers(
            dhts,
            [[t.clone() for t in p] for p in inputs],
            prefix="dying",
            target_group_size=4,
            min_matchmaking_time=2.0,
            chunk_bytes=4096,
            **settings,
        ) as avs:
            dying = avs[3]
            with dying.get_tensors():  # its all-reduce never starts: it dies without sending a byte
                controls = [av.step(wait=False, gather=i, timeout=20) for i, av in enumerate(avs)]
                wait_for(
                    lambda: controls[3].stage is Stage.RUNNING_ALLREDUCE, timeout=30, what="the group", interval=0.001
                )
                kill(dying, dhts[3])
            began = time.perf_counter()
            results = [c.result(timeout=30) for c in controls[:3]]
            assert time.perf_counter() - began < 20
            assert_survivors_averaged(dhts, avs, inputs, results, weights=[1.0] * 3, atol=1e-6)


def test_peer_dying_mid_round_does_not_hang_survivors_who_agree():
    torch.manual_seed(6)
    numels = [600_000, 5]
    with local_swarm(4, **DHT_FAST) as dhts:
        inputs = [[torch.randn(n) for n in numels] for _ in dhts]
        with averagers(
            dhts,
            [[t.clone() for t in p] for p in inputs],
            prefix="dying-mid",
            target_group_size=4,
            min_matchmaking_time=2.0,
            chunk_bytes=4096,
            next_chunk_timeout=1.0,
            request_timeout=0.5,
            allreduce_timeout=20.0,
        ) as avs:
            controls = [av.step(wait=False, gather=i, timeout=20) for i, av in enumerate(avs)]
            wait_for(lambda: controls[3].stage is Stage.RUNNING_ALLREDUCE, timeout=30, what="the group", interval=0.001)
            kill(avs[3], dhts[3])  # somewhere in the middle of sending and receiving 600k floats in 4 KiB chunks
            began = time.perf_counter()
            results = [c.result(timeout=30) for c in controls[:3]]
            assert time.perf_counter() - began < 25
            order = list(results[0])
            spans = Layout(numels).spans(load_balance(sum(numels), [None] * 4))
            mean4 = flat([torch.stack([p[k] for p in inputs]).mean(0) for k in range(2)])
            mean3 = flat([torch.stack([p[k] for p in inputs[:3]]).mean(0) for k in range(2)])
            finals = [flat(snapshot(av)) for av in avs[:3]]
            for index, (lo, hi) in enumerate(spans):
                if order[index] == dhts[3].peer_id:
                    # the dead reducer's span: each survivor has its own values, or the full average
                    # if the dead peer had returned it in full before dying
                    for final, original in zip(finals, inputs[:3], strict=True):
                        own = flat(original)[lo:hi]
                        assert torch.equal(final[lo:hi], own) or torch.allclose(
                            final[lo:hi], mean4[lo:hi], rtol=0, atol=1e-5
                        )
                    continue
                # a survivor's span: everyone got the same bytes from its reducer. The chunks its
                # reducer finalized before the death hold the mean of all four, the rest the mean
                # of the survivors: a prefix and a suffix, never an element of anything else
                for final in finals[1:]:
                    assert torch.equal(final[lo:hi], finals[0][lo:hi])
                got = finals[0][lo:hi]
                of3 = torch.isclose(got, mean3[lo:hi], rtol=0, atol=1e-5)
                of4 = torch.isclose(got, mean4[lo:hi], rtol=0, atol=1e-5)
                assert bool((of3 | of4).all()), f"span {index} has values that are neither mean"
                only4, only3 = torch.nonzero(of4 & ~of3), torch.nonzero(of3 & ~of4)
                if len(only4) and len(only3):
                    assert only4.max() < only3.min(), f"span {index}: mean of four after the survivors' mean"


# ---- scheduled rounds whose owners let them go at different times ----------------------------

LATE = {"target_group_size": 3, "min_matchmaking_time": 2.0, "request_timeout": 0.5, "chunk_bytes": 4096}


@contextlib.contextmanager
def held_round(prefix, allreduce_timeout):
    """Three averagers whose scheduled steps form one group; the first two are let go at once,
    the third is held (AWAITING_TRIGGER) until the test lets it go, or kills it.
    Yields (dhts, avs, inputs, controls)."""
    torch.manual_seed(9)
    with local_swarm(3, **DHT_FAST) as dhts:
        inputs = [[torch.randn(5000), torch.randn(3)] for _ in dhts]
        with averagers(
            dhts, [[t.clone() for t in p] for p in inputs], prefix=prefix, allreduce_timeout=allreduce_timeout, **LATE
        ) as avs:
            controls = [av.step(scheduled=True, gather=i, timeout=60, allow_retries=False) for i, av in enumerate(avs)]
            wait_for(lambda: all(c.stage is Stage.AWAITING_TRIGGER for c in controls), timeout=30, what="the group")
            controls[0].allow_allreduce(weight=1.0)
            controls[1].allow_allreduce(weight=2.0)
            yield dhts, avs, inputs, controls


def test_a_member_let_go_late_is_waited_for():
    with held_round("late", allreduce_timeout=30.0) as (_, avs, inputs, controls):
        # held for 4x request_timeout: without "pending", its peers would drop it after 0.5 s
        time.sleep(4 * LATE["request_timeout"])
        assert not controls[0].done() and not controls[1].done(), "the others did not wait for the held member"
        controls[2].allow_allreduce(weight=3.0)
        results = [c.result(timeout=30) for c in controls]
        assert all(len(r) == 3 for r in results)
        weighted = [sum(w * p[k] for w, p in zip((1.0, 2.0, 3.0), inputs, strict=True)) / 6 for k in range(2)]
        for av in avs:
            torch.testing.assert_close(flat(snapshot(av)), flat(weighted), rtol=0, atol=1e-5)
        assert all(av.banned_peers == {} for av in avs)


def test_a_held_member_that_dies_is_dropped_when_its_connection_breaks():
    # late_timeout is 30 s: ending well before it shows that the broken connection ended the wait
    with held_round("late-dies", allreduce_timeout=60.0) as (dhts, avs, inputs, controls):
        began = time.perf_counter()
        kill(avs[2], dhts[2])
        results = [c.result(timeout=60) for c in controls[:2]]
        assert time.perf_counter() - began < 20
        assert_survivors_averaged(dhts, avs, inputs, results, weights=[1.0, 2.0], atol=1e-5)


def test_a_member_held_past_late_timeout_is_dropped_and_the_others_average():
    with held_round("too-late", allreduce_timeout=3.0) as (dhts, avs, inputs, controls):  # late_timeout 1.5 s
        results = [c.result(timeout=30) for c in controls[:2]]
        assert all(len(r) == 3 for r in results)
        controls[2].allow_allreduce()  # after the others gave up on it: nobody takes its part
        with pytest.raises(AllreduceError):
            controls[2].result(timeout=30)
        assert_survivors_averaged(dhts, avs, inputs, results, weights=[1.0, 2.0], atol=1e-5)
        assert torch.equal(flat(snapshot(avs[2])), flat(inputs[2]))  # it kept its own values


# ---- state sharing ----------------------------------------------------------------------------


class StatefulAverager(DecentralizedAverager):
    def __init__(self, *args, metadata=None, **kwargs):
        self.metadata = metadata
        super().__init__(*args, **kwargs)

    def get_current_state(self):
        _, tensors = super().get_current_state()
        return self.metadata, tensors


@pytest.mark.parametrize("way", ["published", "bulk-link"])
def test_state_download_is_bit_identical(monkeypatch, redeemed, way):
    """Between peers of one host the newcomer reads the donor's published snapshot
    (state.py); with shared_memory off, the chunks take a bulk link."""
    read = []
    original = PublishedReader.readinto

    def counted(self, view, offset):
        read.append(len(view))
        return original(self, view, offset)

    monkeypatch.setattr(PublishedReader, "readinto", counted)
    shared = {"shared_memory": way == "published"}
    torch.manual_seed(7)
    metadata = {"step": 42, "name": "donor", "lr": [0.1, 0.01], "blob": b"\x00\x01"}
    shapes = [(1_000_000,), (3, 5), (0,)]
    with local_swarm(3, **DHT_FAST) as dhts:
        donor_tensors = [torch.randn(1_000_000), torch.randn(3, 5, dtype=torch.float64), torch.empty(0)]
        with contextlib.ExitStack() as stack:
            donor = stack.enter_context(
                StatefulAverager(donor_tensors, dhts[0], prefix="state", metadata=metadata, chunk_bytes=65536, **shared)
            )
            newcomer = stack.enter_context(
                DecentralizedAverager(
                    [torch.zeros(1_000_000), torch.zeros(3, 5, dtype=torch.float64), torch.empty(0)],
                    dhts[2],
                    prefix="state",
                    allow_state_sharing=False,
                    **shared,
                )
            )
            wait_for(lambda: str(donor.peer_id) in declared_donors(dhts[1], "state"), 10, "the donor's declaration")
            got_metadata, tensors = newcomer.load_state_from_peers(timeout=30)
            assert got_metadata == metadata
            assert [t.shape for t in tensors] == [torch.Size(s) for s in shapes]
            for got, want in zip(tensors, donor_tensors, strict=True):
                assert got.dtype == want.dtype and torch.equal(got, want)
            assert torch.count_nonzero(snapshot(newcomer)[0]) == 0  # returned, not applied
            if way == "published":  # every byte read from the donor's file, none on a link
                assert sum(read) == sum(t.numel() * t.element_size() for t in donor_tensors) and redeemed == []
            else:
                assert redeemed == [True] and read == []  # downloads take a bulk link (channel.py)
            # a second download sees later changes of the donor
            with donor.get_tensors() as live:
                live[0].add_(1.0)
            _, again = newcomer.load_state_from_peers(timeout=30)
            assert torch.equal(again[0], donor_tensors[0])
            # into existing tensors: written in place and returned, nothing new allocated
            model = [torch.zeros(1_000_000), torch.zeros(3, 5, dtype=torch.float64), torch.empty(0)]
            addresses = [t.data_ptr() for t in model]
            got_metadata, placed = newcomer.load_state_from_peers(timeout=30, into=model)
            assert got_metadata == metadata and [t.data_ptr() for t in placed] == addresses
            for got, want in zip(model, donor_tensors, strict=True):
                assert torch.equal(got, want)
            with pytest.raises(ConfigError, match=r"into=.*this peer's state is"):
                newcomer.load_state_from_peers(timeout=30, into=model[:2])
            with pytest.raises(ConfigError, match="contiguous"):
                newcomer.load_state_from_peers(timeout=30, into=[model[0], model[1].t().contiguous().t(), model[2]])


@pytest.mark.parametrize("way", ["undialable-donor", "older-donor", "bulk-links-none"])
def test_state_download_without_a_bulk_link_reads_the_stream(monkeypatch, redeemed, way):
    """A donor we cannot dial, one of step 9 or before (it answers with its head at once, no
    offer), and a newcomer with bulk_links = "none" all download over the stream."""
    if way == "undialable-donor":

        async def no_link(self, *args):
            return None

        monkeypatch.setattr(BulkLinks, "dial", no_link)
    elif way == "older-donor":

        async def no_offer(host, stream, request, sink, timeout):
            return channel.Channel(stream, None, sink)

        monkeypatch.setattr("hivecli.averaging.state.channels.as_reducer", no_offer)
    torch.manual_seed(8)
    state = [torch.randn(2_000_000), torch.randn(7, dtype=torch.float64)]
    with local_swarm(2, **DHT_FAST) as dhts, contextlib.ExitStack() as stack:
        donor = stack.enter_context(StatefulAverager([t.clone() for t in state], dhts[0], prefix="plain"))
        newcomer = stack.enter_context(
            DecentralizedAverager(
                [torch.zeros(2_000_000), torch.zeros(7, dtype=torch.float64)],
                dhts[1],
                prefix="plain",
                allow_state_sharing=False,
                bulk_links="none" if way == "bulk-links-none" else "state",
                shared_memory=False,  # not the donor's published snapshot: a link
            )
        )
        wait_for(lambda: str(donor.peer_id) in declared_donors(dhts[1], "plain"), 10, "the donor's declaration")
        _, tensors = newcomer.load_state_from_peers(timeout=30)
        for got, want in zip(tensors, state, strict=True):
            assert torch.equal(got, want)
        assert not any(redeemed)


def test_non_sharing_peers_are_never_used_and_no_donor_means_none():
    with local_swarm(3, **DHT_FAST) as dhts:
        sharer = DecentralizedAverager([torch.full((10,), 1.0)], dhts[0], prefix="share", start=True)
        hoarder = DecentralizedAverager(
            [torch.full((10,), 2.0)],
            dhts[1],
            prefix="share",
            allow_state_sharing=False,
            state_sharing_priority=100,
            start=True,
        )
        newcomer = DecentralizedAverager(
            [torch.zeros(10)], dhts[2], prefix="share", allow_state_sharing=False, start=True
        )
        other_shape = DecentralizedAverager([torch.zeros(11)], dhts[2], prefix="share", allow_state_sharing=False)
        try:
            wait_for(lambda: str(sharer.peer_id) in declared_donors(dhts[2], "share"), 10, "the sharer's declaration")
            assert str(hoarder.peer_id) not in declared_donors(dhts[2], "share")
            for _ in range(3):
                _, tensors = newcomer.load_state_from_peers(timeout=10)
                assert torch.equal(tensors[0], torch.full((10,), 1.0))
            # a downloader expecting other shapes refuses what the donor has: no usable donor
            assert other_shape.load_state_from_peers(timeout=10) is None

            sharer.allow_state_sharing = False
            wait_for(lambda: not declared_donors(dhts[2], "share"), 10, "the declaration to be withdrawn")
            assert newcomer.load_state_from_peers(timeout=10) is None

            hoarder.allow_state_sharing = True
            wait_for(lambda: str(hoarder.peer_id) in declared_donors(dhts[2], "share"), 10, "the new declaration")
            _, tensors = newcomer.load_state_from_peers(timeout=10)
            assert torch.equal(tensors[0], torch.full((10,), 2.0))
        finally:
            for av in (sharer, hoarder, newcomer):
                av.shutdown()


def test_no_donor_at_all_returns_none():
    with local_swarm(2, **DHT_FAST) as dhts, averagers(dhts[:1], [[torch.zeros(3)]], prefix="nobody") as (av,):
        assert av.load_state_from_peers(timeout=5) is None


def _wait_for_priorities(dht, prefix, expected):
    def ok():
        declared = declared_donors(dht, prefix)
        return all(str(peer) in declared and declared[str(peer)][0] == prio for peer, prio in expected.items())

    wait_for(ok, timeout=10, what=f"declarations {expected} under {prefix!r}")


def _download_fill(av):
    result = av.load_state_from_peers(timeout=10)
    assert result is not None
    values = result[1][0].unique()
    assert values.numel() == 1
    return values.item()


def check_donor_priority_and_fallback():
    with local_swarm(5, **DHT_FAST) as dhts:
        priorities = [1.0, 5.0, 3.0]
        donors = [
            DecentralizedAverager([torch.full((1000,), p)], dht, prefix="prio", state_sharing_priority=p, start=True)
            for p, dht in zip(priorities, dhts[:3], strict=True)
        ]
        downloader = DecentralizedAverager(
            [torch.zeros(1000)], dhts[4], prefix="prio", allow_state_sharing=False, start=True
        )
        try:
            _wait_for_priorities(dhts[3], "prio", {d.peer_id: p for d, p in zip(donors, priorities, strict=True)})
            for _ in range(3):
                assert _download_fill(downloader) == 5.0
            donors[1].shutdown()  # withdraws its declaration and stops serving
            assert _download_fill(downloader) == 3.0
            wait_for(lambda: str(donors[1].peer_id) not in declared_donors(dhts[3], "prio"), 10, "the withdrawal")
            dhts[2].shutdown()  # the priority-3 donor vanishes without a word: its declaration stays
            assert str(donors[2].peer_id) in declared_donors(dhts[3], "prio")
            assert _download_fill(downloader) == 1.0
        finally:
            for av in (*donors, downloader):
                av.shutdown()


def test_donor_priority_is_honoured_with_fallback():
    with leftovers_collected():  # the vanished donor's declaration task (see the test above)
        check_donor_priority_and_fallback()


def test_priority_changed_at_runtime_is_declared():
    with local_swarm(4, **DHT_FAST) as dhts:
        donors = [
            DecentralizedAverager([torch.full((100,), float(i))], dht, prefix="prio-rt", start=True)
            for i, dht in enumerate(dhts[:3])
        ]
        downloader = DecentralizedAverager([torch.zeros(100)], dhts[3], prefix="prio-rt", start=True)
        try:
            for donor, priority in zip(donors, [1.0, 5.0, 3.0], strict=True):
                donor.state_sharing_priority = priority  # right after start, as a trainer would
            _wait_for_priorities(
                dhts[3], "prio-rt", {d.peer_id: p for d, p in zip(donors, [1.0, 5.0, 3.0], strict=True)}
            )
            assert _download_fill(downloader) == 1.0  # donors[1] holds 1.0
            for priority in range(10, 15):  # e.g. a trainer that declares its step as its priority
                donors[0].state_sharing_priority = priority
                _wait_for_priorities(dhts[3], "prio-rt", {donors[0].peer_id: float(priority)})
            assert _download_fill(downloader) == 0.0
        finally:
            for av in (*donors, downloader):
                av.shutdown()


# ---- compression on the wire ----------------------------------------------------------------


def _error_bound(codec, inputs, mean):
    """A sound per-element bound on |result - exact mean| after a sender's encoding, the
    reduction and the encoding of the average on its way back (whole-tensor statistics bound
    every chunk's)."""
    if codec == "none":  # float32 sums in another order
        magnitude = torch.stack([x.abs() for x in inputs]).amax(0) + mean.abs()
        return magnitude * 2**-20 + 1e-7
    if codec == "fp16":
        magnitude = torch.stack([x.abs() for x in inputs]).amax(0) + mean.abs()
        return magnitude * 2**-10 + 1e-6
    if codec == "uniform8bit":
        widest = max((x.max() - x.min()).item() for x in inputs)
        return torch.full_like(mean, (widest + (mean.max() - mean.min()).item()) / 510 * 1.1 + 1e-6)
    if codec == "blockwise8bit":
        absmax = max(x.abs().max().item() for x in inputs)
        return torch.full_like(mean, (absmax + mean.abs().max().item()) / 254 * 1.1 + 1e-6)
    raise AssertionError(codec)


@pytest.mark.parametrize("codec", ["none", "fp16", "uniform8bit", "blockwise8bit"])
def test_compressed_averaging_stays_within_the_codec_bound(codec):
    torch.manual_seed(8)
    with local_swarm(4, **DHT_FAST) as dhts:
        inputs = [[torch.randn(6000) * 3 + 1, torch.randn(3) * 100] for _ in dhts]
        with averagers(
            dhts,
            [[t.clone() for t in p] for p in inputs],
            prefix=f"codec-{codec}",
            target_group_size=4,
            compression=codec,
            chunk_bytes=4096,
            **FAST,
        ) as avs:
            run_round(avs)
            for k in range(2):
                per_peer = [p[k] for p in inputs]
                mean = torch.stack(per_peer).mean(0)
                bound = _error_bound(codec, per_peer, mean)
                worst = 0.0
                for av in avs:
                    error = (snapshot(av)[k] - mean).abs()
                    assert (error <= bound).all(), f"{codec}: max error {error.max()} over bound {bound.min()}"
                    worst = max(worst, error.max().item())
                if codec != "none":
                    assert worst > 1e-4  # the codec really was used on the wire (float32 rounding alone: ~1e-6)


def test_peers_with_different_compression_or_shapes_never_group():
    with local_swarm(4, **DHT_FAST) as dhts:
        avs = [
            DecentralizedAverager([torch.zeros(10)], dhts[0], prefix="mismatch", start=True, **FAST),
            DecentralizedAverager([torch.zeros(11)], dhts[1], prefix="mismatch", start=True, **FAST),
            DecentralizedAverager(
                [torch.zeros(10, dtype=torch.float64)], dhts[2], prefix="mismatch", start=True, **FAST
            ),
            DecentralizedAverager(
                [torch.zeros(10)], dhts[3], prefix="mismatch", compression="fp16", start=True, **FAST
            ),
        ]
        try:
            controls = [av.step(wait=False, timeout=3.0) for av in avs]
            for control in controls:
                with pytest.raises(MatchmakingError):
                    control.result(timeout=30)
        finally:
            for av in avs:
                av.shutdown()


def test_non_float32_tensors_average_too():
    torch.manual_seed(9)
    dtypes = [torch.float64, torch.float16, torch.bfloat16]
    with local_swarm(2, **DHT_FAST) as dhts:
        inputs = [[torch.randn(300).to(dt) for dt in dtypes] for _ in dhts]
        with averagers(
            dhts, [[t.clone() for t in p] for p in inputs], prefix="dtypes", target_group_size=2, **FAST
        ) as avs:
            run_round(avs)
            for av in avs:
                for got, a, b, dt in zip(snapshot(av), inputs[0], inputs[1], dtypes, strict=True):
                    assert got.dtype == dt
                    want = ((a.double() + b.double()) / 2).to(dt)
                    torch.testing.assert_close(got, want, rtol=1e-2 if dt != torch.float64 else 1e-6, atol=1e-6)


# ---- partitioning -------------------------------------------------------------------------------


def test_load_balance():
    assert load_balance(100, [1, 1, 2]) == [25, 25, 50]
    assert load_balance(90, [None, None, None]) == [30, 30, 30]
    assert load_balance(10, [0, None, 0, None]) == [0, 5, 0, 5]  # clients get nothing
    assert load_balance(0, [1, 2]) == [0, 0]
    assert load_balance(10, [1, 100], min_size=5) == [0, 10]  # a tiny share goes to the others
    sizes = load_balance(10, [1, 1, 1])
    assert sum(sizes) == 10 and sorted(sizes) == [3, 3, 4]
    rng = random.Random(10)
    for _ in range(200):
        bandwidths = [rng.choice([0.0, None, rng.uniform(0.01, 10)]) for _ in range(rng.randint(1, 9))]
        if not any(b is None or b > 0 for b in bandwidths):
            bandwidths.append(None)
        total = rng.randint(0, 10**6)
        sizes = load_balance(total, bandwidths)
        weights = [1.0 if b is None else b for b in bandwidths]
        assert sum(sizes) == total and all(s >= 0 for s in sizes)
        for size, w in zip(sizes, weights, strict=True):
            assert abs(size - total * w / sum(weights)) < 1 + 1e-9
            if w == 0:
                assert size == 0
    with pytest.raises(ConfigError, match="client"):
        load_balance(10, [0, 0.0])
    with pytest.raises(ConfigError, match="-1"):
        load_balance(10, [1, -1])


def test_layout_chunks_cover_spans_without_crossing_tensors():
    layout = Layout([5, 0, 12, 3])
    spans = layout.spans(load_balance(layout.total, [1, 2, 0, 1]))
    assert spans[0][0] == 0 and spans[-1][1] == 20
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    covered = []
    for lo, hi in spans:
        for chunk in layout.chunks(lo, hi, 4):
            assert 0 < chunk.numel <= 4
            t_lo, t_hi = layout.offsets[chunk.tensor], layout.offsets[chunk.tensor + 1]
            assert t_lo <= chunk.start < chunk.end <= t_hi
            assert chunk.offset_in_tensor == chunk.start - t_lo
            covered.extend(range(chunk.start, chunk.end))
    assert covered == list(range(20))


# ---- bad input ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_dht():
    with local_swarm(1) as (dht,):
        yield dht


@pytest.mark.parametrize(
    ("tensors", "fragment"),
    [
        ([torch.zeros(3), torch.empty(3, device="meta")], r"averaged_tensors\[1\] is on meta"),
        ([torch.zeros(3, dtype=torch.int64)], r"averaged_tensors\[0\] has dtype torch\.int64"),
        ([torch.zeros(2), torch.zeros(4, 4).t()], r"averaged_tensors\[1\] is not contiguous"),
        ([torch.zeros(2), [1.0, 2.0]], r"averaged_tensors\[1\] is a list"),
        ([], "empty"),
    ],
    ids=["meta-device", "int", "non-contiguous", "not-a-tensor", "empty"],
)
def test_bad_tensors_are_config_errors(one_dht, tensors, fragment):
    with pytest.raises(ConfigError, match=fragment):
        DecentralizedAverager(tensors, one_dht, prefix="bad")


@pytest.mark.parametrize("prefix", ["", "has space", "tab\there", 123, None])
def test_bad_prefix_is_a_config_error(one_dht, prefix):
    with pytest.raises(ConfigError) as info:
        DecentralizedAverager([torch.zeros(3)], one_dht, prefix=prefix)
    assert repr(prefix) in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"min_matchmaking_tme": 1.0}, "unknown argument 'min_matchmaking_tme'; did you mean 'min_matchmaking_time'"),
        ({"chunk_size": 4096}, "unknown argument 'chunk_size'"),
        ({"chunk_bytes": 100}, "chunk_bytes = 100"),
        ({"min_matchmaking_time": 1.0, "request_timeout": 2.0}, "request_timeout = 2.0 must be less"),
        ({"target_group_size": 1}, "target_group_size = 1"),
        ({"min_group_size": 5, "target_group_size": 4}, "target_group_size = 4"),
        ({"next_chunk_timeout": 0}, "next_chunk_timeout = 0"),
        ({"compression": "nope"}, "compression = 'nope'"),
        ({"bandwidth": -1.0}, "bandwidth = -1.0"),
        ({"bandwidth": float("nan")}, "bandwidth = nan"),
        ({"uplink_mbps": 0}, "uplink_mbps = 0 must be a positive number of Mbit/s"),
        ({"uplink_mbps": float("inf")}, "uplink_mbps = inf"),
        ({"uplink_mbps": "100"}, "uplink_mbps = '100'"),
    ],
)
def test_bad_settings_are_config_errors(one_dht, kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        DecentralizedAverager([torch.zeros(3)], one_dht, prefix="bad", **kwargs)
    assert fragment in str(info.value)


def test_bad_step_arguments(one_dht):
    av = DecentralizedAverager([torch.zeros(3)], one_dht, prefix="bad")
    with pytest.raises(RuntimeError, match="not running"):
        av.step(timeout=0.1)
    with av:
        for weight in (-1.0, float("nan"), float("inf")):
            with pytest.raises(ConfigError, match="weight"):
                av.step(weight=weight, timeout=0.1)


# ---- cancellation -------------------------------------------------------------------------------


def test_cancelled_step_leaves_matchmaking_and_a_later_step_works():
    torch.manual_seed(11)
    with local_swarm(3, **DHT_FAST) as dhts:
        inputs = [[torch.randn(50)] for _ in dhts]
        with averagers(
            dhts,
            [[t.clone() for t in p] for p in inputs],
            prefix="cancel",
            target_group_size=3,
            min_group_size=2,
            **FAST,
        ) as avs:
            control = avs[0].step(wait=False, timeout=30)
            wait_for(lambda: control.stage is Stage.LOOKING_FOR_GROUP, timeout=10, what="matchmaking to begin")
            assert control.cancel()
            assert control.done()
            with pytest.raises(CancelledError):
                control.result(timeout=1)
            wait_for(lambda: control.stage is Stage.FINISHED, timeout=10, what="the step to wind down")
            assert torch.equal(snapshot(avs[0])[0], inputs[0][0])  # nothing was averaged

            # cancelled while another peer looks too (leading it or following it): that peer goes
            # on without it and averages with whoever comes next
            first, second = avs[0].step(wait=False, timeout=30), avs[1].step(wait=False, timeout=30)
            wait_for(lambda: first.stage is second.stage is Stage.LOOKING_FOR_GROUP, timeout=10, what="both looking")
            assert first.cancel()
            wait_for(lambda: first.stage is Stage.FINISHED, timeout=10, what="the cancelled step to wind down")
            third = avs[2].step(wait=False, timeout=30)
            pair = {dhts[1].peer_id, dhts[2].peer_id}
            assert set(second.result(timeout=40)) == set(third.result(timeout=40)) == pair
            assert torch.equal(snapshot(avs[0])[0], inputs[0][0])
            for av in avs[1:]:
                torch.testing.assert_close(snapshot(av)[0], (inputs[1][0] + inputs[2][0]) / 2, rtol=0, atol=1e-6)

            # the cancelled peer is free to average again, with the others
            expected = torch.stack([p[0] for p in inputs]).mean(0)
            results = run_round(avs, gathers=["x", "y", "z"])
            assert all(len(r) == 3 for r in results)
            for av in avs:
                torch.testing.assert_close(snapshot(av)[0], expected, rtol=0, atol=1e-6)


def test_step_right_after_a_cancel_is_not_refused():
    torch.manual_seed(12)
    with local_swarm(2, **DHT_FAST) as dhts:
        inputs = [[torch.randn(20)] for _ in dhts]
        expected = (inputs[0][0] + inputs[1][0]) / 2
        with averagers(
            dhts, [[t.clone() for t in p] for p in inputs], prefix="recancel", target_group_size=2, **FAST
        ) as avs:
            for _ in range(5):
                control = avs[0].step(wait=False, timeout=30)
                wait_for(lambda c=control: c.stage is not Stage.IDLE, timeout=10, what="matchmaking", interval=0.001)
                assert control.cancel()
                # at once, as a training loop would: no "already looking for a group"
                results = run_round(avs)
                assert all(len(r) == 2 for r in results)
                for av in avs:
                    torch.testing.assert_close(snapshot(av)[0], expected, rtol=0, atol=1e-6)
