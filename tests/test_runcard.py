"""Runs with an identity: the recipe is signed by the run's owner, and a joiner takes no other."""

from __future__ import annotations

import asyncio

import pytest

from hivecli._exceptions import ConfigError
from hivecli.dht.dht import DHT
from hivecli.dht.node import DHTNode
from hivecli.dht.records import owned_subkey, sign_entry, store_item
from hivecli.dht.routing import DHTID
from hivecli.net.framing import pack
from hivecli.net.identity import Identity
from hivecli.recipe import Recipe
from hivecli.runcard import LOCAL_KEYS, RunCard, parse_run_ref, without_local_keys
from hivecli.runs import choose_card, list_runs, new_card, publish_run, run_cards, trusted_recipe, wait_for_run
from hivecli.testing import local_swarm
from hivecli.utils.timing import get_dht_time


def _forge(dht: DHT, key: str, subkey: str, value: object, expiration: float) -> list[bool]:
    """Store `value` under someone else's owned subkey on every node `dht` knows, signed with
    `dht`'s own key, as a hostile peer would send it; one "stored?" per node."""

    async def forge(_dht: DHT, node: DHTNode) -> list[bool]:
        key_id, sub, packed = DHTID.from_key(key).to_bytes_(), pack(subkey), pack(value)
        signature = sign_entry(node.host.identity, key_id, sub, packed, expiration)
        item = store_item(key_id, sub, packed, expiration, False, signature)
        peers = [peer for _, peer in node.protocol.routing_table]
        answers = await asyncio.gather(*(node.protocol.call_store(peer, [item]) for peer in peers))
        return [bool(a and a[0]) for a in answers]

    return dht.run_coroutine(forge)


def _recipe(**run: object) -> dict:
    data = Recipe().to_dict()
    data["run"].update(prefix="demo", **run)
    return data


def _card(identity: Identity, recipe: dict, run_id: str = "20261202-150000-abcd") -> RunCard:
    return RunCard.create(recipe["run"]["prefix"], run_id, identity.peer_id, recipe, identity.sign)


def test_a_card_round_trips_and_any_changed_byte_breaks_it() -> None:
    owner = Identity.generate()
    card = _card(owner, _recipe())
    again = RunCard.from_wire(card.to_wire())
    assert again == card and again.recipe["run"]["prefix"] == "demo"

    for field, value in [
        ("recipe", card.recipe_bytes.replace(b"demo", b"dem0")),
        ("run_id", "20261202-150000-ffff"),
        ("prefix", "other"),
        ("owner", Identity.generate().peer_id.to_base58()),
    ]:
        with pytest.raises(ValueError):
            RunCard.from_wire({**card.to_wire(), field: value})


@pytest.mark.parametrize("raw", [None, [], {"prefix": 1}, {"prefix": "a", "run_id": "b", "owner": "c"}])
def test_malformed_cards_are_refused(raw: object) -> None:
    with pytest.raises(ValueError):
        RunCard.from_wire(raw)


def test_keys_that_act_on_the_joiners_machine_never_come_from_a_card() -> None:
    recipe = _recipe()
    recipe["output"]["dir"] = "/tmp/attacker"
    recipe["output"]["tensorboard"] = True  # would make every joiner need the package
    recipe["data"]["root"] = "/etc"
    recipe["network"]["initial_peers"] = ["/ip4/6.6.6.6/tcp/1/p2p/x"]
    card = _card(Identity.generate(), recipe)
    assert "network" not in card.recipe
    assert "dir" not in card.recipe["output"] and "root" not in card.recipe["data"]
    assert "tensorboard" not in card.recipe["output"]
    # even a card whose bytes carry them (signed by a hostile owner by hand) loses them on reading
    assert without_local_keys(recipe)["output"].keys().isdisjoint(LOCAL_KEYS["output"] or set())
    loaded = trusted_recipe(card, None, trusted=False, instead="x")
    assert loaded.output.dir == Recipe().output.dir and loaded.data.root == Recipe().data.root
    assert loaded.output.tensorboard is False


def test_run_references() -> None:
    owner = Identity.generate().peer_id
    assert parse_run_ref("demo") == ("demo", None)
    assert parse_run_ref(f"demo@{owner}") == ("demo", owner)
    with pytest.raises(ConfigError, match="not a peer ID"):
        parse_run_ref("demo@nonsense")
    with pytest.raises(ConfigError, match="prefix is missing"):
        parse_run_ref(f"@{owner}")


def test_choosing_a_card_pins_the_owner_and_refuses_to_guess() -> None:
    honest, hostile = Identity.generate(), Identity.generate()
    mine, theirs = _card(honest, _recipe()), _card(hostile, _recipe(seed=666))
    assert choose_card([theirs, mine], "demo", honest.peer_id) is mine
    assert choose_card([theirs], "demo", honest.peer_id) is None
    assert choose_card([mine], "demo", None) is mine
    with pytest.raises(ConfigError, match="2 different peers"):
        choose_card([mine, theirs], "demo", None)


def test_a_stranger_cannot_replace_a_runs_recipe_in_the_dht() -> None:
    """The hijack of step 6: a second identity stores the run's recipe with lr 1e6 and a far expiration."""
    with local_swarm(4, seed=1) as dhts:
        owner_dht, hostile_dht, joiner_dht = dhts[0], dhts[1], dhts[3]
        card = new_card(owner_dht, _recipe(), "20261202-150000-abcd")
        publish_run(owner_dht, card)

        evil = _recipe()
        evil["optimizer"]["lr"] = 1e6
        hostile_card = new_card(hostile_dht, evil, "20261202-150000-abcd")
        far = get_dht_time() + 10**9
        # over the owner's own subkey, signed with the stranger's key, sent to every node it knows (all refuse) ...
        assert _forge(hostile_dht, "demo.recipe", owned_subkey(owner_dht.peer_id), hostile_card.to_wire(), far) == [
            False
        ] * (len(dhts) - 1)
        # ... as a plain value over the whole key (refused: it would shadow owned entries) ...
        hostile_dht.store("demo.recipe", hostile_card.to_wire(), far)
        # ... and under its own subkey, as a second claim to the prefix (allowed, but never chosen)
        publish_run(hostile_dht, hostile_card)

        cards = run_cards(joiner_dht, "demo")
        assert {c.owner for c in cards} == {owner_dht.peer_id, hostile_dht.peer_id}
        pinned = wait_for_run(joiner_dht, "demo", owner_dht.peer_id, timeout=10)
        assert pinned == card and trusted_recipe(pinned, None, False, "x").optimizer.lr == Recipe().optimizer.lr
        with pytest.raises(ConfigError, match="different peers"):
            wait_for_run(joiner_dht, "demo", None, timeout=1)
        assert list_runs(joiner_dht)["demo"]["prefix"] == "demo"


def test_a_donors_step_must_be_plausible_for_the_run() -> None:
    """A donor claiming step 10**12 (it would end a joiner's training at once) is over the bound."""
    from hivecli.progress import plausible_step
    from hivecli.rundir import run_started

    run_id = "20261202-150000-abcd"
    started = run_started(run_id)
    assert started is not None and run_started("not-a-run-id") is None
    an_hour = plausible_step(run_id, [], started + 3600)
    assert an_hour is not None and 3600 * 100 < an_hour < 10**12  # fast peers fit, absurd claims do not
    # the run's live peers say where it is: one liar among three does not move the median
    assert plausible_step(run_id, [500, 510, 10**12], started + 3600) == 2 * 510 + 1000
    assert plausible_step("custom", [], 0.0) is None


def test_the_run_outlives_its_owner_for_joiners_that_pin_it() -> None:
    """After the owner leaves, a newcomer that names the owner still finds the run's card: the
    DHT's replicas hold it, and the run's peers republish it as it is, under their own subkeys
    (checked by hand with `hive` processes too: owner killed, a newcomer joined through another
    peer with --run PREFIX@OWNER and loaded the state)."""
    with local_swarm(4, seed=2) as dhts:
        owner, member, newcomer = dhts[0], dhts[1], dhts[3]
        card = new_card(owner, _recipe(), "20261202-150000-abcd")
        publish_run(owner, card)
        got = wait_for_run(member, "demo", owner.peer_id, timeout=10)
        publish_run(member, got)  # what every peer of the run does every few minutes
        owner.shutdown()
        assert wait_for_run(newcomer, "demo", card.owner, timeout=10) == card
