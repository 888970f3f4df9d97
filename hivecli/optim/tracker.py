"""Where a collaborative run stands: its epoch, the samples toward the next one, and when it will get there.

Peers of a run train at different speeds and only step their optimizer together once the run as a whole
has accumulated `target_batch_size` samples. Each peer publishes its local progress (epoch, samples since
its last epoch, samples/s) in the DHT under `PREFIX_progress`, and reads everyone else's: the highest epoch
among the peers that train (not the clients) is the run's epoch, and the summed speeds give an ETA for the
next one. The ETA is what lets a peer start matchmaking *before* the epoch ends, so that its group is
ready when the samples are; and the fetches come sooner as the ETA nears (as in hivemind's tracker, more
peers may join than we see yet: `expected_drift_peers` / `expected_drift_rate`).

Each peer writes under a subkey owned by its peer ID (hivecli.dht.records): the DHT stores it only signed
by that peer, so nobody can overwrite or withdraw another peer's progress. A peer can still lie about its
own: every record is validated and bounded, counted once per owner, and ignored once older than
`metadata_expiration`. All DHT I/O happens on one daemon thread; the training thread never waits on the
network.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from hivecli._exceptions import ConfigError, HiveError
from hivecli.dht.dht import DHT
from hivecli.dht.records import owned_entries, owned_subkey
from hivecli.utils.timing import get_dht_time

logger = logging.getLogger(__name__)
MAX_COUNT = 2**62  # largest epoch or sample count believed
MAX_SAMPLES_PER_SECOND = 1e9  # faster than any real peer: a higher claim is capped
UNKNOWN_ETA_S = 3600.0  # ETA when nobody reports a speed: far off, recomputed at every fetch, so never reached
DHT_CALL_TIMEOUT_S = 15.0  # bound on one store or get, over the DHT's own per-RPC timeouts


@dataclass(frozen=True)
class LocalProgress:
    epoch: int
    samples_accumulated: int
    samples_per_second: float
    time: float  # DHT time of the latest report or publication
    client_mode: bool


@dataclass(frozen=True)
class GlobalProgress:
    epoch: int  # the highest epoch among live non-client peers (and ours)
    samples_accumulated: int  # reported toward the next epoch by the peers at `epoch` (ours included)
    target_batch_size: int
    num_peers: int  # live peers at `epoch`, clients and ours included
    num_clients: int  # of them, those in client mode
    eta_next_epoch: float  # DHT time at which the run should reach target_batch_size
    next_fetch_time: float  # DHT time of the next fetch


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def _is_real(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_COUNT


def parse_record(record: Any) -> LocalProgress | None:
    """A peer's record as read from the DHT, or None unless every field is there and plausible."""
    if not isinstance(record, dict):
        return None
    epoch, samples, speed = record.get("epoch"), record.get("samples_accumulated"), record.get("samples_per_second")
    stamp, client = record.get("time"), record.get("client_mode")
    valid = _is_int(epoch) and _is_int(samples) and _is_real(speed) and speed >= 0 and _is_real(stamp)
    if not valid or not isinstance(client, bool):
        return None
    speed = min(float(speed), MAX_SAMPLES_PER_SECOND)
    return LocalProgress(epoch, samples, speed, float(stamp), client)


class ProgressTracker:
    """Publishes this peer's progress and tracks the run's (see the module docstring).

    Args:
        dht: this peer's running DHT. prefix: the run's prefix. target_batch_size: samples per epoch, run-wide.
        client_mode: this peer only helps: its epoch does not raise the run's.
        min_refresh_period, max_refresh_period: bounds on the seconds between fetches; min_refresh_period is
            also the least time between two publications. default_refresh_period: between fetches with no ETA.
        expected_drift_peers, expected_drift_rate: how many more peers than we see may be training: the next
            fetch comes that much earlier. performance_ema_alpha: the weight of a new samples/s measurement.
        metadata_expiration: seconds a record lives in the DHT and is believed.
        start: start the thread now (else call `start()`).

    Raises:
        ConfigError: target_batch_size is not an int >= 1, the periods are not 0 < min <= default <= max,
            or another setting is out of range; the message names the value.
    """

    def __init__(
        self,
        dht: DHT,
        prefix: str,
        target_batch_size: int,
        *,
        client_mode: bool = False,
        min_refresh_period: float = 0.5,
        max_refresh_period: float = 10.0,
        default_refresh_period: float = 3.0,
        expected_drift_peers: float = 3,
        expected_drift_rate: float = 0.2,
        performance_ema_alpha: float = 0.1,
        metadata_expiration: float = 60.0,
        start: bool = True,
    ):
        if not (_is_int(target_batch_size) and target_batch_size >= 1):
            raise ConfigError(f"target_batch_size = {target_batch_size!r} must be an int >= 1; pass the run's batch")
        periods = (min_refresh_period, default_refresh_period, max_refresh_period)
        if not (all(map(_is_real, periods)) and 0 < min_refresh_period <= default_refresh_period <= max_refresh_period):
            raise ConfigError(
                f"min_refresh_period = {min_refresh_period!r}, default_refresh_period = {default_refresh_period!r} "
                f"and max_refresh_period = {max_refresh_period!r} must satisfy 0 < min <= default <= max; adjust them"
            )
        ranges = {
            "expected_drift_peers": (expected_drift_peers, 0.0, math.inf),
            "expected_drift_rate": (expected_drift_rate, 0.0, math.inf),
            "performance_ema_alpha": (performance_ema_alpha, 1e-6, 1.0),
            "metadata_expiration": (metadata_expiration, 1e-3, math.inf),
        }
        for name, (value, low, high) in ranges.items():
            if not (_is_real(value) and low <= value <= high):
                raise ConfigError(f"{name} = {value!r} must be a number in [{low:g}, {high:g}]; change it")
        self.dht, self.prefix, self.target_batch_size, self.client_mode = dht, prefix, target_batch_size, client_mode
        self.key = f"{prefix}_progress"
        self.min_refresh_period, self.max_refresh_period = min_refresh_period, max_refresh_period
        self.default_refresh_period = default_refresh_period
        self.expected_drift_peers, self.expected_drift_rate = expected_drift_peers, expected_drift_rate
        self.performance_ema_alpha, self.metadata_expiration = performance_ema_alpha, metadata_expiration
        self._lock = threading.Lock()
        self._fetched = threading.Condition(self._lock)
        self._fetches = 0  # successful fetches so far (wait_for_update)
        self._wake, self._stop = threading.Event(), threading.Event()
        self._seconds_per_sample, self._ema_weight, self._last_report = 0.0, 0.0, time.monotonic()
        self._local = LocalProgress(0, 0, 0.0, get_dht_time(), client_mode)
        self._version, self._published, self._urgent, self._fetch_requested = 1, 0, True, True
        self._others: dict[str, LocalProgress] = {}  # owner -> latest valid record, as of the last fetch
        self._global = self._summarize(get_dht_time(), fetch_now=True)
        self._expiration = 0.0  # of our latest record in the DHT; 0: none
        self._in_flight: concurrent.futures.Future[Any] | None = None
        self._thread = threading.Thread(target=self._run, name="hive-tracker", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        """Start the background thread (once)."""
        self._thread.start()

    @property
    def local_progress(self) -> LocalProgress:
        return self._local

    @property
    def global_progress(self) -> GlobalProgress:
        return self._global

    @property
    def global_epoch(self) -> int:
        return self._global.epoch

    @property
    def ready_to_update_epoch(self) -> bool:
        """The run is past our epoch, or has its samples (ours counted as of now), or its ETA has come."""
        progress = self._global
        return (
            progress.epoch > self._local.epoch
            or progress.samples_accumulated >= self.target_batch_size
            or get_dht_time() >= progress.eta_next_epoch
        )

    @property
    def estimated_next_update_time(self) -> float:
        """DHT time of the next epoch update: the ETA, or now once `ready_to_update_epoch` (as hivemind)."""
        return get_dht_time() if self.ready_to_update_epoch else self._global.eta_next_epoch

    def report_local_progress(self, local_epoch: int, samples_accumulated: int) -> None:
        """Record this peer's progress after a step; the thread publishes it within min_refresh_period.

        Raises:
            ConfigError: local_epoch or samples_accumulated is not an int in [0, 2**62].
        """
        with self._lock:
            was_clean = self._set_local(local_epoch, samples_accumulated)
        if was_clean:
            self._wake.set()

    def update_epoch(self, new_epoch: int) -> None:
        """Move to `new_epoch` with no samples yet; the thread publishes it and fetches at once.

        Raises:
            ConfigError: new_epoch is not an int in [0, 2**62].
        """
        with self._lock:
            self._set_local(new_epoch, 0)
            self._urgent = self._fetch_requested = True
            self._global = self._summarize(get_dht_time(), fetch_now=True)
        self._wake.set()

    def fetch_now(self) -> None:
        """Ask the thread to fetch the others' progress now; returns at once."""
        self._fetch_requested = True
        self._wake.set()

    def epoch_bound(self, timeout: float) -> int:
        """The highest epoch a donor's state may claim: one past the run's epoch as a fetch made
        now sees it (waiting at most min(timeout, 5 s)), not as of this tracker's last fetch: a
        peer that just started knows nothing yet, and would refuse (and ban) honest donors."""
        self.fetch_now()
        self.wait_for_update(min(timeout, 5.0))
        return self.global_epoch + 1

    def wait_for_update(self, timeout: float) -> bool:
        """Block until a fetch that ends after this call; True if one succeeded within `timeout` seconds."""
        with self._fetched:
            target = self._fetches + 1
            return self._fetched.wait_for(lambda: self._fetches >= target, timeout)

    def _set_local(self, epoch: int, samples: int) -> bool:
        """Update the local progress and the samples/s EMA (lock held); whether it was published until now."""
        if not (_is_int(epoch) and _is_int(samples)):
            raise ConfigError(f"epoch = {epoch!r} and samples_accumulated = {samples!r} must be ints in "
                              f"[0, 2**62]; pass the optimizer's counters")  # fmt: skip
        now, old = time.monotonic(), self._local
        extra = samples - old.samples_accumulated if epoch == old.epoch else samples
        if extra > 0:  # an EMA of seconds per sample, bias-corrected as Adam's moments are
            alpha, elapsed = self.performance_ema_alpha, max(now - self._last_report, 1e-9)
            self._seconds_per_sample = alpha * elapsed / extra + (1 - alpha) * self._seconds_per_sample
            self._ema_weight = alpha + (1 - alpha) * self._ema_weight
        self._last_report = now  # a report without new samples (a pause, a new epoch) starts a new interval
        speed = self._ema_weight / self._seconds_per_sample if self._seconds_per_sample > 0 else 0.0
        speed = min(speed, MAX_SAMPLES_PER_SECOND)
        self._local = LocalProgress(epoch, samples, speed, get_dht_time(), self.client_mode)
        if epoch == old.epoch == self._global.epoch:  # ours counts in the run's samples at once, as hivemind
            total = max(0, self._global.samples_accumulated + samples - old.samples_accumulated)
            self._global = replace(self._global, samples_accumulated=total)
        was_clean, self._version = self._published == self._version, self._version + 1
        return was_clean

    def _summarize(self, now: float, fetch_now: bool = False) -> GlobalProgress:
        """The run's progress from the others' latest records and our live one (lock held)."""
        live = [p for p in self._others.values() if abs(now - p.time) <= self.metadata_expiration] + [self._local]
        epoch = max([self._local.epoch] + [p.epoch for p in live if not p.client_mode])
        current = [p for p in live if p.epoch == epoch]
        # as hivemind: every live peer's speed counts (one behind catches up soon), and samples are extrapolated
        rate = sum(p.samples_per_second for p in live)
        estimate = sum(p.samples_accumulated + max(0.0, now - p.time) * p.samples_per_second for p in current)
        remaining = max(0.0, self.target_batch_size - estimate)
        eta = now + (remaining / rate if rate > 0 else UNKNOWN_ETA_S if remaining > 0 else 0.0)
        wait = self.default_refresh_period
        if rate > 0 and len(live) > 1:  # sooner as the ETA nears, and sooner still for peers we do not see yet
            expected_peers = max(len(live) + self.expected_drift_peers, len(live) * (1 + self.expected_drift_rate))
            wait = (eta - now) * len(live) / expected_peers
            wait = min(max(wait, self.min_refresh_period), self.max_refresh_period)
        clients = sum(p.client_mode for p in current)
        samples = sum(p.samples_accumulated for p in current)
        next_fetch = now if fetch_now else now + wait
        return GlobalProgress(epoch, samples, self.target_batch_size, len(current), clients, eta, next_fetch)

    def _call(self, future: concurrent.futures.Future[Any]) -> Any:
        self._in_flight = future  # shutdown cancels it, so that joining the thread does not wait for it
        try:
            return future.result(DHT_CALL_TIMEOUT_S)
        finally:
            future.cancel()  # a no-op once done; else the lookup stops instead of running on
            self._in_flight = None

    def _publish(self) -> None:
        with self._lock:  # a fresh time: alive, and its samples are not extrapolated past this moment
            self._local = replace(self._local, time=get_dht_time())
            version, record, self._urgent = self._version, asdict(self._local), False
        expiration = max(get_dht_time() + self.metadata_expiration, self._expiration + 1e-3)
        subkey = owned_subkey(self.dht.peer_id)
        self._call(self.dht.store(self.key, record, expiration, subkey=subkey, return_future=True))
        self._expiration = expiration
        with self._lock:
            self._published = max(self._published, version)

    def _fetch(self) -> None:
        self._fetch_requested = False
        found = self._call(self.dht.get(self.key, latest=True, return_future=True))
        others: dict[str, LocalProgress] = {}
        for owner, value, _ in owned_entries(found):
            progress = parse_record(value)
            if progress is None:
                if value is not None:  # None: a peer that left
                    logger.debug("Ignoring a malformed progress record of %s under %r: %.100r", owner, self.key, value)
            elif owner != self.dht.peer_id and (str(owner) not in others or progress.time > others[str(owner)].time):
                others[str(owner)] = progress  # one record per owner, however many owned subkeys it wrote
        with self._fetched:
            self._others = others
            self._global = self._summarize(get_dht_time())
            self._fetches += 1
            self._fetched.notify_all()

    def _attempt(self, action: str) -> bool:
        """Publish or fetch once; False (logged) on failure. Never raises: the thread must not die."""
        try:
            self._publish() if action == "publish" else self._fetch()
            return True
        except (HiveError, TimeoutError, OSError, RuntimeError, concurrent.futures.CancelledError) as e:
            logger.debug("Could not %s progress under %r, retrying later: %s", action, self.key, e)
        except Exception:
            logger.exception("Progress %s failed; retrying later", action)
        return False

    def _run(self) -> None:
        publish_after = republish_at = fetch_after = -math.inf  # time.monotonic() deadlines
        while not self._stop.is_set():
            self._wake.clear()
            with self._lock:
                dirty, urgent = self._published != self._version, self._urgent
            if (dirty and (urgent or time.monotonic() >= publish_after)) or time.monotonic() >= republish_at:
                ok = self._attempt("publish")
                publish_after = time.monotonic() + (self.min_refresh_period if ok else self.default_refresh_period)
                republish_at = time.monotonic() + (self.metadata_expiration / 3 if ok else self.default_refresh_period)
            due = get_dht_time() >= self._global.next_fetch_time and time.monotonic() >= fetch_after
            if (self._fetch_requested or due) and not self._stop.is_set():
                ok = self._attempt("fetch")
                fetch_after = -math.inf if ok else time.monotonic() + self.default_refresh_period
            with self._lock:
                now, dirty = time.monotonic(), self._published != self._version
                until_fetch = max(self._global.next_fetch_time - get_dht_time(), fetch_after - now)
            until_publish = min(republish_at, publish_after if dirty else math.inf) - now
            self._wake.wait(min(max(min(until_publish, until_fetch), 0.0), self.max_refresh_period))

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop and join the thread, then withdraw our record: replace it with None (best effort, within
        `timeout`; a failure is logged). Idempotent; never raises."""
        self._stop.set()
        self._wake.set()
        in_flight = self._in_flight
        if in_flight is not None:
            in_flight.cancel()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._expiration > 0:
            expiration, self._expiration = self._expiration + 1e-3, 0.0  # newer than our record: replaces it
            future, subkey = None, owned_subkey(self.dht.peer_id)
            try:
                future = self.dht.store(self.key, None, expiration, subkey=subkey, return_future=True)
                future.result(timeout)
            except Exception as e:
                logger.debug("Could not withdraw our progress under %r: %s", self.key, e)
                if future is not None:
                    future.cancel()

    def __enter__(self) -> ProgressTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


__all__ = ["GlobalProgress", "LocalProgress", "ProgressTracker", "parse_record"]
