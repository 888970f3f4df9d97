"""DHT tuning knobs, as one frozen value object with documented defaults."""

from __future__ import annotations

from dataclasses import dataclass

from hivecli._exceptions import ConfigError
from hivecli.net.framing import FrameLimits

KIB, MIB = 1024, 1024 * 1024


@dataclass(frozen=True)
class DHTSettings:
    """How a DHT node searches, replicates and forgets.

    Attributes:
        bucket_size: k, nodes per k-bucket (default 20).
        num_replicas: how many of the nearest nodes store each value (default 5).
        depth_modulo: relaxed bucket splitting: also split buckets whose depth is not a
            multiple of this (default 5).
        parallel_rpc: alpha, requests in flight during a get (default 4): a get stops at the
            first live value, so asking a few at a time saves requests. Stores and bootstrap
            must hear from the whole beam anyway and keep all of it in flight.
        beam_size: a lookup ends once the beam_size closest nodes it has seen have answered
            (default: num_replicas, which found the exact 5 nearest nodes in 200 of 200 lookups
            in 64- and 256-node swarms; larger values trade speed for robustness to churn).
        wait_timeout: seconds to wait for one RPC to a peer (default 3).
        bootstrap_timeout: seconds to wait for the initial peers (default: wait_timeout).
        refresh_period: seconds between maintenance passes: re-checking stale neighbours,
            re-replicating what lost a holder, refreshing idle buckets (default 30).
        rejoin_period: seconds between attempts to re-join the DHT while cut off from it (its
            routing table empty, or its last requests all unanswered), each pinging every peer
            it has known (default 1): how soon a peer is back after a network outage ends.
        blacklist_time: seconds a peer that failed to answer is skipped (default 5); doubles
            (backoff_rate) with each further failure, up to max_blacklist_time (default 300).
        cache_locally: keep values this node fetched, for later gets (default True).
        cache_on_lookup_path: also push fetched values to the nearest node on the lookup path
            that lacked them, so popular keys get cheaper (default True).
        max_records: most keys a node holds in its storage, and again in its cache, evicting
            the soonest to expire (default 100,000; None: unbounded).
        max_bytes: most bytes of records in storage, and again in cache (default 256 MiB).
        peer_quota: the share of max_records and max_bytes that records stored on behalf of
            one peer may take (default 0.1), so no single peer can fill a node.
        max_value_bytes: largest value (or subkey value) a node accepts (default 256 KiB).
        max_record_bytes: largest record, all its subkeys together (default 1 MiB).
        max_expiration: seconds into the future an expiration may lie (default 24 h): unsigned
            stores are capped to it, signed ones beyond it refused.
        max_reply_bytes: budget of one dht.find reply (default 2 MiB, half the default frame
            header limit): records past it are left out, and the asker asks again.
        handover_rate: records per second a node hands to newcomers, all together (default 2000).
    """

    bucket_size: int = 20
    num_replicas: int = 5
    depth_modulo: int = 5
    parallel_rpc: int = 4
    beam_size: int | None = None
    wait_timeout: float = 3.0
    bootstrap_timeout: float | None = None
    refresh_period: float = 30.0
    rejoin_period: float = 1.0
    blacklist_time: float = 5.0
    backoff_rate: float = 2.0
    max_blacklist_time: float = 300.0
    cache_locally: bool = True
    cache_on_lookup_path: bool = True
    max_records: int | None = 100_000
    max_bytes: int | None = 256 * MIB
    peer_quota: float = 0.1
    max_value_bytes: int = 256 * KIB
    max_record_bytes: int = 1 * MIB
    max_expiration: float = 24 * 3600.0
    max_reply_bytes: int = 2 * MIB
    handover_rate: float = 2000.0

    def __post_init__(self) -> None:
        for name in ("bucket_size", "num_replicas", "parallel_rpc", "depth_modulo"):
            if getattr(self, name) < 1:
                raise ConfigError(f"The DHT setting {name} ({getattr(self, name)}) must be at least 1.")
        if self.beam_size is not None and self.beam_size < self.num_replicas:
            raise ConfigError(
                f"The DHT setting beam_size ({self.beam_size}) must be at least num_replicas "
                f"({self.num_replicas}), or stores could miss the nearest nodes."
            )
        if not 0 < self.peer_quota <= 1:
            raise ConfigError(f"The DHT setting peer_quota ({self.peer_quota}) must be in (0, 1].")
        # the reply must fit in one frame header, and any record in one reply (with its nearest nodes)
        header_limit = FrameLimits().max_header_bytes
        if not self.max_value_bytes <= self.max_record_bytes <= self.max_reply_bytes // 2 < header_limit // 2:
            raise ConfigError(
                f"The DHT settings must satisfy max_value_bytes ({self.max_value_bytes}) <= max_record_bytes "
                f"({self.max_record_bytes}) <= max_reply_bytes / 2 ({self.max_reply_bytes // 2}), and "
                f"max_reply_bytes < the frame header limit ({header_limit} bytes)."
            )
        for name in (
            "wait_timeout",
            "refresh_period",
            "rejoin_period",
            "blacklist_time",
            "max_expiration",
            "handover_rate",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(
                    f"The DHT setting {name} ({getattr(self, name)}) must be a positive number of seconds."
                )

    @property
    def effective_beam_size(self) -> int:
        return self.num_replicas if self.beam_size is None else self.beam_size

    @property
    def effective_bootstrap_timeout(self) -> float:
        return self.wait_timeout if self.bootstrap_timeout is None else self.bootstrap_timeout
