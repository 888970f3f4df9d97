"""What a run keeps in the DHT, so that others can find it, join it and watch it.

    hive.runs        subkey PREFIX[owner:PEER] -> {"prefix", "owner", "run_id", "model", "dataset",
                                                   "target_group_size", "input_shape", "num_classes"}
    PREFIX.recipe    subkey [owner:PEER]       -> the run card (runcard.py): the recipe, signed by the run's owner
    PREFIX.progress  subkey [owner:PEER]       -> {"step", "loss", "samples_per_s", "accuracy", "maddrs", "time",
                                                   "samples" (this peer's), "run_samples" (the run's, as it knows),
                                                   "run_id", "left" (a last record when it stops)}

Every subkey is owned by the peer that writes it (hivecli.dht.records): the DHT accepts it only
signed by that peer, so nobody can overwrite another peer's announcement or progress. A run is
named by its prefix and its owner, the peer that started it (`PREFIX@OWNER`); its `run_id` tells
one run from a later one with the same prefix (a peer keeps its files under runs/PREFIX/RUN_ID/PEER).

Every peer of a run re-publishes the first two while it trains (the card exactly as its owner
signed it), so the run outlives the peer that started it. Progress entries expire a few report
periods after a peer stops. No torch here: `hive peers` stays light.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from hivecli._exceptions import ConfigError
from hivecli.dht.dht import DHT
from hivecli.dht.node import DHTNode
from hivecli.dht.records import owned_entries, owned_subkey
from hivecli.net.identity import PeerID
from hivecli.recipe import Recipe, load_recipe
from hivecli.runcard import RunCard
from hivecli.utils.timing import get_dht_time

logger = logging.getLogger(__name__)
RUNS_KEY = "hive.runs"
RECIPE_TTL = 600.0


def sign_as_peer(dht: DHT, message: bytes) -> bytes:
    """Sign `message` with this peer's key (the one its peer ID names)."""

    async def sign(_dht: DHT, node: DHTNode) -> bytes:
        return node.host.identity.sign(message)

    return dht.run_coroutine(sign)  # type: ignore[no-any-return]


def new_card(dht: DHT, recipe_data: dict[str, Any], run_id: str) -> RunCard:
    """The card of a run this peer starts (and so owns)."""
    prefix = recipe_data["run"]["prefix"]
    return RunCard.create(prefix, run_id, dht.peer_id, recipe_data, lambda m: sign_as_peer(dht, m))


def publish_run(
    dht: DHT, card: RunCard, input_shape: tuple[int, ...] | None = None, num_classes: int | None = None
) -> None:
    """Announce the run and republish its card under this peer's own subkeys (the caller repeats
    this every few minutes). The model's input shape and class count, once known, let
    `hive pull-state` build the model without the data."""
    recipe = card.recipe
    expiration = get_dht_time() + RECIPE_TTL
    summary: dict[str, Any] = {
        "prefix": card.prefix,
        "owner": card.owner.to_base58(),
        "run_id": card.run_id,
        "model": recipe.get("model", {}).get("name"),
        "dataset": recipe.get("data", {}).get("name"),
        "target_group_size": recipe.get("averaging", {}).get("target_group_size"),
    }
    if input_shape is not None:
        summary.update(input_shape=list(input_shape), num_classes=num_classes)
    dht.store(RUNS_KEY, summary, expiration, subkey=owned_subkey(dht.peer_id, card.prefix))
    dht.store(f"{card.prefix}.recipe", card.to_wire(), expiration, subkey=owned_subkey(dht.peer_id))


def list_runs(dht: DHT, owner: PeerID | None = None) -> dict[str, dict[str, Any]]:
    """{prefix: summary} of the runs announced in the DHT: for each prefix, the newest
    announcement (of the runs that `owner` started, if given)."""
    newest: dict[str, tuple[float, dict[str, Any]]] = {}
    for _publisher, value, expiration in owned_entries(dht.get(RUNS_KEY, latest=True)):
        if not isinstance(value, dict) or not isinstance(value.get("prefix"), str):
            continue
        if owner is not None and value.get("owner") != owner.to_base58():
            continue
        prefix = value["prefix"]
        if prefix not in newest or expiration > newest[prefix][0]:
            newest[prefix] = (expiration, value)
    return {prefix: summary for prefix, (_, summary) in newest.items()}


def run_cards(dht: DHT, prefix: str) -> list[RunCard]:
    """The validly signed cards published for `prefix`, one per (owner, run id), newest run first."""
    cards: dict[tuple[PeerID, str], RunCard] = {}
    for publisher, value, _ in owned_entries(dht.get(f"{prefix}.recipe", latest=True)):
        try:
            card = RunCard.from_wire(value)
        except ValueError as e:
            logger.debug("Ignoring a run card published by %s: %s", publisher, e)
            continue
        if card.prefix == prefix:
            cards[(card.owner, card.run_id)] = card
    return sorted(cards.values(), key=lambda c: c.run_id, reverse=True)


def choose_card(cards: list[RunCard], prefix: str, owner: PeerID | None) -> RunCard | None:
    """The card of run `prefix` to trust: the newest run of `owner`, or with no owner given, of
    the only owner there is. None if there is none (yet).

    Raises:
        ConfigError: no owner was given and several peers sign runs with this prefix.
    """
    if owner is not None:
        mine = [c for c in cards if c.owner == owner]
        return mine[0] if mine else None
    owners = sorted({str(c.owner) for c in cards})
    if len(owners) > 1:
        raise ConfigError(
            f"run {prefix!r} is published by {len(owners)} different peers ({', '.join(owners)}), so anyone could "
            f"have published it; pass --run {prefix}@OWNER with the owner `hive start` printed"
        )
    return cards[0] if cards else None


def choose_run(dht: DHT, prefix: str | None) -> str:
    """The run to act on: `prefix` if given, else the only run in the DHT.

    Raises:
        ConfigError: no run, or several and none chosen (the message lists them).
    """
    if prefix:
        return prefix
    runs = list_runs(dht)
    if len(runs) == 1:
        return next(iter(runs))
    if not runs:
        raise ConfigError(
            "no run is announced in this DHT yet; start one with `hive start RECIPE`, or name it with --run PREFIX"
        )
    raise ConfigError(f"this DHT has {len(runs)} runs ({', '.join(sorted(runs))}); choose one with --run PREFIX")


def wait_for_run(
    dht: DHT,
    prefix: str | None,
    owner: PeerID | None,
    timeout: float,
    on_wait: Callable[[float], None] | None = None,
) -> RunCard:
    """The card of the run to join, waiting up to `timeout` seconds for it to be announced: a peer
    started a moment ago publishes its run once its model is built. `on_wait(seconds waited)`
    is called about twice a second while it waits.

    Raises:
        ConfigError: still no such run (signed by `owner`, if given) after `timeout`, several runs
            and none chosen, or several owners for the prefix and none chosen.
    """
    began = time.monotonic()
    deadline = began + timeout
    warned = False
    while True:
        try:
            chosen = choose_run(dht, prefix)
        except ConfigError:
            several = prefix is None and len(list_runs(dht)) > 1  # waiting would not help
            if several or time.monotonic() >= deadline:
                raise
        else:
            cards = run_cards(dht, chosen)
            card = choose_card(cards, chosen, owner)
            if card is not None:
                return card
            others = sorted({str(c.owner) for c in cards})
            if others and not warned:  # once: the wait goes on, in case the owner's peers are starting
                warned = True
                logger.warning(
                    "Run %r is published by %s, not by %s as --run says; waiting for the right owner",
                    chosen, ", ".join(others), owner,
                )  # fmt: skip
            if time.monotonic() >= deadline:
                signed_by = f" signed by {owner}" if owner is not None else ""
                raise ConfigError(
                    f"run {chosen!r} has no recipe{signed_by} in the DHT; check --run (`hive peers ADDRESS` lists "
                    f"the runs), or pass a local recipe file"
                )
        if on_wait is not None:
            on_wait(time.monotonic() - began)
        time.sleep(0.5)


def trusted_recipe(card: RunCard, overrides: list[str] | None, trusted: bool, instead: str) -> Recipe:
    """A run's recipe from its card, validated. It is data, never code: one that names user code
    (module:function) is refused unless `trusted`. Keys that act on this machine (output.dir,
    data.root, network.*) are never in it: they come from this machine's flags and environment.

    Raises:
        ConfigError: invalid, or names user code without `trusted`; `instead` says what else to do.
    """
    recipe = load_recipe(None, overrides, data=card.recipe)
    if recipe.user_code() and not trusted:
        raise ConfigError(
            f"the recipe of run {card.prefix!r} names code to run on this machine "
            f"({', '.join(recipe.user_code())}); read the recipe, then pass --trust-recipe, or {instead}"
        )
    return recipe


def check_run_prefix(run: str | None, recipe: Recipe, path: object) -> None:
    """Raises ConfigError if --run names another run than the local recipe file `path`."""
    if run and run != recipe.run.prefix:
        raise ConfigError(f"--run {run!r} does not match run.prefix = {recipe.run.prefix!r} in {path}; drop one")


def publish_progress(dht: DHT, prefix: str, progress: dict[str, Any], ttl: float) -> None:
    dht.store(f"{prefix}.progress", progress, get_dht_time() + ttl, subkey=owned_subkey(dht.peer_id))


def fetch_progress(dht: DHT, prefix: str) -> dict[str, dict[str, Any]]:
    """{peer id: progress} of the peers of a run that reported recently, each written by that peer."""
    found = dht.get(f"{prefix}.progress", latest=True)
    return {str(owner): value for owner, value, _ in owned_entries(found) if isinstance(value, dict)}


def run_views(dht: DHT, only: str | None = None) -> dict[str, dict[str, Any]]:
    """What `hive peers --run` and `hive monitor` show of the runs announced in the DHT (of run
    `only`, PREFIX or PREFIX@OWNER, if given): {prefix: {"summary": its announcement, "peers":
    {peer id: its latest progress record, plus "last_report_s"}, "epoch": run_epoch(peers)}}.
    Records are as their peers wrote them: a reader checks every field's type before use."""
    announced = list_runs(dht)
    only = only.rpartition("@")[0] or only if only else None  # PREFIX@OWNER, as `hive start` prints it
    prefixes = [only] if only else sorted(announced)
    now = get_dht_time()
    result = {}
    for prefix in prefixes:
        # a peer that stopped leaves a last record saying so: it is no longer one of the run's peers
        progress = {peer: entry for peer, entry in fetch_progress(dht, prefix).items() if not entry.get("left")}
        for entry in progress.values():
            seen = entry.get("time")
            entry["last_report_s"] = round(now - seen, 1) if isinstance(seen, (int, float)) else None
        result[prefix] = {"summary": announced.get(prefix, {}), "peers": progress, "epoch": run_epoch(progress)}
    return result


def run_epoch(progress: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """A collaborative or DiLoCo run's global epoch (outer step), with the progress toward the
    next one and its ETA, from the freshest report of a peer at that epoch; None for other runs."""
    reports = [
        entry for entry in progress.values()
        if all(type(entry.get(k)) is int and entry[k] >= 0 for k in ("global_epoch", "epoch_progress", "epoch_target"))
    ]  # fmt: skip
    if not reports:
        return None
    epoch = max(entry["global_epoch"] for entry in reports)
    fresh = min(
        (entry for entry in reports if entry["global_epoch"] == epoch),
        key=lambda entry: entry["last_report_s"] if isinstance(entry.get("last_report_s"), float) else math.inf,
    )
    eta = fresh.get("epoch_eta")
    return {
        "mode": fresh.get("mode") if fresh.get("mode") in ("collaborative", "diloco") else "collaborative",
        "epoch": epoch, "progress": fresh["epoch_progress"], "target": fresh["epoch_target"],
        "eta_s": eta if isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0 else None,
    }  # fmt: skip
