"""`DecentralizedAverager`: average a set of tensors with whichever peers are online.

It lives on the DHT's event loop and host (same peer id, same connections). `step()` finds a
group (matchmaking.py), averages in place with it (allreduce.py) and returns what each member
passed as `gather`. `load_state_from_peers()` downloads another peer's state (state.py).

Peers caught hostile (non-finite values sent or returned in a round, an invalid state served)
are banned for `ban_duration`: `banned_peers` lists them; matchmaking neither accepts them
into our groups nor joins theirs, rounds neither serve nor send to them, and state downloads
skip them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import hashlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from enum import Enum
from typing import Any

import torch

from hivecli._exceptions import AllreduceError, ConfigError, HiveError
from hivecli.averaging.allreduce import PART_METHOD, AllReduceRunner, RunnerRegistry
from hivecli.averaging.buffers import BufferPool
from hivecli.averaging.channel import PENDING
from hivecli.averaging.compression import AutoCompression, Codec, get_codec
from hivecli.averaging.group import GroupInfo, method_name
from hivecli.averaging.link import LinkMeter, RoundPlan, spans_take_bulk_links
from hivecli.averaging.matchmaking import JOIN_METHOD, Matchmaker
from hivecli.averaging.pacing import Pacer
from hivecli.averaging.settings import AveragingSettings
from hivecli.averaging.sharedmem import SharedBuffers
from hivecli.averaging.slices import SliceWorkers, threads_for
from hivecli.averaging.state import (
    STATE_METHOD,
    CopyState,
    InvalidStateError,
    SharedState,
    StateServer,
    StateSnapshot,
    describe,
    download_state,
    find_donors,
)
from hivecli.cores import cores_per_peer, single_threaded_here
from hivecli.dht.dht import DHT
from hivecli.dht.node import DHTNode
from hivecli.net.connection import Stream
from hivecli.net.identity import PeerID
from hivecli.utils.loops import timeout as _timeout
from hivecli.utils.loops import wait_event

logger = logging.getLogger(__name__)
StateValidator = Callable[[Any, list[torch.Tensor]], None]
_SETTING_NAMES = [f.name for f in dataclasses.fields(AveragingSettings)]
CORES_RECOUNT_S = 60.0  # how often a peer counts its cores again (peers come and go): _cores_here


class Stage(Enum):
    IDLE = "idle"
    LOOKING_FOR_GROUP = "looking_for_group"
    AWAITING_TRIGGER = "awaiting_trigger"  # a scheduled step's group formed; allow_allreduce() not yet called
    RUNNING_ALLREDUCE = "running_allreduce"
    FINISHED = "finished"


class StepControl:
    """A step in flight (`step(wait=False)`): wait on it, await it, or cancel it.

    A step started with `scheduled=True` finds its group at once but starts the all-reduce
    only after `allow_allreduce()`: a training peer looks for its group while it finishes
    the epoch's last batches, fills the tensors, sets `weight`, then lets the round go.
    Meanwhile (stage AWAITING_TRIGGER) the members that already run wait for it: it tells
    them it is alive, and they give up on it after half their allreduce_timeout, or as soon
    as its connection breaks (allreduce.py). A client-mode member cannot tell them: it is
    waited for only request_timeout.
    `timings` records when each stage began (time.perf_counter), for benchmarks and logs.
    """

    def __init__(self, weight: float = 1.0, scheduled: bool = False) -> None:
        self.stage = Stage.IDLE
        self.timings: dict[str, float] = {"created": time.perf_counter()}
        self.group_size = 0
        self.weight = weight
        self._future: Any = None  # concurrent.futures.Future of the step coroutine
        self._allowed = threading.Event()
        if not scheduled:
            self._allowed.set()
        self._wake: Callable[[], None] | None = None  # wakes the step waiting for allow_allreduce

    def allow_allreduce(self, weight: float | None = None) -> None:
        """Let a scheduled step average the tensors as they are now, with `weight` if given.

        Raises:
            ConfigError: weight is not a finite number >= 0.
        """
        if weight is not None:
            self.weight = _check_weight(weight)
        self._allowed.set()
        if self._wake is not None:
            self._wake()

    @property
    def allreduce_allowed(self) -> bool:
        return self._allowed.is_set()

    def _enter(self, stage: Stage) -> None:
        self.stage = stage
        self.timings[stage.value] = time.perf_counter()

    def result(self, timeout: float | None = None) -> dict[PeerID, Any]:
        """The group's gathered data, {peer id: gather}. Raises what the step raised."""
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> bool:
        """Stop the step: leave matchmaking, or abandon the all-reduce (tensors keep their values
        outside the parts already averaged)."""
        return self._future.cancel()

    def __await__(self) -> Any:
        return asyncio.wrap_future(self._future).__await__()


class DecentralizedAverager:
    """Averages `averaged_tensors` in place with other peers under the same `prefix`.

    Args:
        averaged_tensors: CPU tensors, contiguous and floating point; the averager uses them
            in place. Change them only inside `with averager.get_tensors() as tensors:`.
        dht: a running `hivecli.DHT`; the averager shares its host and event loop.
        prefix: the run's name; only peers with the same prefix and tensor shapes average together.
        target_group_size, min_group_size, min_matchmaking_time, request_timeout,
        allreduce_timeout, next_chunk_timeout: see `AveragingSettings` (defaults there);
            other `AveragingSettings` fields can be passed as keyword arguments too.
        compression: codec on the wire: "none" (default), "fp16", "uniform8bit", "blockwise8bit".
        bandwidth: this peer's share of the reduction work relative to others (None: equal).
        client_mode: only send, never reduce or accept connections (default: the DHT's mode).
        allow_state_sharing: let others download our state (default: not in client mode).
        state_sharing_priority: donors with a higher priority are asked first (e.g. the step).
        shared_state: what newcomers download (default: the averaged tensors, no metadata).
        start: start serving at once (else call `run_in_background()`).

    Raises:
        ConfigError: a tensor, setting or name is not valid (the message names it).
    """

    def __init__(
        self,
        averaged_tensors: Sequence[torch.Tensor],
        dht: DHT,
        *,
        prefix: str,
        target_group_size: int | None = None,
        min_group_size: int = 2,
        compression: str | Codec | None = None,
        bandwidth: float | None = None,
        client_mode: bool | None = None,
        allow_state_sharing: bool | None = None,
        state_sharing_priority: float = 0.0,
        shared_state: SharedState | None = None,
        start: bool = False,
        settings: AveragingSettings | None = None,
        **setting_overrides: Any,
    ):
        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise ConfigError(f"prefix = {prefix!r}: must be a non-empty name without spaces, e.g. 'my-run'")
        for name in setting_overrides:
            if name not in _SETTING_NAMES:
                close = difflib.get_close_matches(name, _SETTING_NAMES, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known settings: {', '.join(_SETTING_NAMES)}"
                raise ConfigError(f"DecentralizedAverager() got an unknown argument {name!r}{hint}")
        overrides = dict(setting_overrides, min_group_size=min_group_size)
        if target_group_size is not None:
            overrides["target_group_size"] = target_group_size
        self.settings = dataclasses.replace(settings or AveragingSettings(), **overrides)
        self._averaged_tensors = _check_tensors(averaged_tensors)
        if bandwidth is not None and not (math.isfinite(bandwidth) and bandwidth >= 0):
            raise ConfigError(f"bandwidth = {bandwidth}: must be a finite number >= 0")
        self.dht, self.prefix, self.bandwidth = dht, prefix, bandwidth
        self.codec = get_codec(compression)
        self.client_mode = dht.client_mode if client_mode is None else bool(client_mode)
        self._allow_state_sharing = (not self.client_mode) if allow_state_sharing is None else allow_state_sharing
        self._state_sharing_priority = float(state_sharing_priority)
        self.schema_hash = self._schema_hash()
        self.lock_averaged_tensors = threading.Lock()
        self.shared_state = shared_state or SharedState(
            lambda: ({}, self._averaged_tensors), self.lock_averaged_tensors
        )
        self._pool = BufferPool()
        # buffers that peers on this host write our parts and averages into (sharedmem.py)
        self._shared = SharedBuffers(dht.peer_id.to_bytes()) if self.settings.shared_memory else None
        self._link = LinkMeter()  # what our rounds measured of our link, for the rounds we lead
        self._pacer = Pacer(self.settings.uplink_mbps, self.settings.pacing)  # how fast our rounds may send
        self._bulk_spans = False  # what bulk_links = "auto" chose for our last round (logged when it changes)
        self._cores: tuple[float, int] | None = None  # (monotonic time, cores_per_peer()): _cores_here
        self._counting: asyncio.Future[int] | None = None  # a count of our cores under way
        self._slices = SliceWorkers()  # threads for a round's big copies and reductions, by our cores
        # what `hive monitor` shows of our averaging: totals, and the latest rounds as
        # (unix time, group size, seconds, ok); written by the DHT thread, read by anyone
        self.bytes_sent = self.bytes_received = 0
        self.recent_rounds: deque[tuple[float, int, float, bool]] = deque(maxlen=16)
        self._registry = RunnerRegistry()
        self._matchmaker: Matchmaker | None = None
        self._state_server: StateServer | None = None
        self._steps: set[asyncio.Task[Any]] = set()
        self._step_lock: asyncio.Lock | None = None  # one step at a time; a cancelled one unwinds first
        self._running = False
        self._banned: dict[PeerID, tuple[float, str]] = {}  # peer -> (time.monotonic() it ends, why)
        if start:
            self.run_in_background()

    def _schema_hash(self) -> bytes:
        description = [(tuple(t.shape), str(t.dtype)) for t in self._averaged_tensors]
        return hashlib.sha1(repr((description, self.codec.name)).encode()).digest()

    @property
    def peer_id(self) -> PeerID:
        return self.dht.peer_id

    # ---- life cycle -----------------------------------------------------------------------------

    def run_in_background(self, await_ready: bool = True, timeout: float | None = None) -> None:
        """Start serving join, part and state requests on the DHT's host."""
        if self._running:
            return
        self.dht.run_coroutine(lambda _dht, node: self._start(node))
        self._running = True

    async def _start(self, node: DHTNode) -> None:
        single_threaded_here()  # our reductions and copies run on this thread: see its docstring
        self._step_lock = asyncio.Lock()
        self._matchmaker = Matchmaker(
            node,
            self.prefix,
            self.schema_hash,
            self.settings,
            self.client_mode,
            is_banned=self._is_banned,
            plan_round=self._plan_round,
        )
        node.host.add_stream_handler(method_name(PART_METHOD, self.prefix), self._serve_part, self._part_sink)
        self._state_server = StateServer(
            node,
            self.prefix,
            self._snapshot_state,
            self.settings.chunk_bytes,
            self.settings.declare_state_period,
            self.settings.shared_memory,
        )
        self._state_server.update(self._allow_state_sharing, self._state_sharing_priority)

    def is_alive(self) -> bool:
        return self._running and self.dht.is_alive()

    def shutdown(self) -> None:
        """Stop serving and cancel steps in flight. Idempotent; the DHT keeps running."""
        if not self._running:
            return
        self._running = False
        if self.dht.is_alive():
            with contextlib.suppress(RuntimeError):
                self.dht.run_coroutine(lambda _dht, node: self._stop(node))
        self._slices.close()  # also when the DHT stopped first, and _stop never ran

    async def _stop(self, node: DHTNode) -> None:
        for task in list(self._steps):
            task.cancel()
        await asyncio.gather(*self._steps, return_exceptions=True)
        for method in (JOIN_METHOD, PART_METHOD, STATE_METHOD):
            node.host.remove_stream_handler(method_name(method, self.prefix))
        if self._matchmaker is not None:
            await self._matchmaker.aclose()
        if self._state_server is not None:
            await self._state_server.aclose()
        self._pool.clear()
        if self._shared is not None:
            self._shared.clear()
        self._slices.close()
        if self._counting is not None:
            self._counting.cancel()
            await asyncio.gather(self._counting, return_exceptions=True)

    def __enter__(self) -> DecentralizedAverager:
        self.run_in_background()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- banned peers -----------------------------------------------------------------------------

    @property
    def banned_peers(self) -> dict[PeerID, str]:
        """Peers banned for hostile behaviour, and why; each ban lasts `ban_duration` seconds."""
        now = time.monotonic()
        return {peer: why for peer, (until, why) in list(self._banned.items()) if until > now}

    def _is_banned(self, peer: PeerID) -> bool:
        entry = self._banned.get(peer)
        return entry is not None and entry[0] > time.monotonic()

    def ban(self, peer: PeerID, reason: str) -> None:
        """Refuse `peer` as a sender, reducer and state donor for `ban_duration` seconds."""
        if self.settings.ban_duration > 0:
            self._banned[peer] = (time.monotonic() + self.settings.ban_duration, reason)
            for expired in [p for p, (until, _) in list(self._banned.items()) if until <= time.monotonic()]:
                self._banned.pop(expired, None)

    # ---- tensors --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def get_tensors(self) -> Iterator[list[torch.Tensor]]:
        """Lock the averaged tensors and yield them; a step waits until the block ends.
        Keep the block short: an all-reduce in progress also waits for it."""
        with self.lock_averaged_tensors:
            yield self._averaged_tensors

    # ---- averaging ------------------------------------------------------------------------------

    def step(
        self,
        gather: Any = None,
        weight: float | None = None,
        timeout: float | None = None,
        allow_retries: bool = True,
        wait: bool = True,
        scope: str = "",
        scheduled: bool = False,
    ) -> dict[PeerID, Any] | StepControl:
        """Find a group and average the tensors with it, in place.

        Args:
            gather: msgpack-able data to share with the group (returned from every member).
            weight: this peer's weight in the average (default 1.0; 0 contributes nothing): meant
                to be its sample count since the last round. Reducers cap it at
                `max_weight_ratio` times the group's median weight, and the robust
                `aggregation` modes use it only to leave out zero-weight peers.
            timeout: seconds to find a group (default settings.step_timeout); the all-reduce
                itself is bounded by allreduce_timeout.
            allow_retries: look for another group if an all-reduce fails as a whole.
            wait: False returns a `StepControl` at once.
            scope: only peers whose step has the same scope group together, e.g. "epoch-12":
                peers averaging the gradients of different epochs must not meet.
            scheduled: find the group now, average after `StepControl.allow_allreduce()`
                (implies wait=False); the all-reduce waits for it at most until `timeout`.

        Returns:
            {peer id: gather} for every member of the group (or a StepControl).

        Raises:
            MatchmakingError: no group of at least min_group_size formed within the timeout.
            AllreduceError: the all-reduce failed and no retry was allowed or possible.
        """
        if not self._running:
            raise RuntimeError("the averager is not running; pass start=True or call run_in_background()")
        if not isinstance(scope, str) or len(scope) > 64 or any(c.isspace() for c in scope):
            raise ConfigError(f"scope = {scope!r}: must be a name of at most 64 characters without spaces")
        control = StepControl(_check_weight(1.0 if weight is None else weight), scheduled)
        timeout = self.settings.step_timeout if timeout is None else float(timeout)
        control._future = self.dht.run_coroutine(
            lambda _dht, _node: self._step(control, gather, timeout, allow_retries, scope),
            return_future=True,
        )
        return control.result() if wait and not scheduled else control

    async def _step(
        self, control: StepControl, gather: Any, timeout: float, allow_retries: bool, scope: str
    ) -> dict[PeerID, Any]:
        assert self._matchmaker is not None and self._step_lock is not None
        task = asyncio.current_task()
        assert task is not None
        self._steps.add(task)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with self._step_lock:
                return await self._step_locked(control, gather, deadline, allow_retries, scope)
        finally:
            self._steps.discard(task)
            if control.stage != Stage.FINISHED:
                control._enter(Stage.FINISHED)

    async def _step_locked(
        self, control: StepControl, gather: Any, deadline: float, allow_retries: bool, scope: str
    ) -> dict[PeerID, Any]:
        assert self._matchmaker is not None
        node, loop = self._matchmaker.node, asyncio.get_running_loop()
        while True:
            control._enter(Stage.LOOKING_FOR_GROUP)
            group = await self._matchmaker.look_for_group(gather, self.bandwidth, deadline, scope)
            try:
                if not control.allreduce_allowed:  # the others' part streams hear "pending"
                    control._enter(Stage.AWAITING_TRIGGER)
                    self._registry.expect(group.group_id)
                await self._wait_until_allowed(control, deadline)
                control._enter(Stage.RUNNING_ALLREDUCE)
                control.group_size = len(group.members)
                await self._run_allreduce(node, group, control.weight)
            except AllreduceError as e:
                if not allow_retries or loop.time() >= deadline:
                    raise
                logger.warning("%s; looking for another group", e)
                continue
            finally:
                self._registry.unregister(group.group_id)
            control._enter(Stage.FINISHED)
            return {member.peer_id: member.gathered for member in group.members}

    async def _wait_until_allowed(self, control: StepControl, deadline: float) -> None:
        """A scheduled step's group has formed: wait for the owner to fill the tensors.

        Raises:
            AllreduceError: allow_allreduce() did not come before the step's deadline.
        """
        if control.allreduce_allowed:
            return
        loop, allowed = asyncio.get_running_loop(), asyncio.Event()
        control._wake = lambda: loop.call_soon_threadsafe(allowed.set)
        if control.allreduce_allowed:  # allowed between the check and the hook
            return
        if not await wait_event(allowed, max(0.0, deadline - loop.time())):
            raise AllreduceError("the scheduled round was not allowed to start before its timeout")

    async def _run_allreduce(self, node: DHTNode, group: GroupInfo, weight: float) -> None:
        while not self.lock_averaged_tensors.acquire(blocking=False):
            await asyncio.sleep(0.001)  # polling, not a thread: a cancelled step must not take the lock later
        try:
            codec = self._round_codec(group)
            settings = self.settings
            if group.plan.chunk_bytes is not None:
                settings = dataclasses.replace(settings, chunk_bytes=group.plan.chunk_bytes)
            cores = await self._cores_here()
            self._slices.resize(threads_for(cores))
            if settings.bulk_links == "auto":  # the runner sees what "auto" chose for this round
                bulk = self._auto_bulk_spans(cores)
                settings = dataclasses.replace(settings, bulk_links="all" if bulk else "state")
            pace, sampler = self._pacer.start_round(group.group_id)
            runner = AllReduceRunner(
                node.host,
                group,
                self._averaged_tensors,
                weight,
                codec,
                settings,
                self._pool,
                self.banned_peers,
                method_name(PART_METHOD, self.prefix),
                self._slices,
                pace,
                sampler,
                self._shared,
            )
            self._registry.register(runner)
            started = asyncio.get_running_loop().time()
            ok = False
            try:
                await runner.run()
                ok = True
            finally:
                for peer, why in runner.offenders.items():
                    self.ban(peer, why)
                seconds = asyncio.get_running_loop().time() - started
                self.bytes_sent += runner.sent_bytes
                self.bytes_received += runner.received_bytes
                self.recent_rounds.append((time.time(), len(group.members), seconds, ok))
                # a failed round's retransmissions (to a member that vanished) say nothing of the link
                self._pacer.end_round(sampler if ok else None)
                if self._shared is not None:
                    self._shared.end_round()
            auto = self.codec if isinstance(self.codec, AutoCompression) else None
            busy = auto.conversion_seconds(codec.name, runner.converted) if auto is not None else 0.0
            self._link.observe(runner.sent_bytes, seconds, busy)
        finally:
            self.lock_averaged_tensors.release()
        logger.debug("Averaged with %d peers in group %s", len(group.members), group.group_id.hex()[:8])

    async def _cores_here(self) -> int:
        """This peer's share of the machine's cores (`hive local 4` on 4 cores: 1 each), counted
        on a worker thread (it scans the process table: milliseconds, more on a host with
        thousands of processes). The first round waits for the count; every CORES_RECOUNT_S
        after that it is counted again in the background, while rounds use the last count (the
        group would wait for the scan)."""
        if self._cores is None:
            return await asyncio.shield(self._count_cores())
        if time.monotonic() - self._cores[0] > CORES_RECOUNT_S:
            self._count_cores()
        return self._cores[1]

    def _count_cores(self) -> asyncio.Future[int]:
        """The count under way, or a new one; its result lands in self._cores."""
        if self._counting is None:
            self._counting = asyncio.ensure_future(asyncio.to_thread(cores_per_peer))
            self._counting.add_done_callback(self._counted)
        return self._counting

    def _counted(self, counting: asyncio.Future[int]) -> None:
        self._counting = None
        if not counting.cancelled() and counting.exception() is None:
            self._cores = (time.monotonic(), counting.result())

    def _auto_bulk_spans(self, cores: int) -> bool:
        """Whether this round's spans take bulk links under bulk_links = "auto", for a peer with
        `cores` cores (_cores_here); says so once whenever that changes, since it changes how a
        round uses the machine (worker threads)."""
        rate = self._link.rate
        bulk = spans_take_bulk_links(rate, cores, self._pacer.rate is not None)
        if bulk != self._bulk_spans:
            self._bulk_spans = bulk
            logger.info(
                "Averaging rounds now send their spans on %s (bulk_links = 'auto': %d cores for this peer, link "
                "measured at %s)",
                "bulk links, a connection of their own each" if bulk else "the peers' connections",
                cores,
                "?" if rate is None else f"{rate / 1e6:.0f} MB/s",
            )
        return bulk

    def _plan_round(self, group_size: int = 2) -> RoundPlan:
        """How a round we lead travels: chunks sized for our link, and with "auto" the codec."""
        codec = self.codec.choose(self._link.rate) if isinstance(self.codec, AutoCompression) else None
        return RoundPlan(codec, self._link.chunk_bytes(self.settings.chunk_bytes, group_size - 1))

    def _round_codec(self, group: GroupInfo) -> Codec:
        """Our codec; with "auto", the one the group's leader chose for every member.

        Raises:
            AllreduceError: the leader chose a codec that "auto" never picks.
        """
        if not isinstance(self.codec, AutoCompression):
            return self.codec
        name = group.plan.codec or "none"
        if name not in AutoCompression.choices:
            raise AllreduceError(f'the group\'s leader chose compression {name!r}, which "auto" never picks')
        return get_codec(name)  # type: ignore[return-value]  # a plain codec's name

    def _part_sink(self, stream: Stream, payload: Any) -> None:
        """A part stream's body sink, set before _serve_part runs, when our runner for its group
        is set up already: the sender's first chunks follow its request at once (allreduce.py's
        EAGER_BYTES), and then land in their buffer instead of fresh bytes copied there later."""
        group_id = payload.get("group_id") if isinstance(payload, dict) else None
        runner = self._registry.registered(group_id) if isinstance(group_id, bytes) else None
        if runner is not None:
            runner.prepare_sender(stream, payload)

    async def _serve_part(self, stream: Stream, payload: Any, body: bytes) -> None:
        group_id = payload.get("group_id") if isinstance(payload, dict) else None
        if not isinstance(group_id, bytes):
            raise HiveError("a part request must name its group_id")

        async def pending() -> None:  # our owner holds the round: the sender waits, knowing we are alive
            await stream.send(PENDING)

        wait = payload.get("wait") is True  # the sender understands "pending"
        runner = await self._registry.find(group_id, self.settings.request_timeout, pending if wait else None)
        if runner is None:
            raise HiveError(f"this peer is not averaging in group {group_id.hex()[:8]}")
        await runner.serve_sender(stream, payload)

    # ---- state sharing ----------------------------------------------------------------------------

    @property
    def uplink_pace_mbps(self) -> float | None:
        """The rate (Mbit/s) that this peer's next averaging round may send at, all its
        connections together: from `uplink_mbps`, or what pacing = "auto" learned; None: unpaced."""
        rate = self._pacer.rate
        return None if rate is None else rate * 8 / 1e6

    @property
    def allow_state_sharing(self) -> bool:
        return self._allow_state_sharing

    @allow_state_sharing.setter
    def allow_state_sharing(self, value: bool) -> None:
        if value and self.client_mode:
            raise ConfigError("a client-mode averager cannot share state: nobody can connect to it")
        self._allow_state_sharing = bool(value)
        self._update_declaration()

    @property
    def state_sharing_priority(self) -> float:
        return self._state_sharing_priority

    @state_sharing_priority.setter
    def state_sharing_priority(self, value: float) -> None:
        self._state_sharing_priority = float(value)
        self._update_declaration()

    def _update_declaration(self) -> None:
        server = self._state_server
        if server is not None and self.dht.is_alive():
            sharing, priority = self._allow_state_sharing, self._state_sharing_priority
            self.dht._loop.call_soon_threadsafe(server.update, sharing, priority)  # type: ignore[union-attr]

    def get_current_state(self) -> StateSnapshot:
        """What a downloader gets: (msgpack-able metadata, tensors), from `shared_state`.
        Subclasses may override it (hivemind's way); it runs under `shared_state.lock`, in a
        worker thread, and its tensors are copied before the lock is released; do not call
        `get_tensors()` inside it."""
        return self.shared_state.get()

    def _snapshot_state(self, copy: CopyState) -> None:
        """Call `copy(metadata, tensors, finite_only)` with our state, under its lock (in the
        state server's worker thread). Raises what `copy` raises."""
        with self.shared_state.lock:
            metadata, tensors = self.get_current_state()
            copy(metadata, tensors, self.shared_state.finite_only)

    def _state_template(self) -> list[torch.Tensor]:
        """Our own state's tensors, whose shapes and dtypes a download must match (only read).
        Called on the caller's thread: the lock may be the training loop's."""
        with self.shared_state.lock:
            _, tensors = self.get_current_state()
            return [t.detach() for t in tensors]

    def load_state_from_peers(
        self,
        wait: bool = True,
        timeout: float | None = None,
        progress: Callable[[int, int], None] | None = None,
        validate: StateValidator | None = None,
        into: Sequence[torch.Tensor] | None = None,
    ) -> tuple[Any, list[torch.Tensor]] | Any | None:
        """Download (metadata, tensors) from the best available donor; None if nobody shares.

        Donors are tried by priority, and the next one after a failure; each failure is logged
        with its reason. The tensors are checked against our own shapes and dtypes and must be
        finite, and are returned, not applied: the caller decides what to do with them.
        `progress(received, total)` is called as bytes arrive (on the DHT's thread).
        `validate(metadata, tensors)` is called on the DHT's thread (keep it quick) before a
        state is accepted; it raises HiveError with the reason to refuse that donor. A donor
        refused for an invalid state is banned for `ban_duration` and skipped meanwhile.

        `into`: tensors shaped like our state (the model's own, say) that the download writes in
        place and returns, instead of new ones: for a large model, allocating and filling fresh
        memory costs more than the transfer itself. A donor that fails midway, or whose state is
        refused, leaves them holding part of its state until the next donor overwrites it; if
        none succeeds, the result is None and the tensors are not a usable state.

        Raises:
            ConfigError: `into` does not match our state's shapes and dtypes, or is not contiguous.
        """
        template = self._state_template()
        if into is not None:
            into = _check_destination(into, template)
        future = self.dht.run_coroutine(
            lambda _dht, node: self._load_state(node, template, timeout, progress, validate, into),
            return_future=True,
        )
        return future.result() if wait else future

    async def _load_state(
        self,
        node: DHTNode,
        template: list[torch.Tensor],
        timeout: float | None,
        progress: Callable[[int, int], None] | None = None,
        validate: StateValidator | None = None,
        into: Sequence[torch.Tensor] | None = None,
    ) -> tuple[Any, list[torch.Tensor]] | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.settings.allreduce_timeout if timeout is None else timeout)
        donors = await find_donors(node, self.prefix)
        if not donors:
            logger.info("No peer under prefix %r shares its state yet", self.prefix)
            return None
        banned = self.banned_peers
        for donor, maddrs in donors:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            if donor in banned:
                logger.debug("Skipping donor %s: banned (%s)", donor, banned[donor])
                continue
            node.host.add_addrs(donor, maddrs)
            logger.info("Downloading parameters from peer %s", donor)  # hivemind's line, which users look for
            try:
                async with _timeout(remaining):
                    result = await download_state(
                        node,
                        donor,
                        template,
                        self.settings.next_chunk_timeout,
                        progress,
                        self.prefix,
                        into,
                        self.settings.bulk_links != "none",
                        self.settings.shared_memory,
                    )
                if validate is not None:
                    _validate(validate, *result)
            except InvalidStateError as e:
                self.ban(donor, f"it served an invalid state: {e}")
                logger.warning("Refused the state of peer %s: %s; banned it, trying the next donor", donor, e)
                continue
            except (HiveError, OSError, TimeoutError) as e:
                logger.warning("Could not load state from peer %s: %s; trying the next donor", donor, e or "timeout")
                continue
            logger.info("Downloaded the state of peer %s", donor)
            return result
        return None


def _check_destination(into: Sequence[torch.Tensor], template: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Raises ConfigError: `into` cannot receive a state shaped like `template`."""
    into = list(into)
    if describe(into) != describe(template):
        raise ConfigError(
            f"load_state_from_peers(into=...) got tensors {str(describe(into))[:120]}, but this peer's state is "
            f"{str(describe(template))[:120]}; pass the tensors of the shared state, in its order"
        )
    for index, tensor in enumerate(into):
        if not tensor.is_contiguous() or tensor.device.type != "cpu":
            raise ConfigError(
                f"load_state_from_peers(into=...): tensor {index} must be a contiguous CPU tensor to receive in place"
            )
    return into


def _validate(validate: StateValidator, metadata: Any, tensors: list[torch.Tensor]) -> None:
    """Run a caller's validator on a downloaded state.

    Raises:
        InvalidStateError: it refused the state, or crashed on it (malformed metadata must
            cost one donor, never the download).
    """
    try:
        validate(metadata, tensors)
    except HiveError as e:
        raise InvalidStateError(str(e)) from None
    except (TypeError, ValueError, LookupError, AttributeError) as e:
        raise InvalidStateError(f"validate raised {type(e).__name__}: {e}") from None


def _check_weight(weight: Any) -> float:
    weight = float(weight)
    if not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"weight = {weight}: must be a finite number >= 0")
    return weight


def _check_tensors(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    checked = []
    for i, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise ConfigError(f"averaged_tensors[{i}] is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.device.type != "cpu":
            raise ConfigError(f"averaged_tensors[{i}] is on {tensor.device}; pass CPU tensors (e.g. t.detach().cpu())")
        if not tensor.is_floating_point():
            raise ConfigError(f"averaged_tensors[{i}] has dtype {tensor.dtype}; only floating-point tensors average")
        if not tensor.is_contiguous():
            raise ConfigError(f"averaged_tensors[{i}] is not contiguous; pass tensor.contiguous()")
        checked.append(tensor.detach())
    if not checked:
        raise ConfigError("averaged_tensors is empty; pass the tensors to average")
    return checked


__all__ = ["DecentralizedAverager", "Stage", "StepControl"]
