"""What a run keeps in the DHT, so that others can find it, join it and watch it.

    hive.runs             subkey PREFIX   -> {"model", "dataset", "target_group_size", "input_shape", "num_classes",
                                              "run_id"}
    PREFIX.recipe                         -> the resolved recipe (plain data, never code)
    PREFIX.progress       subkey PEER ID  -> {"step", "loss", "samples_per_s", "accuracy", "maddrs", "time",
                                              "samples" (this peer's), "run_samples" (the run's, as it knows),
                                              "left" (a last record when it stops)}

A run is named by its prefix; its `run_id` tells one run from a later one with the same prefix
(a peer keeps its files under runs/PREFIX/RUN_ID/PEER).

Every peer of a run re-publishes the first two while it trains, so the run outlives the peer
that started it. Progress entries expire a few report periods after a peer stops.
No torch here: `hive peers` stays light.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from hivecli._exceptions import ConfigError
from hivecli.dht.dht import DHT
from hivecli.recipe import Recipe, load_recipe
from hivecli.utils.timing import get_dht_time

RUNS_KEY = "hive.runs"
RECIPE_TTL = 600.0


def publish_run(
    dht: DHT,
    recipe_data: dict[str, Any],
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    run_id: str | None = None,
) -> None:
    """Announce the run and its recipe (the caller repeats this every few minutes). The model's
    input shape and class count, once known, let `hive pull-state` build the model without the data."""
    prefix = recipe_data["run"]["prefix"]
    expiration = get_dht_time() + RECIPE_TTL
    summary = {
        "model": recipe_data["model"]["name"],
        "dataset": recipe_data["data"]["name"],
        "target_group_size": recipe_data["averaging"]["target_group_size"],
    }
    if input_shape is not None:
        summary.update(input_shape=list(input_shape), num_classes=num_classes)
    if run_id is not None:
        summary["run_id"] = run_id
    dht.store(RUNS_KEY, summary, expiration, subkey=prefix)
    dht.store(f"{prefix}.recipe", _shareable(recipe_data), expiration)


def _shareable(recipe_data: dict[str, Any]) -> dict[str, Any]:
    """The recipe without what is private to the machine that publishes it."""
    shared = {section: dict(values) for section, values in recipe_data.items()}
    shared.pop("network", None)
    shared.get("output", {}).pop("dir", None)  # the run's eval and checkpoint periods are shared; where, not
    return shared


def list_runs(dht: DHT) -> dict[str, dict[str, Any]]:
    found = dht.get(RUNS_KEY, latest=True)
    if found is None or not isinstance(found.value, dict):
        return {}
    return {k: v.value for k, v in found.value.items() if isinstance(k, str) and isinstance(v.value, dict)}


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


def fetch_recipe(dht: DHT, prefix: str) -> dict[str, Any]:
    """The recipe a run published. Raises ConfigError if there is none."""
    found = dht.get(f"{prefix}.recipe", latest=True)
    if found is None or not isinstance(found.value, dict):
        raise ConfigError(
            f"run {prefix!r} has no recipe in the DHT; check --run (`hive peers ADDRESS` lists the runs), "
            f"or pass a local recipe file"
        )
    return found.value


def trusted_recipe(
    data: dict[str, Any], prefix: str, overrides: list[str] | None, trusted: bool, instead: str
) -> Recipe:
    """A recipe fetched from the DHT, validated. It is data, never code: one that names user code
    (module:function) is refused unless `trusted`.

    Raises:
        ConfigError: invalid, or names user code without `trusted`; `instead` says what else to do.
    """
    recipe = load_recipe(None, overrides, data=data)
    if recipe.user_code() and not trusted:
        raise ConfigError(
            f"the recipe of run {prefix!r} names code to run on this machine ({', '.join(recipe.user_code())}); "
            f"read the recipe, then pass --trust-recipe, or {instead}"
        )
    return recipe


def check_run_prefix(run: str | None, recipe: Recipe, path: object) -> None:
    """Raises ConfigError if --run names another run than the local recipe file `path`."""
    if run and run != recipe.run.prefix:
        raise ConfigError(f"--run {run!r} does not match run.prefix = {recipe.run.prefix!r} in {path}; drop one")


def wait_for_recipe(
    dht: DHT, prefix: str | None, timeout: float, on_wait: Callable[[float], None] | None = None
) -> tuple[str, dict[str, Any]]:
    """(prefix, recipe) of the run to join, waiting up to `timeout` seconds for it to be
    announced: a peer started a moment ago publishes its run once its model is built.
    `on_wait(seconds waited)` is called about twice a second while it waits.

    Raises:
        ConfigError: still no such run after `timeout`, or several runs and none chosen.
    """
    began = time.monotonic()
    deadline = began + timeout
    while True:
        try:
            chosen = choose_run(dht, prefix)
            return chosen, fetch_recipe(dht, chosen)
        except ConfigError:
            several = prefix is None and len(list_runs(dht)) > 1  # waiting would not help
            if several or time.monotonic() >= deadline:
                raise
        if on_wait is not None:
            on_wait(time.monotonic() - began)
        time.sleep(0.5)


def publish_progress(dht: DHT, prefix: str, progress: dict[str, Any], ttl: float) -> None:
    dht.store(f"{prefix}.progress", progress, get_dht_time() + ttl, subkey=str(dht.peer_id))


def fetch_progress(dht: DHT, prefix: str) -> dict[str, dict[str, Any]]:
    """{peer id: progress} of the peers of a run that reported recently."""
    found = dht.get(f"{prefix}.progress", latest=True)
    if found is None or not isinstance(found.value, dict):
        return {}
    return {k: v.value for k, v in found.value.items() if isinstance(k, str) and isinstance(v.value, dict)}
