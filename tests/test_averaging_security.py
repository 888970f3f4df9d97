"""One hostile group member against decentralized averaging: the math of the robust rules,
then real averagers on loopback where one peer sends NaN, claims a huge weight, sends
outliers, returns NaN as a reducer, or serves a bad state. Honest peers must stay finite and
near the honest mean, name the attacker in a log record, and go on with the next round.

Tests wait on results with deadlines (`result(timeout=...)`, `wait_for`), never on sleeps.
"""

import asyncio
import contextlib
import dataclasses
import logging
import math
import struct

import pytest
import torch

from hivecli import ConfigError, HiveError
from hivecli.averaging import AveragingSettings, DecentralizedAverager, load_balance
from hivecli.averaging.allreduce import AllReduceRunner
from hivecli.averaging.audit import (
    ReducerAudit,
    _choose_positions,
    _decode_at,
    _decode_one,
    _encoded_values,
    _pack_rows,
    _parse_audit_answer,
)
from hivecli.averaging.compression import CODECS
from hivecli.averaging.partition import Layout
from hivecli.averaging.robust import (
    all_finite,
    cap_weights,
    centered_clip,
    lower_median,
    sort_rows,
    trim_count,
    trimmed_mean,
)
from hivecli.averaging.sharedmem import SharedBuffers
from hivecli.dht.records import owned_entries
from hivecli.net.framing import pack, unpack
from hivecli.optim.training_averager import TrainingAverager
from hivecli.testing import local_swarm, redeemed_bulk_links, wait_for

DHT_FAST = {"wait_timeout": 1.0}
FAST = {"min_matchmaking_time": 2.0, "request_timeout": 1.0}
NUMELS = [3000, 7]


# ---- the math ---------------------------------------------------------------------------------


def test_lower_median_and_weight_cap():
    assert lower_median([3.0, 1.0]) == 1.0
    assert lower_median([5.0, 1.0, 3.0, 2.0]) == 2.0
    assert cap_weights([1.0, 1e30], 10) == [1.0, 10.0]
    assert cap_weights([1.0, 2.0, 1e30], 10) == [1.0, 2.0, 20.0]
    assert cap_weights([0.0, 1.0, 5.0], 2) == [0.0, 1.0, 2.0]  # zero stays zero and is not the median
    assert cap_weights([0.0, 0.0], 10) == [0.0, 0.0]
    with pytest.raises(ValueError, match="no values"):
        lower_median([])


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7, 16, 17])
def test_sort_rows_sorts_every_coordinate(k):
    x = torch.randn(k, 999)
    x[:, :10] = 0.0  # ties
    assert torch.equal(torch.stack(sort_rows(x)), x.sort(dim=0).values)


def test_trim_count():
    assert [trim_count(k, 0.2) for k in (1, 2, 3, 4, 5, 10, 11)] == [0, 0, 1, 1, 1, 2, 2]
    assert trim_count(3, 0.0) == 1  # at least one each side from 3 contributions on
    assert trim_count(4, 0.49) == 1  # always leaves one value


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_robust_rules_equal_the_mean_when_everyone_agrees(k):
    same = torch.randn(1000).expand(k, 1000).contiguous()
    torch.testing.assert_close(trimmed_mean(same, 0.2), same[0])
    torch.testing.assert_close(centered_clip(same), same[0])


@pytest.mark.parametrize("k", [3, 4, 8])
def test_robust_rules_bound_one_outliers_influence(k):
    torch.manual_seed(k)
    honest = torch.randn(k - 1, 5000) * 0.1 + 1.0
    for outlier in (1e6, -1e6, 1e30):
        stack = torch.cat([honest, torch.full((1, 5000), outlier)])
        low, high = honest.min(0).values, honest.max(0).values
        trimmed = trimmed_mean(stack, 0.2)
        assert bool(((trimmed >= low - 1e-6) & (trimmed <= high + 1e-6)).all())  # never leaves the honest range
        clipped = centered_clip(stack, iterations=3)
        assert (clipped - honest.mean(0)).abs().max() < 1.0, "one outlier dragged CenteredClip away"
        assert (stack.mean(0) - honest.mean(0)).abs().max() > 1e4  # while the plain mean is lost


def test_centered_clip_with_a_fixed_radius_moves_at_most_tau_per_iteration():
    honest = torch.zeros(4, 100)
    stack = torch.cat([honest, torch.full((1, 100), 1e6)])
    clipped = centered_clip(stack, iterations=3, tau=0.5)
    assert clipped.norm() <= 3 * 0.5 / 5 + 1e-6


def test_all_finite():
    t = torch.randn(10_000)
    assert all_finite(t)
    assert all_finite(torch.full((10_000,), 3e37))  # the sum overflows, the values do not
    for bad in (math.nan, math.inf, -math.inf):
        poisoned = t.clone()
        poisoned[1234] = bad
        assert not all_finite(poisoned)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"aggregation": "median"}, "aggregation = 'median' is not known"),
        ({"trim_fraction": 0.5}, "trim_fraction = 0.5 must be a number in"),
        ({"trim_fraction": math.nan}, "trim_fraction"),
        ({"max_weight_ratio": 0.5}, "max_weight_ratio = 0.5 must be a finite number >= 1"),
        ({"max_weight_ratio": math.inf}, "max_weight_ratio"),
        ({"clip_iterations": 0}, "clip_iterations = 0 must be an integer"),
        ({"clip_tau": -1.0}, "clip_tau = -1.0 must be a finite number >= 0"),
        ({"ban_duration": math.nan}, "ban_duration"),
        ({"audit_positions": 0}, "audit_positions = 0 must be an integer between 1 and 1024"),
        ({"audit_positions": 2.5}, "audit_positions"),
        ({"verify_reducers": 1}, "verify_reducers = 1 must be True or False"),
        ({"bulk_links": True}, "bulk_links = True must be one of 'auto', 'state', 'all', 'none'"),
    ],
)
def test_bad_defence_settings_are_config_errors(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        AveragingSettings(**kwargs)


# ---- one hostile member of a round, through the wire ----------------------------------------


@pytest.fixture(params=["stream", "bulk", "shared", "published"])
def link(request, monkeypatch):
    """Which way the spans travel: on the part streams, (every span, however small) on bulk
    links (channel.py), or through shared memory, as between peers on one host (sharedmem.py):
    there with every reducer writing its averages into each sender's buffer ("shared"), or
    publishing them for its senders to read ("published"). Returns a check, for after a round,
    that they went that way."""
    shared = request.param in ("shared", "published")
    if not shared:
        monkeypatch.setattr("hivecli.averaging.allreduce.AllReduceRunner._shared_with", lambda self, connection: None)
    if request.param == "bulk":  # as bulk_links = "all" does for spans of 1 MiB or more
        monkeypatch.setattr("hivecli.averaging.allreduce.wants_bulk_link", lambda settings, span_bytes: True)
    if request.param == "shared":  # a reducer writes into each sender's buffer, as with 2 peers or older senders
        monkeypatch.setattr(
            "hivecli.averaging.allreduce.AllReduceRunner._publication", lambda self, stream, request: None
        )
    attached = []  # (mapped, a published buffer)
    attach = SharedBuffers.attach

    def counting(self, offer, nbytes, layout, publisher=None):
        target = attach(self, offer, nbytes, layout, publisher)
        attached.append((target is not None, publisher is not None))
        return target

    monkeypatch.setattr(SharedBuffers, "attach", counting)
    with redeemed_bulk_links() as redeemed:

        def went_that_way() -> bool:
            went = (any(redeemed), any(m for m, _ in attached), any(m and p for m, p in attached))
            return went == (request.param == "bulk", shared, request.param == "published")

        yield went_that_way


@contextlib.contextmanager
def group_of_three(prefix, inputs, **kwargs):
    with local_swarm(3, **DHT_FAST) as dhts:
        avs = []
        try:
            for dht, tensors in zip(dhts, inputs, strict=True):
                avs.append(
                    DecentralizedAverager(
                        [t.clone() for t in tensors],
                        dht,
                        prefix=prefix,
                        target_group_size=3,
                        chunk_bytes=4096,
                        start=True,
                        **FAST,
                        **kwargs,
                    )
                )
            yield avs
        finally:
            for av in avs:
                av.shutdown()


def run_round(avs, weights=None, hostile=None, timeout=30.0):
    """A step on every averager at once; the group's member order (from the first result).
    The `hostile` one does not retry (every honest peer drops it, so its round fails) and its
    outcome is not checked."""
    weights = weights or [1.0] * len(avs)
    controls = [
        av.step(wait=False, weight=w, timeout=timeout, allow_retries=i != hostile)
        for i, (av, w) in enumerate(zip(avs, weights, strict=True))
    ]
    results = [c.result(timeout=timeout + 30) for i, c in enumerate(controls) if i != hostile]
    if hostile is not None:
        with contextlib.suppress(HiveError):
            controls[hostile].result(timeout=timeout + 30)
    return list(results[0])


def values(av):
    with av.get_tensors() as tensors:
        return torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])


def flat(tensors):
    return torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])


def span_of(order, peer_id):
    return Layout(NUMELS).spans(load_balance(sum(NUMELS), [None] * len(order)))[order.index(peer_id)]


def named(caplog, peer_id, *fragments):
    """Log records that name `peer_id` and contain every fragment."""
    return [
        r.getMessage()
        for r in caplog.records
        if str(peer_id) in r.getMessage() and all(f in r.getMessage() for f in fragments)
    ]


def honest_inputs(seed):
    torch.manual_seed(seed)
    return [[torch.randn(n) for n in NUMELS] for _ in range(3)]


@pytest.mark.parametrize("poison", [math.nan, math.inf], ids=["nan", "inf"])
def test_a_member_sending_non_finite_values_is_dropped_and_banned(caplog, poison, link):
    caplog.set_level(logging.INFO, logger="hivecli.averaging")
    inputs = honest_inputs(11)
    inputs[2] = [t.clone() for t in inputs[2]]
    inputs[2][0][::7] = poison  # the attacker: its part holds a NaN (or inf) in every chunk
    with group_of_three("poison", inputs) as avs:
        attacker = avs[2].peer_id
        order = run_round(avs, hostile=2)
        honest_mean = flat([(a + b) / 2 for a, b in zip(inputs[0], inputs[1], strict=True)])
        lo, hi = span_of(order, attacker)
        for av, original in zip(avs[:2], inputs[:2], strict=True):
            got = values(av)
            assert all_finite(got)
            # the attacker reduced its own span with its NaN: honest peers kept their own values there
            assert torch.equal(got[lo:hi], flat(original)[lo:hi])
            keep = torch.ones_like(got, dtype=torch.bool)
            keep[lo:hi] = False
            torch.testing.assert_close(got[keep], honest_mean[keep], rtol=0, atol=1e-6)
            assert attacker in av.banned_peers
        assert named(caplog, attacker, "non-finite", "dropped")
        assert link()

        # the next round: the attacker (now finite, but banned) is kept out of the honest pair's
        # group by matchmaking, and the pair averages everything, the attacker's old span included
        with avs[2].get_tensors() as tensors:
            tensors[0].nan_to_num_(0.0, 0.0, 0.0)
        before = [values(av) for av in avs[:2]]
        order = run_round(avs, hostile=2, timeout=10.0)
        assert attacker not in order and len(order) == 2
        for av in avs[:2]:
            torch.testing.assert_close(values(av), (before[0] + before[1]) / 2, rtol=0, atol=1e-6)


def test_a_huge_weight_is_capped_at_max_weight_ratio_times_the_median(caplog):
    caplog.set_level(logging.INFO, logger="hivecli.averaging")
    inputs = honest_inputs(12)
    with group_of_three("heavy", inputs) as avs:
        attacker = avs[2].peer_id
        run_round(avs, weights=[1.0, 1.0, 1e30])  # a finite weight: step() itself accepts it
        # every reducer caps 1e30 at 10 x the median weight 1
        want = flat([(a + b + 10 * c) / 12 for a, b, c in zip(*inputs, strict=True)])
        for av in avs[:2]:
            torch.testing.assert_close(values(av), want, rtol=0, atol=1e-5)
            assert (values(av) - flat(inputs[2])).abs().max() > 0.01  # not the attacker's tensors
        assert named(caplog, attacker, "capped the weight", "1e+30")
        run_round(avs)  # the next round works as usual
        for av in avs:
            torch.testing.assert_close(values(av), values(avs[0]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("aggregation", ["trimmed_mean", "centered_clip"])
def test_robust_aggregation_keeps_an_outlier_from_moving_the_average(aggregation):
    inputs = honest_inputs(13)
    inputs[2] = [torch.full((n,), 1e6) for n in NUMELS]
    with group_of_three(f"robust-{aggregation}", inputs, aggregation=aggregation) as avs:
        run_round(avs)
        honest = torch.stack([flat(inputs[0]), flat(inputs[1])])
        for av in avs:
            got = values(av)
            assert all_finite(got)
            if aggregation == "trimmed_mean":  # 3 contributions: the per-coordinate median
                assert torch.equal(got, honest.max(0).values)
            else:
                assert (got - honest.mean(0)).abs().max() < 5.0, "the outlier dragged the average away"


def test_a_reducer_returning_non_finite_averages_is_ignored_and_banned(caplog, monkeypatch, link):
    caplog.set_level(logging.INFO, logger="hivecli.averaging")
    inputs = honest_inputs(14)
    with group_of_three("bad-reducer", inputs) as avs:
        attacker = avs[2].peer_id
        original = AllReduceRunner._finalize_ready_chunks

        def poisoned(self):
            before = self._finalized
            original(self)
            if self.host.peer_id == attacker:  # the hostile reducer returns NaN for every chunk
                for c in range(before, self._finalized):
                    self._average(c).fill_(math.nan)  # in its tensors, or where it averages into its published buffer

        monkeypatch.setattr(AllReduceRunner, "_finalize_ready_chunks", poisoned)
        order = run_round(avs, hostile=2)
        mean3 = flat([(a + b + c) / 3 for a, b, c in zip(*inputs, strict=True)])
        lo, hi = span_of(order, attacker)
        for av, mine in zip(avs[:2], inputs[:2], strict=True):
            got = values(av)
            assert all_finite(got)
            assert torch.equal(got[lo:hi], flat(mine)[lo:hi])
            keep = torch.ones_like(got, dtype=torch.bool)
            keep[lo:hi] = False
            torch.testing.assert_close(got[keep], mean3[keep], rtol=0, atol=1e-6)  # it sent honestly
            assert attacker in av.banned_peers
        assert named(caplog, attacker, "non-finite average")
        assert link()


# ---- reducers returning finite but wrong averages: the audit ---------------------------------


def lying_reducer(monkeypatch, attacker, claim_666=False):
    """The `attacker`'s runner overwrites its finalized averages with 666 before they go back (in
    its tensors, or where it averages into its published buffer); with `claim_666` its audit
    answers also claim that every input was 666 (a consistent lie)."""
    finalize, answer = AllReduceRunner._finalize_ready_chunks, AllReduceRunner._audit_answer

    def wrong_averages(self):
        before = self._finalized
        finalize(self)
        if self.host.peer_id == attacker:
            for c in range(before, self._finalized):
                self._average(c).fill_(666.0)

    def wrong_inputs(self, request):
        reply = answer(self, request)
        if self.host.peer_id == attacker and claim_666:
            reply["values"] = struct.pack(f"<{len(reply['values']) // 8}d", *[666.0] * (len(reply["values"]) // 8))
        return reply

    monkeypatch.setattr(AllReduceRunner, "_finalize_ready_chunks", wrong_averages)
    monkeypatch.setattr(AllReduceRunner, "_audit_answer", wrong_inputs)


def warnings_naming(caplog, peer_id):
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name.startswith("hivecli.averaging") and str(peer_id) in r.getMessage()
    ]


@pytest.mark.parametrize(
    ("aggregation", "compression", "claim_666", "mismatch", "link"),
    [  # each case costs the liar's 30 s step timeout: the bulk links get the two that differ most
        ("mean", "none", False, "the inputs it claims give", "stream"),
        ("trimmed_mean", "none", False, "the inputs it claims give", "stream"),
        ("mean", "blockwise8bit", False, "the inputs it claims give", "bulk"),
        ("mean", "none", True, "claims our input was 666.0", "bulk"),
        ("centered_clip", "none", True, "claims our input was 666.0", "stream"),
        ("mean", "none", False, "the inputs it claims give", "shared"),
    ],
    ids=[
        "mean",
        "trimmed-mean",
        "blockwise8bit-bulk",
        "consistent-liar-bulk",
        "consistent-liar-centered-clip",
        "mean-shared",
    ],
    indirect=["link"],
)
def test_a_reducer_returning_wrong_finite_averages_fails_the_audit_and_is_banned(
    caplog, monkeypatch, aggregation, compression, claim_666, mismatch, link
):
    caplog.set_level(logging.INFO, logger="hivecli.averaging")
    inputs = honest_inputs(15)
    with group_of_three(
        f"audit-{aggregation}-{compression}-{claim_666}", inputs, aggregation=aggregation, compression=compression
    ) as avs:
        attacker = avs[2].peer_id
        lying_reducer(monkeypatch, attacker, claim_666)
        order = run_round(avs, hostile=2)
        lo, hi = span_of(order, attacker)
        stacked = torch.stack([flat(p) for p in inputs])
        honest = stacked.mean(0) if aggregation == "mean" else stacked.median(0).values  # it sent honestly
        for av, mine in zip(avs[:2], inputs[:2], strict=True):
            got = values(av)
            assert torch.equal(got[lo:hi], flat(mine)[lo:hi]), "the liar's span was applied"
            keep = torch.ones_like(got, dtype=torch.bool)
            keep[lo:hi] = False
            atol = {"none": 1e-5, "blockwise8bit": 0.1}[compression]
            if aggregation != "centered_clip":
                torch.testing.assert_close(got[keep], honest[keep], rtol=0, atol=atol)
            assert (got - 666).abs().min() > 100
            assert attacker in av.banned_peers
            assert "audit" in av.banned_peers[attacker]
        lines = warnings_naming(caplog, attacker)
        assert len(lines) == 2, lines  # exactly one per honest peer
        for line in lines:
            assert "failed the audit" in line and mismatch in line and "kept local values" in line

        # the next round: the banned liar's span (if it is in the group at all) is never applied
        caplog.clear()
        run_round(avs, hostile=2)
        for av in avs[:2]:
            assert (values(av) - 666).abs().min() > 100
        assert not named(caplog, attacker, "failed the audit")  # nobody sent to it, so nobody audited it
        assert link()


def test_a_publisher_answers_the_audits_of_senders_that_do_not_read_its_buffer(caplog, monkeypatch):
    """A liar that publishes its averages on this host: a sender that does not read them there
    (here one that does not say "read", as before published averages) audits it, and the liar's
    answer, which its tensors' input and the parts give, fails; its reader, of our own user
    (sharedmem.py, "Trust"), asks for no audit and takes what it published."""
    caplog.set_level(logging.INFO, logger="hivecli.averaging")
    inputs = honest_inputs(18)
    request = AllReduceRunner._request
    old = []

    def without_read(self, span_bytes, shared):
        sent = request(self, span_bytes, shared)
        if self.host.peer_id in old:
            sent.pop("read", None)
        return sent

    monkeypatch.setattr(AllReduceRunner, "_request", without_read)
    with group_of_three("audit-by-a-non-reader", inputs) as avs:
        attacker = avs[2].peer_id
        old.append(avs[0].peer_id)
        lying_reducer(monkeypatch, attacker)
        order = run_round(avs, hostile=2)
        lo, hi = span_of(order, attacker)
        assert torch.equal(values(avs[0])[lo:hi], flat(inputs[0])[lo:hi]), "the auditor applied the lie"
        assert "audit" in avs[0].banned_peers[attacker]
        assert torch.equal(values(avs[1])[lo:hi], torch.full((hi - lo,), 666.0, dtype=torch.float64))
        assert attacker not in avs[1].banned_peers
        lines = warnings_naming(caplog, attacker)
        assert len(lines) == 1 and "failed the audit" in lines[0], lines


def test_without_verify_reducers_the_wrong_averages_go_through(caplog, monkeypatch):
    """The same attack with the audit off: it works. So the test above tests the audit."""
    caplog.set_level(logging.INFO, logger="hivecli.averaging")
    inputs = honest_inputs(15)
    with group_of_three("no-audit", inputs, verify_reducers=False) as avs:
        attacker = avs[2].peer_id
        lying_reducer(monkeypatch, attacker)
        order = run_round(avs, hostile=2)
        lo, hi = span_of(order, attacker)
        for av in avs[:2]:
            assert torch.equal(values(av)[lo:hi], torch.full((hi - lo,), 666.0, dtype=torch.float64))
            assert attacker not in av.banned_peers
        assert not warnings_naming(caplog, attacker)


@pytest.mark.parametrize("link", ["stream", "published"], indirect=True)
def test_a_reducer_whose_published_averages_we_read_is_not_audited(request, monkeypatch, link):
    """Only a process of our own user can publish a buffer we map (sharedmem.py, "Trust"), and
    it could rewrite it after any check: its readers ask it for no audit. Every other reducer
    (here: on the part streams) is audited by each of its senders."""
    inputs = honest_inputs(17)
    audited = []  # (sender, reducer)
    check = ReducerAudit.check

    async def counted(self, stream, j, chunks, results):
        audited.append((self.index, j))
        await check(self, stream, j, chunks, results)

    monkeypatch.setattr(ReducerAudit, "check", counted)
    with group_of_three("audited-or-not", inputs) as avs:
        run_round(avs)
        mean3 = flat([(a + b + c) / 3 for a, b, c in zip(*inputs, strict=True)])
        for av in avs:
            torch.testing.assert_close(values(av), mean3, rtol=0, atol=1e-6)
    published = request.node.callspec.params["link"] == "published"
    # published: none; else each of 3 senders audits its 2 other reducers (a retried round audits again)
    assert set(audited) == (set() if published else {(i, j) for i in range(3) for j in range(3) if i != j})
    assert link()


def test_a_reducer_that_does_not_answer_the_audit_is_a_failed_reducer(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="hivecli.averaging")
    # on the part streams: a reducer whose published averages we read is not audited
    monkeypatch.setattr("hivecli.averaging.allreduce.AllReduceRunner._shared_with", lambda self, connection: None)
    inputs = honest_inputs(16)
    with group_of_three("mute-auditee", inputs, next_chunk_timeout=2.0) as avs:
        attacker = avs[2].peer_id
        answer = AllReduceRunner._answer_audit_or_end

        async def mute(self, stream, sender, reads_published):
            if self.host.peer_id == attacker:
                await asyncio.sleep(3600)  # holds the stream open and never answers
            await answer(self, stream, sender, reads_published)

        monkeypatch.setattr(AllReduceRunner, "_answer_audit_or_end", mute)
        order = run_round(avs, hostile=2)
        lo, hi = span_of(order, attacker)
        mean3 = flat([(a + b + c) / 3 for a, b, c in zip(*inputs, strict=True)])
        for av, mine in zip(avs[:2], inputs[:2], strict=True):
            got = values(av)
            assert torch.equal(got[lo:hi], flat(mine)[lo:hi])
            keep = torch.ones_like(got, dtype=torch.bool)
            keep[lo:hi] = False
            torch.testing.assert_close(got[keep], mean3[keep], rtol=0, atol=1e-6)
            assert attacker not in av.banned_peers  # silence proves no lie
        assert len(named(caplog, attacker, "did not answer the audit")) == 2


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_audit_values_are_bit_identical_to_decoding_the_whole_chunk(codec, dtype):
    """A sender re-encodes only what its audited values depend on; the reducer decodes only
    them: both must equal what the full chunk gives, or honest reducers would fail audits."""
    torch.manual_seed(17)
    c = CODECS[codec]()
    for n in (1, 5, 4096, 10_000):
        x = (torch.randn(n) * 3 + 1).to(dtype)
        meta, data = c.encode(x)
        full = c.decode(meta, data, n)
        offsets = sorted({0, n - 1, n // 2, min(4095, n - 1), min(4096, n - 1), 3 % n})
        assert _encoded_values(c, x, offsets) == [float(full[o]) for o in offsets]
        assert [_decode_one(c, meta, data, n, o) for o in offsets] == [float(full[o]) for o in offsets]
        assert _decode_at(c, meta, data, n, offsets) == [float(full[o]) for o in offsets]  # in one gather
    with pytest.raises(ValueError, match="chunk of"):  # a chunk shorter than its values: malformed
        _decode_at(c, meta, data[:8], n, [0, n - 1])


def test_packed_audit_answers_parse_as_the_lists_of_older_reducers():
    rows = [([1, 0], [0.5, 2.0]), ([1, 0, 2], [-1.25, 3.0, 1e-30])]
    weights = [[0, 1.0], [1, 1.0], [2, 0.5]]
    expected = ({0: 1.0, 1: 1.0, 2: 0.5}, [{1: 0.5, 0: 2.0}, {1: -1.25, 0: 3.0, 2: 1e-30}])
    packed = {"weights": weights, **_pack_rows(rows)}
    assert _parse_audit_answer(unpack(pack(packed)), 2, 3) == expected
    listed = {"weights": weights, "inputs": [[[k, v] for k, v in zip(*row, strict=True)] for row in rows]}
    assert _parse_audit_answer(listed, 2, 3) == expected

    def bad(**changes):
        return {**packed, **changes}

    for answer in (
        bad(counts=[2]),  # no row for the second position
        bad(counts=[2, 4]),  # more values than members
        bad(counts=[2, 2]),  # counts that do not match the bytes
        bad(counts=[0, 5]),
        bad(counts=[2, True]),
        bad(members=packed["members"][:-2]),
        bad(members=struct.pack("<5H", 1, 0, 1, 0, 9)),  # no such member
        bad(members=struct.pack("<5H", 1, 1, 1, 0, 2)),  # a member twice in a row
        bad(values=struct.pack("<5d", 0.5, 2.0, math.nan, 3.0, 1.0)),
        bad(values=struct.pack("<5d", 0.5, 2.0, math.inf, 3.0, 1.0)),
        bad(values="not bytes"),
        bad(members=None),
    ):
        assert isinstance(_parse_audit_answer(answer, 2, 3), str), answer


def test_audit_positions_are_random_distinct_and_inside_the_span():
    for lo, hi, count in ((0, 10, 10), (5, 1_000_005, 8), (100, 103, 8), (7, 8, 3)):
        positions = [_choose_positions(lo, hi, count) for _ in range(50)]
        assert all(len(p) == count and all(lo <= x < hi for x in p) for p in positions)
        if hi - lo >= count:
            assert all(len(set(p)) == count for p in positions)
        if hi - lo > count:
            assert len({tuple(p) for p in positions}) > 1


def test_malformed_audit_answers_are_named():
    good = {"weights": [[0, 1.0], [1, 1.0]], "inputs": [[[1, 0.5], [0, 2.0]]]}
    assert _parse_audit_answer(good, 1, 2) == ({0: 1.0, 1: 1.0}, [{1: 0.5, 0: 2.0}])
    for bad in (
        [],
        {"weights": [[0, 1.0]], "inputs": []},  # no row for the position
        {"weights": [[5, 1.0]], "inputs": [[[0, 1.0]]]},  # no such member
        {"weights": [[0, 1.0], [0, 2.0]], "inputs": [[[0, 1.0]]]},  # a member twice
        {"weights": [[0, 1.0]], "inputs": [[[0, math.nan]]]},
        {"weights": [[True, 1.0]], "inputs": [[[0, 1.0]]]},
        {"weights": [[0, 1.0]], "inputs": [[[0, "1"]]]},
    ):
        assert isinstance(_parse_audit_answer(bad, 1, 2), str), bad


# ---- hostile state donors ---------------------------------------------------------------------


def declared(dht, prefix):
    found = dht.get(f"{prefix}.all_averagers", latest=True)
    return {str(owner): value for owner, value, _ in owned_entries(found) if value is not None}


class ForgedDonor(DecentralizedAverager):
    """Serves whatever (metadata, tensors) the test puts in `forged`."""

    forged = None

    def get_current_state(self):
        return self.forged


def test_a_donor_with_a_non_finite_state_is_skipped_banned_and_the_next_used(caplog):
    caplog.set_level(logging.INFO, logger="hivecli.averaging")
    with local_swarm(4, **DHT_FAST) as dhts, contextlib.ExitStack() as stack:
        liar = stack.enter_context(ForgedDonor([torch.zeros(100)], dhts[0], prefix="st", state_sharing_priority=1e18))
        liar.forged = ({}, [torch.full((100,), math.nan)])
        infinite = stack.enter_context(
            DecentralizedAverager([torch.full((100,), 9.0)], dhts[1], prefix="st", state_sharing_priority=math.inf)
        )
        honest = stack.enter_context(
            DecentralizedAverager([torch.full((100,), 1.0)], dhts[2], prefix="st", state_sharing_priority=1.0)
        )
        newcomer = stack.enter_context(
            DecentralizedAverager([torch.zeros(100)], dhts[3], prefix="st", allow_state_sharing=False)
        )
        everyone = {str(av.peer_id) for av in (liar, infinite, honest)}
        wait_for(lambda: everyone <= set(declared(dhts[3], "st")), 10, "the donors' declarations")
        _, tensors = newcomer.load_state_from_peers(timeout=20)
        assert torch.equal(tensors[0], torch.full((100,), 1.0))  # the inf-priority donor is never asked
        assert liar.peer_id in newcomer.banned_peers
        assert named(caplog, liar.peer_id, "NaN or inf")
        caplog.clear()
        _, tensors = newcomer.load_state_from_peers(timeout=20)  # skipped without a download now
        assert torch.equal(tensors[0], torch.full((100,), 1.0))
        assert not named(caplog, liar.peer_id, "Refused")


class ForgedTrainingDonor(TrainingAverager):
    """A training peer whose shared state the test tampers with."""

    tamper = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a hostile donor does not run our check: it serves NaN if it wants to
        self.shared_state = dataclasses.replace(self.shared_state, finite_only=False)

    def get_current_state(self):
        metadata, tensors = self.state.get()
        return self.tamper(metadata, [t.clone() for t in tensors])


def training_peer(cls, dht, seed, **kwargs):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, cls(opt, dht, prefix="train-st", target_group_size=2, start=True, **kwargs)


def nan_params(metadata, tensors):
    tensors[0].fill_(math.nan)
    return metadata, tensors


def huge_step(metadata, tensors):
    return dict(metadata, step=10**12), tensors


def tensor_entry_as_int(metadata, tensors):
    return dict(metadata, optimizer_state=[[0, "momentum_buffer", 5]]), tensors  # crashed joiners: int.mul_


def step_as_string(metadata, tensors):
    return dict(metadata, step="7"), tensors


@pytest.mark.parametrize("tamper", [nan_params, huge_step, tensor_entry_as_int, step_as_string])
def test_a_training_donor_with_a_bad_state_is_skipped_for_the_next(caplog, tamper):
    caplog.set_level(logging.INFO, logger="hivecli.averaging")
    with local_swarm(3, **DHT_FAST) as dhts, contextlib.ExitStack() as stack:
        _, liar = training_peer(ForgedTrainingDonor, dhts[0], 1, state_sharing_priority=1e18)
        stack.callback(liar.shutdown)
        liar.tamper = staticmethod(tamper)
        honest_model, honest = training_peer(TrainingAverager, dhts[1], 2, state_sharing_priority=5.0)
        stack.callback(honest.shutdown)
        honest.local_step = 5
        new_model, newcomer = training_peer(TrainingAverager, dhts[2], 3, allow_state_sharing=False)
        stack.callback(newcomer.shutdown)
        donors = {str(liar.peer_id), str(honest.peer_id)}
        wait_for(lambda: donors <= set(declared(dhts[2], "train-st")), 10, "the donors' declarations")
        loaded = newcomer.load_state_from_peers(timeout=20, max_step=1000)
        assert loaded is not None and loaded[0]["step"] == 5 and newcomer.local_step == 5
        for mine, theirs in zip(new_model.parameters(), honest_model.parameters(), strict=True):
            assert torch.equal(mine, theirs)
        assert liar.peer_id in newcomer.banned_peers
        assert named(caplog, liar.peer_id, "Refused the state")


def test_max_step_must_be_a_non_negative_int():
    with local_swarm(1, **DHT_FAST) as dhts:
        _, av = training_peer(TrainingAverager, dhts[0], 4)
        try:
            with pytest.raises(ConfigError, match="max_step"):
                av.load_state_from_peers(max_step=-1)
        finally:
            av.shutdown()


def test_a_chunk_sent_again_never_overwrites_the_checked_one():
    """The sink hands out each chunk's region once: a second body for chunk 0 (sent again, or
    after the last chunk) comes as bytes and fails the order check, and the checked chunk, which
    may still wait to be averaged or copied, keeps its values."""
    from hivecli.averaging.buffers import BufferPool, ChunkedBuffer

    codec = CODECS["none"]()
    chunks = Layout([8]).chunks(0, 8, 4)
    received = ChunkedBuffer(BufferPool(), ("recv", 1), chunks, codec)
    meta, data = codec.encode(torch.ones(4))
    region = received.sink([0, meta], data.nbytes)
    assert region is not None
    region[:] = data  # what the read loop does with the body
    assert torch.equal(received.place(0, [0, meta], region), torch.ones(4))
    assert received.sink([0, meta], data.nbytes) is None  # again: not into the region
    _, poison = codec.encode(torch.full((4,), math.nan))
    with pytest.raises(ValueError, match="expected chunk 1"):
        received.place(1, [0, meta], bytes(poison))
    assert torch.equal(received.decode(0), torch.ones(4))


def test_finished_part_streams_are_forgotten_round_after_round():
    """A sender that has every average ends its stream and never reads the reducer's end; the
    stream must still be forgotten once that end arrives (one per reducer and round otherwise,
    each able to write into the pooled buffers of later rounds)."""
    inputs = honest_inputs(12)
    with group_of_three("forgotten", inputs) as avs:
        for _ in range(3):
            run_round(avs)

        def streams_left():
            left = 0
            for av in avs:
                host = av.dht._node.host  # a peek across threads: counts only
                left += sum(len(conn._streams) for conn in list(host._connections.values()))
            return left

        wait_for(lambda: streams_left() == 0, timeout=10, what="every part stream to be forgotten")


def test_a_reducer_answers_older_senders_in_lists_and_newer_ones_packed():
    """Senders of step 9 and earlier ask without "packed" and read lists of [member, value]: a
    reducer answers them so, with the same values as the packed answer it gives newer senders."""
    from hivecli.averaging.audit import ReducerAudit
    from hivecli.averaging.buffers import BufferPool, ChunkedBuffer

    torch.manual_seed(3)
    members, numel = 3, 3000
    codec = CODECS["none"]()
    settings = AveragingSettings(audit_positions=5)
    layout = Layout([numel])
    spans = layout.spans([numel // members] * members)
    inputs = [torch.randn(numel) for _ in range(members)]
    me = 1
    chunks = layout.chunks(*spans[me], 400)  # three chunks of our span
    audit = ReducerAudit(me, 1.0, members, [inputs[me].clone()], spans, chunks, codec, settings, BufferPool())
    received = {}
    for k in (0, 2):
        buffer = received[k] = ChunkedBuffer(BufferPool(), ("recv", k), chunks, codec)
        for c, chunk in enumerate(chunks):
            meta, data = codec.encode(inputs[k][chunk.start : chunk.end])
            buffer.place(c, [c, meta], bytes(data))
    for c, chunk in enumerate(chunks):
        audit.keep_input(c, inputs[me][chunk.start : chunk.end], [0, 2])
    positions = _choose_positions(*spans[me], 5)
    raw = {0: 1.0, 1: 1.0, 2: 2.0}
    listed = audit.answer({"audit": positions}, raw, received)
    packed = audit.answer({"audit": positions, "packed": True}, raw, received)
    assert "inputs" in listed and "values" in packed
    expected = [{k: float(inputs[k][p]) for k in (1, 0, 2)} for p in positions]
    assert _parse_audit_answer(listed, 5, members) == (raw, expected)
    assert _parse_audit_answer(packed, 5, members) == (raw, expected)
    assert [next(iter(row)) for row in _parse_audit_answer(packed, 5, members)[1]] == [me] * 5  # our own first
