"""`hive monitor ADDRESS`: a live web dashboard of the runs in the DHT that ADDRESS belongs to."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from hivecli.cli import _output
from hivecli.cli._network import SwarmKeyOption, net_settings
from hivecli.cli._signals import stop_on_signals

DashboardHostOption = Annotated[
    str,
    typer.Option(
        "--dashboard-host",
        help="Address the dashboard listens on; 127.0.0.1 keeps it to this machine (0.0.0.0: every interface).",
    ),
]


def monitor(
    address: Annotated[
        str,
        typer.Argument(help="Multiaddr of any peer in the DHT, e.g. /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW..."),
    ],
    run: Annotated[
        str | None, typer.Option("--run", help="Watch only this run (PREFIX or PREFIX@OWNER); default: every run.")
    ] = None,
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Dashboard port; 0 picks a free one.")] = 8080,
    dashboard_host: DashboardHostOption = "127.0.0.1",
    interval: Annotated[float, typer.Option("--interval", min=0.5, help="Seconds between reads of the DHT.")] = 2.0,
    export: Annotated[
        Path | None,
        typer.Option(
            "--export",
            help="Write the run's curves (every peer, from the start of the run) as TensorBoard event files under "
            "DIR/PREFIX/PEER, then exit instead of serving the dashboard.",
        ),
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for ADDRESS.")] = 10.0,
    swarm_key: SwarmKeyOption = None,
) -> None:
    """Serve a live web dashboard of a run: its peers, loss and accuracy curves, averaging rounds and traffic.

    Reads only what the run's peers publish in the DHT (no peer's files), so it runs on any machine that can reach one peer. Prints the dashboard's URL, then serves it until Ctrl+C (exit 130) or SIGTERM (exit 0). With --export DIR it writes the curves as TensorBoard event files instead and exits. Exit code 3 if ADDRESS does not answer.
    """
    from hivecli.dht.dht import DHT
    from hivecli.monitor.collector import Collector
    from hivecli.monitor.server import DashboardServer
    from hivecli.net.multiaddr import parse_peer_maddr

    start = parse_peer_maddr(address)
    with DHT(
        initial_peers=[start],  # joining raises BootstrapError (exit 3), saying why, if it does not answer
        client_mode=True,
        wait_timeout=min(3.0, timeout),
        bootstrap_timeout=timeout,
        startup_timeout=2 * timeout + 5,  # past the bootstrap's own deadline
        net_settings=net_settings(swarm_key),
    ) as client:
        collector = Collector(client, run, interval)
        if export is not None:
            _export(collector, export)
            return
        with collector, DashboardServer(collector, dashboard_host, port) as server:
            _output.stdout.print(f"Dashboard of {run or 'every run'} at {server.url} (Ctrl+C to stop)")
            with stop_on_signals() as stop:
                stop.wait()
    raise typer.Exit(stop.exit_code)


def _export(collector: Any, directory: Path) -> None:
    """Read the runs once and write every peer's curve under DIRECTORY/PREFIX/."""
    from hivecli._exceptions import ConfigError
    from hivecli.tblogs import export_curves

    collector.poll()
    curves = collector.curves()
    if not curves:
        raise ConfigError(f"no run is announced in this DHT{'' if collector.run is None else ' as ' + collector.run}")
    for prefix, series in curves.items():
        written = export_curves(directory / prefix, series)
        points = sum(len(points) for points in series.values())
        _output.stdout.print(
            f"run {prefix}: {len(written)} peer{'s' if len(written) != 1 else ''}, {points} points -> "
            f"{directory / prefix}",
            markup=False,
        )
