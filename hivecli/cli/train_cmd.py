"""`hive start RECIPE` and `hive join ADDRESS [RECIPE]`: run one training peer.

Both print the peer's addresses before torch is even imported (a joiner can be told where to
connect within a second), then train with a live status line on stderr. With --json, events
go to stdout as JSON lines, the first being "listening". Ctrl+C stops after the current step,
saves a checkpoint and exits 130; SIGTERM does the same and exits 0.

A peer restarted with the same --identity resumes from its latest checkpoint in the same run
(unless --fresh), and still takes the run's newer state from its peers if the run moved on.

With --nproc-per-node N > 1 the command runs itself again as the N processes of one peer
(torchrun's launcher, hivecli.distributed): rank 0 is the peer, the others train with it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from hivecli._exceptions import ConfigError
from hivecli.cli import _output
from hivecli.cli._network import (
    AnnounceOption,
    ClientModeOption,
    IdentityOption,
    InitialPeersOption,
    SwarmKeyOption,
    announce_maddrs,
    describe_reachability,
    listen_maddr,
    net_settings,
    print_reachability,
    reachability_json,
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
MaxStepsFlag = Annotated[
    int | None, typer.Option("--max-steps", min=1, help="Stop this peer at step N (same as --set limits.max_steps=N).")
]
MaxSecondsFlag = Annotated[
    float | None,
    typer.Option("--max-seconds", min=0.001, help="Stop this peer after this long (--set limits.max_seconds=S)."),
]
FreshFlag = Annotated[
    bool,
    typer.Option(
        "--fresh",
        help="Do not resume from this peer's checkpoints; start a new run (start) or take the run's state (join).",
    ),
]
RunFlag = Annotated[
    str | None,
    typer.Option(
        "--run",
        help="The run to join: PREFIX@OWNER as `hive start` printed it (only a recipe signed by OWNER is taken), "
        "or PREFIX alone if one peer publishes it.",
    ),
]
TrustRecipeFlag = Annotated[
    bool, typer.Option("--trust-recipe", help="Run the user code (module:function) a fetched recipe names.")
]
JsonFlag = Annotated[
    bool, typer.Option("--json", help="Print events as JSON lines on stdout; human output stays on stderr.")
]
DashboardFlag = Annotated[
    int | None,
    typer.Option(
        "--dashboard",
        min=0,
        max=65535,
        help="Serve the run's live dashboard (as `hive monitor` does) from this peer on this port; 0: any free one.",
    ),
]
NprocFlag = Annotated[
    int,
    typer.Option(
        "--nproc-per-node",
        help="Run this peer as N processes on this machine, as torchrun does (DDP: one per GPU, or CPU processes); "
        "it still counts as one peer of the run.",
    ),
]
DashboardHostFlag = Annotated[
    str,
    typer.Option("--dashboard-host", help="Address the dashboard listens on (default 127.0.0.1: this machine only)."),
]

# set by --nproc-per-node's launcher in each process it starts: "this process is one rank of a peer"
PEER_PROCESSES_ENV = "HIVECLI_PEER_PROCESSES"


def start(
    recipe: Annotated[Path, typer.Argument(help="The run's recipe, a TOML file (see recipes/default.toml).")],
    host: HostFlag = None,
    port: PortFlag = None,
    announce: AnnounceOption = None,
    client_mode: ClientModeOption = False,
    initial_peers: InitialPeersOption = None,
    identity: IdentityOption = None,
    swarm_key: SwarmKeyOption = None,
    set_values: SetFlag = None,
    max_steps: MaxStepsFlag = None,
    max_seconds: MaxSecondsFlag = None,
    fresh: FreshFlag = False,
    json_output: JsonFlag = False,
    dashboard: DashboardFlag = None,
    dashboard_host: DashboardHostFlag = "127.0.0.1",
    nproc_per_node: NprocFlag = 1,
) -> None:
    """Start a training run (or a peer of one, with --initial-peers) from a recipe.

    Prints every address this peer can be reached at and the `hive join ...` line to run elsewhere, publishes the recipe in the DHT under the run's prefix, then trains with a live status line until the run's goal (run.total_samples or run.total_epochs, over all peers), a limit of this peer, or Ctrl+C. Writes runs/PREFIX/RUN_ID/PEER/: recipe.toml, metrics.jsonl, checkpoints/. Started again with the same --identity, the peer resumes from its latest checkpoint unless --fresh.
    """
    _check_nproc(nproc_per_node)
    overrides = _overrides(set_values, host, port, max_steps, max_seconds, client_mode)
    loaded = load_recipe(recipe, overrides)
    _launch_processes(nproc_per_node, loaded)
    peers = split_peer_list(initial_peers) or list(loaded.network.initial_peers)
    _run_peer(
        loaded, overrides, peers, announce, identity, swarm_key, json_output, join=False, fresh=fresh,
        dashboard=(dashboard_host, dashboard) if dashboard is not None else None,
    )  # fmt: skip


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
    client_mode: ClientModeOption = False,
    initial_peers: InitialPeersOption = None,
    identity: IdentityOption = None,
    swarm_key: SwarmKeyOption = None,
    set_values: SetFlag = None,
    max_steps: MaxStepsFlag = None,
    max_seconds: MaxSecondsFlag = None,
    fresh: FreshFlag = False,
    json_output: JsonFlag = False,
    dashboard: DashboardFlag = None,
    dashboard_host: DashboardHostFlag = "127.0.0.1",
    nproc_per_node: NprocFlag = 1,
) -> None:
    """Join a running training run: fetch its recipe, download its current state, train with it.

    Waits (with a spinner) up to a minute for the run to be announced. A fetched recipe is data, never code: if it names user code (module:function), join refuses unless you pass --trust-recipe or give a local RECIPE file. Joined again with the same --identity, the peer resumes from its checkpoint, or from the run's state if the run has moved further.
    """
    _check_nproc(nproc_per_node)
    overrides = _overrides(set_values, host, port, max_steps, max_seconds, client_mode)
    peers = split_peer_list([address, *(initial_peers or [])])
    local = load_recipe(recipe, overrides) if recipe is not None else None
    if local is not None:
        from hivecli.runcard import parse_run_ref
        from hivecli.runs import check_run_prefix

        check_run_prefix(parse_run_ref(run)[0] if run else None, local, recipe)
    _launch_processes(nproc_per_node, local)
    _run_peer(
        local, overrides, peers, announce, identity, swarm_key, json_output, join=True, run=run,
        trust_recipe=trust_recipe, fresh=fresh, dashboard=(dashboard_host, dashboard) if dashboard is not None else None,
    )  # fmt: skip


def _overrides(
    set_values: list[str] | None,
    host: str | None,
    port: int | None,
    max_steps: int | None,
    max_seconds: float | None,
    client_mode: bool = False,
) -> list[str]:
    overrides = list(set_values or [])
    if client_mode:
        overrides.append("network.client_mode=true")
    if host is not None:
        overrides.append(f'network.host="{host}"')
    if port is not None:
        overrides.append(f"network.port={port}")
    if max_steps is not None:
        overrides.append(f"limits.max_steps={max_steps}")
    if max_seconds is not None:
        overrides.append(f"limits.max_seconds={float(max_seconds)}")
    return overrides


def _check_nproc(nproc: int) -> None:
    if nproc < 1:
        raise ConfigError(f"--nproc-per-node {nproc}: a peer runs at least 1 process; give 1 (the default) or more")


def _launch_processes(nproc: int, recipe: Recipe | None) -> None:
    """--nproc-per-node N > 1: run this very command again as the N processes of one peer, and exit
    with the peer's exit code (hivecli.distributed.launch). The processes run without the flag.

    Raises:
        ConfigError: the recipe (if known here; a fetched one is checked by rank 0) cannot run as N processes.
    """
    if nproc == 1:
        return
    from hivecli.distributed import launch, peer_device

    if recipe is not None:
        peer_device(recipe, nproc)  # a recipe that cannot run this way fails here, once, before any process starts
    os.environ[PEER_PROCESSES_ENV] = str(nproc)
    raise typer.Exit(launch(nproc, _without_nproc(sys.argv[1:])))


def _without_nproc(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            kept.append(arg)
    return kept


JOIN_WAIT_S = 60.0  # how long `hive join` waits for the run to be announced


def _run_peer(
    recipe: Recipe | None,
    overrides: list[str],
    peers: list[str],
    announce: list[str] | None,
    identity: str | None,
    swarm_key: str | None,
    json_output: bool,
    *,
    join: bool,
    run: str | None = None,
    trust_recipe: bool = False,
    fresh: bool = False,
    dashboard: tuple[str, int] | None = None,
) -> None:
    from hivecli.cli._display import Display
    from hivecli.cli._signals import stop_on_signals
    from hivecli.dht.dht import DHT

    leader = None
    if os.environ.get(PEER_PROCESSES_ENV):  # one process of a --nproc-per-node peer: rank 0 is the peer
        from hivecli.distributed import Leader, PeerProcesses, follow

        processes = PeerProcesses.from_env()
        if processes.rank > 0:  # no DHT, nothing published: train along with rank 0
            with stop_on_signals() as stop:
                raise typer.Exit(follow(processes, stop))
        leader = Leader(processes)  # closed with the DHT, below: the other ranks are released then
    # network settings come from the local recipe, or (joining without one) from env and flags only:
    # the rest of the environment applies to the fetched recipe later
    if recipe is None:
        network_env = {k: v for k, v in os.environ.items() if k.startswith("HIVE_NETWORK_")}
        network = load_recipe(None, [o for o in overrides if o.startswith("network.")], env=network_env).network
    else:
        network = recipe.network
    began = time.monotonic()
    dht = DHT(
        initial_peers=peers,
        host_maddrs=[listen_maddr(network.host, network.port)],
        announce_maddrs=announce_maddrs(list(announce or network.announce), network.port),
        identity_path=identity or network.identity,
        net_settings=net_settings(swarm_key, relay=network.relay),
        client_mode=network.client_mode,
        check_reachability=not network.client_mode,
        start=True,
    )
    display = Display(json_output, goal=None)
    served: list[Any] = []  # the dashboard's collector and server, if asked for
    try:
        reachability, maddrs, join_maddrs = describe_reachability(dht)
        _announce(dht, maddrs, join_maddrs, reachability, json_output, time.monotonic() - began)
        with stop_on_signals(on_stop=display.stopping, second_interrupt_raises=True) as stop:
            recipe, card, joining = _find_run(dht, recipe, overrides, display, stop, join, run, trust_recipe, fresh)
            _announce_run(card, join_maddrs, json_output)
            display.goal = _describe_goal(recipe)
            if dashboard is not None and not stop.is_set():
                served = _serve_dashboard(dht, recipe.run.prefix, *dashboard, json_output)
            if not stop.is_set():
                _train(recipe, dht, display, stop, card=card, joining=joining, fresh=fresh, leader=leader)
    finally:
        if leader is not None:  # the other processes are released, whatever happened here
            leader.close()
        for part in reversed(served):
            part.stop()
        display.close()
        dht.shutdown()
    raise typer.Exit(stop.exit_code)


def _serve_dashboard(dht: Any, prefix: str, host: str, port: int, json_output: bool) -> list[Any]:
    """Start the run's dashboard on this peer (--dashboard); returns what to stop, in start order.

    Raises:
        ConfigError: the port cannot be bound, or aiohttp is missing.
    """
    from hivecli.monitor.collector import Collector
    from hivecli.monitor.server import DashboardServer

    collector = Collector(dht, prefix).start()
    try:
        server = DashboardServer(collector, host, port).start()
    except BaseException:
        collector.stop()
        raise
    if json_output:
        _output.emit_json("dashboard", url=server.url)
    else:
        _output.stderr.print(f"Dashboard of run {prefix} at {server.url}", markup=False)
    return [collector, server]


def _find_run(
    dht: Any, recipe: Recipe | None, overrides: list[str], display: Any, stop: Any, join: bool, run: str | None,
    trust_recipe: bool, fresh: bool,
) -> tuple[Recipe, Any, bool]:  # fmt: skip
    """(recipe, run card, whether the run already exists) for this peer: the run a joiner is
    told to join, or for `start` the run of that prefix already training in the DHT (then this
    peer joins it), else the run this identity last trained in (resumed), else a new run that
    this peer owns."""
    from hivecli.runcard import parse_run_ref
    from hivecli.rundir import new_run_id, resumable_run
    from hivecli.runs import new_card, run_cards, trusted_recipe, wait_for_run

    if join:  # wait for the run to be announced: its card (the owner-signed recipe and run id) comes with it
        prefix, owner = parse_run_ref(run) if run else (None, None)
        wanted = recipe.run.prefix if recipe is not None else prefix
        what = f"run {wanted}" if wanted else "a run"

        def waiting(elapsed: float) -> None:
            if stop.is_set():
                raise typer.Exit(stop.exit_code)
            display.event("waiting", {"what": f"{what} to be announced", "elapsed_s": round(elapsed, 1),
                                      "remaining_s": round(JOIN_WAIT_S - elapsed, 1)})  # fmt: skip

        card = wait_for_run(dht, wanted, owner, timeout=JOIN_WAIT_S, on_wait=waiting)
        display.event("waiting", {"what": "run", "done": True})
        if owner is None:
            logger.info("Run %s is signed by its owner %s; pin it with --run %s", card.prefix, card.owner, card.address)
        if recipe is None:
            recipe = trusted_recipe(card, overrides, trust_recipe, instead="join with a local recipe file")
            _output.stderr.print(f"Joining run [bold]{escape(recipe.run.prefix)}[/bold] with the recipe it published")
        return recipe, card, True
    assert recipe is not None
    prefix = recipe.run.prefix
    live = [(n, c) for c in run_cards(dht, prefix) if (n := _live_peers(dht, recipe, c.run_id)) > 0]
    if live:
        card = max(live, key=lambda item: item[0])[1]  # the run most of its peers train in
        if fresh:
            raise ConfigError(
                f"--fresh starts a new run, but run {prefix!r} is training in this DHT (run id {card.run_id}); "
                f"drop --fresh to join it, or choose another run.prefix"
            )
        return recipe, card, True
    resumable = None if fresh else resumable_run(recipe.output.dir, prefix, str(dht.peer_id))
    return recipe, new_card(dht, recipe.to_dict(), resumable or new_run_id()), False


def _live_peers(dht: Any, recipe: Recipe, run_id: str) -> int:
    """Other peers of the run that reported recently (an announcement outlives its run by minutes;
    our own record, from before a crash, does not count)."""
    from hivecli.progress import is_live, others_records
    from hivecli.utils.timing import get_dht_time

    now, period = get_dht_time(), recipe.output.report_every_seconds
    return sum(is_live(record, now, period) for record in others_records(dht, recipe.run.prefix, run_id).values())


def _describe_goal(recipe: Recipe) -> str | None:
    if recipe.run.total_samples is not None:
        return f"{recipe.run.total_samples:,} samples"
    if recipe.run.total_epochs is not None:
        return f"{recipe.run.total_epochs:g} epochs"
    return None


def _announce(
    dht: Any, maddrs: list[str], join_maddrs: list[str], reachability: str, json_output: bool, seconds: float
) -> None:
    """Where others can reach this peer (reachable addresses first), and whether they can."""
    peer_id = str(dht.peer_id)
    join_line = f"hive join {join_maddrs[0]}" if join_maddrs else None
    if json_output:
        _output.emit_json(
            "listening", peer_id=peer_id, maddrs=maddrs, join=join_line, seconds=round(seconds, 3),
            reachability=reachability_json(dht, reachability),
        )  # fmt: skip
    out = _output.stderr if json_output else _output.stdout  # stdout carries only JSON with --json
    print_reachability(out, f"Peer [bold]{peer_id}[/bold] is listening at:", maddrs, reachability)
    sys.stdout.flush()


def _announce_run(card: Any, join_maddrs: list[str], json_output: bool) -> None:
    """The line to join this very run elsewhere: it names the run's owner, whose signature a
    joiner then requires on the recipe."""
    join_line = f"hive join {join_maddrs[0]} --run {card.address}" if join_maddrs else None
    if json_output:
        _output.emit_json("run", prefix=card.prefix, run_id=card.run_id, owner=str(card.owner), join=join_line)
    out = _output.stderr if json_output else _output.stdout
    if join_line is None:
        out.print(f"To join run {card.address}, join through a reachable peer of the run:", markup=False)
        out.print(f"  hive join ADDRESS_OF_THAT_PEER --run {card.address}", markup=False)
    else:
        out.print("To join this run from another machine, run:", markup=False)
        out.print(f"  {join_line}", markup=False)
    sys.stdout.flush()


def _train(
    recipe: Recipe, dht: Any, display: Any, stop: Any, *, card: Any, joining: bool, fresh: bool, leader: Any = None
) -> None:
    from hivecli.rundir import claim, peer_dir
    from hivecli.training import Trainer

    run_id = card.run_id

    run_dir = peer_dir(recipe.output.dir, recipe.run.prefix, run_id, str(dht.peer_id))
    try:
        claim(run_dir, recipe.run.prefix, run_id, str(dht.peer_id))
        trainer = Trainer(
            recipe, dht, run_dir, display.event, run_id=run_id, joining=joining, fresh=fresh, card=card, ranks=leader
        )
    except OSError as e:
        raise ConfigError(
            f"output.dir = {recipe.output.dir!r}: cannot write {e.filename or run_dir} ({e.strerror or e}); "
            f'choose a writable folder, e.g. --set output.dir="$HOME/hive-runs"'
        ) from None
    try:
        trainer.run(stop)  # announces the run once training starts: a recipe that fails never reaches the DHT
    finally:
        trainer.close()
