"""`hive start RECIPE` and `hive join ADDRESS [RECIPE]`: run one training peer.

Both print the peer's addresses before torch is even imported (a joiner can be told where to
connect within a second), then train with a live status line on stderr. With --json, events
go to stdout as JSON lines, the first being "listening". Ctrl+C stops after the current step,
saves a checkpoint and exits 130; SIGTERM does the same and exits 0.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from hivecli.cli import _output
from hivecli.cli._errors import EXIT_INTERRUPTED, EXIT_OK
from hivecli.cli._network import (
    AnnounceOption,
    IdentityOption,
    InitialPeersOption,
    announce_maddrs,
    listen_maddr,
    split_peer_list,
)
from hivecli.recipe import Recipe, load_recipe

logger = logging.getLogger("hivecli.cli.train")

HostFlag = Annotated[
    str | None, typer.Option("--host", help="IP address to listen on (recipe: network.host, default 0.0.0.0).")
]
PortFlag = Annotated[
    int | None, typer.Option("--port", min=0, max=65535, help="TCP port to listen on (recipe: network.port; 0: any).")
]
SetFlag = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a recipe value: SECTION.KEY=VALUE, e.g. --set limits.max_steps=500 (repeatable)."
    ),
]
MaxStepsFlag = Annotated[int | None, typer.Option("--max-steps", min=1, help="Same as --set limits.max_steps=N.")]
RunFlag = Annotated[str | None, typer.Option("--run", help="The run's prefix, if the DHT has several runs.")]
TrustRecipeFlag = Annotated[
    bool, typer.Option("--trust-recipe", help="Run the user code (module:function) a fetched recipe names.")
]
JsonFlag = Annotated[
    bool, typer.Option("--json", help="Print events as JSON lines on stdout; human output stays on stderr.")
]


def start(
    recipe: Annotated[Path, typer.Argument(help="The run's recipe, a TOML file (see recipes/default.toml).")],
    host: HostFlag = None,
    port: PortFlag = None,
    announce: AnnounceOption = None,
    initial_peers: InitialPeersOption = None,
    identity: IdentityOption = None,
    set_values: SetFlag = None,
    max_steps: MaxStepsFlag = None,
    json_output: JsonFlag = False,
) -> None:
    """Start a training run (or a peer of one, with --initial-peers) from a recipe.

    Prints every address this peer can be reached at and the `hive join ...` line to run elsewhere, publishes the recipe in the DHT under the run's prefix, then trains with a live status line. Writes runs/PREFIX/PEER/: recipe.toml, metrics.jsonl, checkpoints/.
    """
    overrides = _overrides(set_values, host, port, max_steps)
    loaded = load_recipe(recipe, overrides)
    peers = split_peer_list(initial_peers) or list(loaded.network.initial_peers)
    _run_peer(loaded, overrides, peers, announce, identity, json_output, join=False)


def join(
    address: Annotated[str, typer.Argument(help="Multiaddr of any peer of the run (what `hive start` printed).")],
    recipe: Annotated[
        Path | None, typer.Argument(help="A local recipe; without it, the run's recipe is fetched from the DHT.")
    ] = None,
    run: RunFlag = None,
    trust_recipe: TrustRecipeFlag = False,
    host: HostFlag = None,
    port: PortFlag = None,
    announce: AnnounceOption = None,
    initial_peers: InitialPeersOption = None,
    identity: IdentityOption = None,
    set_values: SetFlag = None,
    max_steps: MaxStepsFlag = None,
    json_output: JsonFlag = False,
) -> None:
    """Join a running training run: fetch its recipe, download its current state, train with it.

    A fetched recipe is data, never code: if it names user code (module:function), join refuses unless you pass --trust-recipe or give a local RECIPE file.
    """
    overrides = _overrides(set_values, host, port, max_steps)
    peers = split_peer_list([address, *(initial_peers or [])])
    local = load_recipe(recipe, overrides) if recipe is not None else None
    if local is not None:
        from hivecli.runs import check_run_prefix

        check_run_prefix(run, local, recipe)
    _run_peer(local, overrides, peers, announce, identity, json_output, join=True, run=run, trust_recipe=trust_recipe)


def _overrides(set_values: list[str] | None, host: str | None, port: int | None, max_steps: int | None) -> list[str]:
    overrides = list(set_values or [])
    if host is not None:
        overrides.append(f'network.host="{host}"')
    if port is not None:
        overrides.append(f"network.port={port}")
    if max_steps is not None:
        overrides.append(f"limits.max_steps={max_steps}")
    return overrides


def _run_peer(
    recipe: Recipe | None,
    overrides: list[str],
    peers: list[str],
    announce: list[str] | None,
    identity: str | None,
    json_output: bool,
    *,
    join: bool,
    run: str | None = None,
    trust_recipe: bool = False,
) -> None:
    from hivecli.dht.dht import DHT
    from hivecli.runs import trusted_recipe, wait_for_recipe

    # network settings come from the local recipe, or (joining without one) from env and flags only
    network = (recipe or load_recipe(None, [o for o in overrides if o.startswith("network.")])).network
    began = time.monotonic()
    dht = DHT(
        initial_peers=peers,
        host_maddrs=[listen_maddr(network.host, network.port)],
        announce_maddrs=announce_maddrs(list(announce or network.announce), network.port),
        identity_path=identity or network.identity,
        start=True,
    )
    try:
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        _announce(str(dht.peer_id), maddrs, json_output, time.monotonic() - began)
        if recipe is None:
            prefix, data = wait_for_recipe(dht, run, timeout=30.0)
            recipe = trusted_recipe(data, prefix, overrides, trust_recipe, instead="join with a local recipe file")
            _output.stderr.print(f"Joining run [bold]{prefix}[/bold] with the recipe it published")
        _train(recipe, dht, json_output, join)
    finally:
        dht.shutdown()


def _announce(peer_id: str, maddrs: list[str], json_output: bool, seconds: float) -> None:
    join_line = f"hive join {maddrs[0]}"
    if json_output:
        _output.emit_json("listening", peer_id=peer_id, maddrs=maddrs, join=join_line, seconds=round(seconds, 3))
    out = _output.stderr if json_output else _output.stdout  # stdout carries only JSON with --json
    out.print(f"Peer [bold]{peer_id}[/bold] is listening at:")
    for maddr in maddrs:
        out.print(f"  {maddr}")
    out.print("To join this run from another machine, run:")
    out.print(f"  {join_line}")
    sys.stdout.flush()


def _train(recipe: Recipe, dht: Any, json_output: bool, join: bool) -> None:
    from hivecli.training import Trainer

    run_dir = Path(recipe.output.dir) / recipe.run.prefix / str(dht.peer_id)[-8:]
    display = _Display(json_output, recipe)
    stop = threading.Event()
    exit_code = {"value": EXIT_OK}

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():  # a second Ctrl+C: stop now, without a checkpoint
            raise KeyboardInterrupt
        exit_code["value"] = EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_OK
        _output.stderr.print("Stopping after this step (Ctrl+C again to quit at once)...")
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    trainer = None
    try:
        trainer = Trainer(recipe, dht, run_dir, display.event, joining=join)
        trainer.publish()  # only now: a recipe whose model or data fail never reaches the DHT
        display.event("started", {"run_dir": str(run_dir), "prefix": recipe.run.prefix})
        if join and not trainer.load_state_from_peers(stop, timeout=30.0) and not stop.is_set():
            logger.warning("No peer of run %r shared its state within 30 s; starting from the recipe's seed",
                           recipe.run.prefix)  # fmt: skip
        trainer.run(stop)
    finally:
        display.close()
        if trainer is not None:
            trainer.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    raise typer.Exit(exit_code["value"])


class _Display:
    """Turns trainer events into a status line on stderr (live on a terminal) and JSON lines."""

    def __init__(self, json_output: bool, recipe: Recipe):
        self.json_output, self.recipe = json_output, recipe
        self.live: Any = None
        if sys.stderr.isatty():
            from rich.live import Live

            self.live = Live("", console=_output.stderr, refresh_per_second=4, transient=True)
            self.live.start()
        self.status: dict[str, Any] = {}

    def event(self, name: str, fields: dict[str, Any]) -> None:
        if self.json_output:
            _output.emit_json(name, **fields)
        if name == "progress":
            self.status.update(fields)
            line = self._status_line()
            if self.live is not None:
                self.live.update(line)
            else:
                _output.stderr.print(line)
        elif name == "eval":
            self.status["accuracy"] = fields["accuracy"]
            _output.stderr.print(f"step {fields['step']}: test accuracy {fields['accuracy']:.3f}")
        elif name == "checkpoint":
            logger.debug("Saved %s", fields["path"])
        elif name == "state_loaded":
            _output.stderr.print(f"Loaded the run's state at step {fields['step']}")
        elif name == "started":
            _output.stderr.print(f"Training; outputs in {fields['run_dir']}")
        elif name == "finished":
            accuracy = "-" if fields["accuracy"] is None else f"{fields['accuracy']:.3f}"
            _output.stderr.print(
                f"Finished ({fields['reason']}) at step {fields['step']}: test accuracy {accuracy}, "
                f"{fields['rounds']} averaging rounds; checkpoint {fields['checkpoint']}"
            )

    def _status_line(self) -> str:
        s, limit = self.status, self.recipe.limits.max_steps
        step = f"{s['step']}/{limit}" if limit else str(s["step"])
        accuracy = f" | acc {s['accuracy']:.3f}" if s.get("accuracy") is not None else ""
        last = f" (last: {s['last_group_size']} peers)" if s.get("rounds") else ""
        loss = "-" if s.get("loss") is None else f"{s['loss']:.3f}"
        return (
            f"step {step} | loss {loss} | {s['samples_per_s']:.0f} samples/s | "
            f"peers {s['peers']} | rounds {s['rounds']}{last}{accuracy}"
        )

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
