"""`hivecli.DHT`: the synchronous, thread-safe face of a DHT node.

The node and its event loop live in a background thread; every method here hands work to that
loop and waits for the result (or returns a `concurrent.futures.Future` with
`return_future=True`), so the DHT can be used from any thread of an ordinary program.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import difflib
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from hivecli._exceptions import ConfigError, MultiaddrError
from hivecli.dht.nat import NatTraversal
from hivecli.dht.node import DHTNode
from hivecli.dht.records import owned_subkey
from hivecli.dht.settings import DHTSettings
from hivecli.dht.storage import ValueWithExpiration
from hivecli.net.connection import NetSettings
from hivecli.net.host import Host
from hivecli.net.identity import Identity, PeerID
from hivecli.net.multiaddr import Multiaddr, parse_peer_maddr
from hivecli.net.reachability import ReachabilityReport
from hivecli.net.transport import Transport
from hivecli.utils.loops import new_event_loop

T = TypeVar("T")
DEFAULT_HOST_MADDRS = ("/ip4/127.0.0.1/tcp/0",)
_SETTING_NAMES = [f.name for f in dataclasses.fields(DHTSettings)]


def parse_initial_peers(initial_peers: Sequence[str | Multiaddr]) -> list[Multiaddr]:
    """Validate the addresses to bootstrap from. Raises MultiaddrError naming the bad entry."""
    if isinstance(initial_peers, (str, Multiaddr)):
        initial_peers = [initial_peers]
    parsed = []
    for entry in initial_peers:
        if isinstance(entry, str) and not entry.strip():
            raise MultiaddrError(
                "An initial peer address is empty (often an unset environment variable); "
                "pass the full multiaddr another peer printed, e.g. /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW..."
            )
        parsed.append(parse_peer_maddr(entry))
    return parsed


def _settings_from_kwargs(settings: DHTSettings | None, overrides: dict[str, Any]) -> DHTSettings:
    for name in overrides:
        if name not in _SETTING_NAMES:
            close = difflib.get_close_matches(name, _SETTING_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known settings: {', '.join(_SETTING_NAMES)}"
            raise ConfigError(f"DHT() got an unknown argument {name!r}{hint}")
    return dataclasses.replace(settings or DHTSettings(), **overrides)


async def _cancel_remaining_tasks() -> None:
    current = asyncio.current_task()
    leftovers = [task for task in asyncio.all_tasks() if task is not current]
    for task in leftovers:
        task.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)


class DHT:
    """A DHT peer running in a background thread.

    Args:
        initial_peers: multiaddrs (`/ip4/.../tcp/.../p2p/...`) of peers already in the DHT;
            empty to start a new DHT.
        start: start right away (as `run_in_background()`), waiting until ready.
        host_maddrs: where to listen; the default is loopback only (use `/ip4/0.0.0.0/tcp/0`
            to be reachable from other machines).
        announce_maddrs: the addresses to tell others, instead of the ones we listen on (for
            port forwarding or a public IP the machine does not see).
        client_mode: query and store through others, but never be stored into or routed via
            (for peers behind NAT that others cannot reach). After start, True means that
            nobody can open a connection to this peer (averagers then default to client mode).
        check_reachability: after joining, ask peers to dial us back (see hivecli.dht.nat): if
            none can, switch the DHT to client mode and reserve a slot on a relay, through which
            others can still reach us (`relayed`); without a relay, `client_mode` becomes True.
            Checked again every few minutes. Off by default; the `hive` commands turn it on.
        identity_path: a file holding this peer's Ed25519 key (created if missing), so the peer
            keeps its ID across restarts; random otherwise.
        startup_timeout: seconds `run_in_background` waits for the node to be ready.
        settings, net_settings: tuning, see `DHTSettings` and `NetSettings`; DHTSettings fields
            can also be passed as keyword arguments (e.g. `num_replicas=3`).
        transport: a `Transport` to use instead of TCP (e.g. `MemoryTransport` in tests).

    Raises:
        MultiaddrError: an address is malformed; ConfigError: another argument is invalid.
    """

    def __init__(
        self,
        initial_peers: Sequence[str | Multiaddr] = (),
        *,
        start: bool = False,
        host_maddrs: Sequence[str | Multiaddr] = DEFAULT_HOST_MADDRS,
        announce_maddrs: Sequence[str | Multiaddr] = (),
        client_mode: bool = False,
        check_reachability: bool = False,
        identity_path: str | None = None,
        startup_timeout: float = 30.0,
        settings: DHTSettings | None = None,
        net_settings: NetSettings | None = None,
        transport: Transport | None = None,
        **setting_overrides: Any,
    ):
        self.initial_peers = parse_initial_peers(initial_peers)
        if isinstance(host_maddrs, (str, Multiaddr)):
            host_maddrs = [host_maddrs]
        if isinstance(announce_maddrs, (str, Multiaddr)):
            announce_maddrs = [announce_maddrs]
        self.host_maddrs = [m if isinstance(m, Multiaddr) else Multiaddr.parse(m) for m in host_maddrs]
        if not self.host_maddrs:
            raise ConfigError("host_maddrs is empty; give at least one address to listen on, e.g. /ip4/0.0.0.0/tcp/0")
        self.announce_maddrs = [m if isinstance(m, Multiaddr) else Multiaddr.parse(m) for m in announce_maddrs]
        for maddr in self.announce_maddrs:
            if maddr.port == 0 or maddr.is_unspecified:
                raise MultiaddrError(
                    f"announce address {maddr} must name a reachable host and a real port, not 0.0.0.0 or port 0"
                )
        self.client_mode = client_mode
        self.check_reachability = check_reachability and not client_mode
        self._nat: NatTraversal | None = None
        self.startup_timeout = startup_timeout
        self.settings = _settings_from_kwargs(settings, setting_overrides)
        self.net_settings = net_settings or NetSettings()
        self.identity = Identity.load_or_create(identity_path) if identity_path else Identity.generate()
        self._transport = transport
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._node: DHTNode | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._shutdown_lock = threading.Lock()
        self._stopped = False
        if start:
            self.run_in_background(await_ready=True)

    @property
    def peer_id(self) -> PeerID:
        return self.identity.peer_id

    @property
    def node(self) -> DHTNode:
        """The underlying DHTNode; touch it only from inside the DHT's loop (`run_coroutine`)."""
        if self._node is None:
            raise RuntimeError("the DHT is not running; call run_in_background() or pass start=True")
        return self._node

    def run_in_background(self, await_ready: bool = True, timeout: float | None = None) -> None:
        """Start the node's thread. With `await_ready`, wait until it has joined the DHT.

        Raises:
            BootstrapError: none of the initial peers answered.
            ConfigError: cannot listen on a host address.
            TimeoutError: not ready within `timeout` (default: startup_timeout).
        """
        if self._thread is not None:
            raise RuntimeError("this DHT was already started")
        self._thread = threading.Thread(target=self._run, name=f"hive-dht-{str(self.peer_id)[-6:]}", daemon=True)
        self._thread.start()
        if await_ready:
            self.wait_until_ready(timeout)

    def wait_until_ready(self, timeout: float | None = None) -> None:
        timeout = self.startup_timeout if timeout is None else timeout
        if not self._ready.wait(timeout):
            self.shutdown()
            raise TimeoutError(f"the DHT node did not start within {timeout:g} s")
        if self._start_error is not None:
            self._join_thread()
            raise self._start_error

    def _run(self) -> None:
        loop = new_event_loop()
        self._loop = loop
        try:
            host = Host(self.identity, self._transport, self.net_settings)
            host.announce_maddrs = list(self.announce_maddrs)
            self._node = loop.run_until_complete(
                DHTNode.create(
                    host,
                    initial_peers=self.initial_peers,
                    host_maddrs=self.host_maddrs,
                    settings=self.settings,
                    client_mode=self.client_mode,
                )
            )
            if self.check_reachability:
                self._nat = loop.run_until_complete(self._start_nat(self._node))
                self.client_mode = not self._nat.reachable
        except BaseException as e:
            self._start_error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            if self._nat is not None:
                loop.run_until_complete(self._nat.aclose())
            loop.run_until_complete(self._node.shutdown())
            # whatever else runs on this loop (an averager's step, say) ends now, not at garbage collection
            loop.run_until_complete(_cancel_remaining_tasks())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _submit(self, coro: Coroutine[Any, Any, T], return_future: bool) -> T | concurrent.futures.Future[T]:
        if self._node is None or self._loop is None or self._stopped:
            coro.close()
            raise RuntimeError("the DHT is not running; call run_in_background() or pass start=True")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "blocking DHT calls from inside the DHT's own loop would deadlock; "
                "await the DHTNode methods there instead"
            )
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future if return_future else future.result()

    async def _start_nat(self, node: DHTNode) -> NatTraversal:
        nat = NatTraversal(node)
        if self.initial_peers:  # a first peer has nobody to ask yet: NatTraversal asks once someone joins
            await nat.check()
        nat.start()
        return nat

    @property
    def reachability(self) -> ReachabilityReport:
        """The latest dial-back verdict: status "public", "unreachable" or "unknown" (not checked:
        check_reachability is off, or no peer could check yet)."""
        return self.node.host.reachability

    @property
    def relayed(self) -> bool:
        """Whether others reach this peer only through a relay (see check_reachability)."""
        return self._nat is not None and self._nat.relayed

    def get_visible_maddrs(self, latest: bool = False) -> list[Multiaddr]:
        """Addresses other peers can use to join through this one, each ending in /p2p/<peer id>.

        `latest` is accepted for compatibility; interfaces are re-read every few seconds.
        Safe from any thread: the host only reads its lists and swaps a cached tuple.
        """
        if self._stopped:
            raise RuntimeError("the DHT is shut down; its addresses are no longer valid")
        return self.node.host.visible_maddrs()

    def store(
        self, key: Any, value: Any, expiration_time: float, subkey: Any = None, *, return_future: bool = False
    ) -> Any:
        """Store a value until `expiration_time` (DHT time, see `get_dht_time`).

        Returns True if at least one replica accepted it (False: expired, or a value at least
        as new is already stored). Raises ConfigError as `DHTNode.store` does: key/subkey/value
        not msgpack-serializable, value too large, or a subkey owned by another peer.
        """
        return self._submit(self.node.store(key, value, expiration_time, subkey), return_future)

    def owned_subkey(self, name: str = "") -> str:
        """A subkey only this peer can write (`name` followed by an `[owner:<peer id>]` marker):
        `store` signs values under it, and every node refuses anyone else's."""
        return owned_subkey(self.peer_id, name)

    def get(self, key: Any, latest: bool = False, *, return_future: bool = False) -> Any:
        """Return a ValueWithExpiration (for dictionaries, its value is {subkey: ValueWithExpiration})
        or None if nothing live is stored under `key`."""
        return self._submit(self.node.get(key, latest), return_future)

    def run_coroutine(
        self, fn: Callable[[DHT, DHTNode], Coroutine[Any, Any, T]], *, return_future: bool = False
    ) -> Any:
        """Run `await fn(dht, node)` inside the DHT's loop and return its result."""
        return self._submit(fn(self, self.node), return_future)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopped

    def shutdown(self) -> None:
        """Stop the node and its thread, closing every connection. Idempotent."""
        with self._shutdown_lock:
            if self._stopped:
                return
            self._stopped = True
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._join_thread()

    def _join_thread(self) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def __enter__(self) -> DHT:
        if self._thread is None:
            self.run_in_background()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


__all__ = ["DHT", "ValueWithExpiration", "parse_initial_peers"]
