"""`hive local N RECIPE`: N peers of one run on this machine, the one-command demo.

The first peer runs `hive start`, the others `hive join` its first address; every peer is a
child process in --json mode. Their human output is forwarded to stderr with a `[peer K]`
prefix; their JSON events are read to learn the bootstrap address and the final results,
printed as a table at the end. Ctrl+C (or SIGTERM) is passed on to every peer, which saves a
checkpoint and stops; none is left behind.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Annotated, Any

import typer

from hivecli._exceptions import ConfigError, HiveError
from hivecli.cli import _output
from hivecli.cli._errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from hivecli.cli._network import SwarmKeyOption, net_settings
from hivecli.cli._signals import stop_on_signals
from hivecli.cli.train_cmd import JsonFlag, MaxSecondsFlag, MaxStepsFlag, SetFlag

STARTUP_TIMEOUT = 120.0


class _Peer:
    """One child `hive start/join --json` process and the events it printed."""

    def __init__(self, index: int, argv: list[str], json_output: bool, env: dict[str, str]):
        self.index, self.json_output = index, json_output
        # a session of its own: a terminal's Ctrl+C reaches only us, and we pass it on once (a peer
        # that got it twice would quit without its final checkpoint)
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True,
            env=env,
        )  # fmt: skip
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.finished: dict[str, Any] | None = None
        self._threads = [
            threading.Thread(target=self._read_events, args=(self.proc.stdout,), daemon=True),
            threading.Thread(target=self._forward, args=(self.proc.stderr,), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_events(self, stream: IO[str]) -> None:
        for line in stream:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "finished":
                self.finished = event
            if self.json_output:
                fields = {k: v for k, v in event.items() if k != "event"}
                _output.emit_json(str(event.get("event")), peer=self.index, **fields)
            self.events.put(event)

    def _forward(self, stream: IO[str]) -> None:
        for line in stream:
            sys.stderr.write(f"[peer {self.index}] {line}")
            sys.stderr.flush()

    def wait_for_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    code = self.proc.returncode
                    raise HiveError(f"peer {self.index} exited with code {code} before its {name!r} event") from None
                continue
            if event.get("event") == name:
                return event
        raise HiveError(f"peer {self.index} sent no {name!r} event within {timeout:g} s")

    def close(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        for thread in self._threads:
            thread.join(timeout=5)
        return code


def local(
    n: Annotated[int, typer.Argument(min=1, max=64, help="How many peers to run.")],
    recipe: Annotated[Path, typer.Argument(help="The run's recipe (TOML).")],
    host: Annotated[str, typer.Option("--host", help="IP address the peers listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Peer K listens on PORT+K (0: any free ports).")
    ] = 0,
    set_values: SetFlag = None,
    max_steps: MaxStepsFlag = None,
    max_seconds: MaxSecondsFlag = None,
    swarm_key: SwarmKeyOption = None,
    json_output: JsonFlag = False,
) -> None:
    """Run N peers of a recipe on this machine: the first starts the run, the others join it.

    Each peer's output is prefixed with \\[peer K]; at the end a table shows each peer's steps, averaging rounds and test accuracy. Ctrl+C stops every peer cleanly (each saves a checkpoint). Exit code 0 if every peer finished (or on SIGTERM), 1 if one failed (2 if for a bad recipe), 130 if interrupted.
    """
    from hivecli.recipe import load_recipe

    loaded = load_recipe(recipe, set_values)  # a bad recipe fails here, once, not in N children
    base = [sys.executable, "-m", "hivecli.cli.main"]
    env = _child_environment(n)
    if port and port + n - 1 > 65535:
        raise ConfigError(f"--port {port} leaves no room for {n} peers (PORT+{n - 1} > 65535); choose a lower port")
    common = ["--json", "--host", host]
    set_values = list(set_values or [])
    target = loaded.averaging.target_group_size
    if 2 <= n < target:  # no group here can be larger: waiting for more peers would only slow rounds
        if loaded.averaging.min_group_size > n:
            raise ConfigError(
                f"averaging.min_group_size = {loaded.averaging.min_group_size} needs more than the {n} peers "
                f"asked for; run more peers or lower min_group_size"
            )
        set_values.append(f"averaging.target_group_size={n}")
        _output.stderr.print(f"groups of at most {n} peers here (the recipe allows {target})")
    if loaded.run.min_peers > n:  # the peers all start here: waiting for more would only waste time
        set_values.append(f"run.min_peers={n}")
    for value in set_values:
        common += ["--set", value]
    if max_steps is not None:
        common += ["--max-steps", str(max_steps)]
    if max_seconds is not None:
        common += ["--max-seconds", str(max_seconds)]
    if swarm_key:
        net_settings(swarm_key)  # a bad key file fails here, once, not in N children
        common += ["--swarm-key", swarm_key]
    peers: list[_Peer] = []

    def pass_on(signal_name: str) -> None:  # the first SIGINT or SIGTERM goes to every peer, once
        for peer in peers:
            if peer.proc.poll() is None:
                peer.proc.send_signal(signal.Signals[signal_name])

    codes: list[int] = []
    with stop_on_signals(on_stop=pass_on) as interrupted:
        try:

            def port_of(index: int) -> list[str]:
                return ["--port", str(port + index if port else 0)]

            peers.append(_Peer(0, [*base, "start", str(recipe), *common, *port_of(0)], json_output, env))
            try:
                address = peers[0].wait_for_event("listening", STARTUP_TIMEOUT)["maddrs"][0]
                run = peers[0].wait_for_event("run", STARTUP_TIMEOUT)  # the joiners take only its owner's recipe
            except HiveError:
                if interrupted.is_set():
                    raise typer.Exit(interrupted.exit_code) from None
                raise
            _output.stderr.print(f"peer 0 listens at {address}; starting {n - 1} more")
            for index in range(1, n):
                if interrupted.is_set():
                    break
                joiner = [*base, "join", address, str(recipe), "--run", f"{run['prefix']}@{run['owner']}"]
                peers.append(_Peer(index, [*joiner, *common, *port_of(index)], json_output, env))
            while any(peer.proc.poll() is None for peer in peers):
                time.sleep(0.2)
        finally:
            for peer in peers:
                if peer.proc.poll() is None:
                    peer.proc.send_signal(interrupted.signum or signal.SIGINT)
            codes = [peer.close(timeout=60) for peer in peers]
    _print_results(peers, codes)
    if interrupted.is_set():
        raise typer.Exit(interrupted.exit_code)
    if any(code != EXIT_OK for code in codes):
        failed = [str(peer.index) for peer, code in zip(peers, codes, strict=True) if code != EXIT_OK]
        _output.stderr.print(f"peers {', '.join(failed)} failed; their output above says why")
        raise typer.Exit(EXIT_USAGE if EXIT_USAGE in codes else EXIT_FAILURE)
    if not peers:
        raise ConfigError("no peer was started")


def _print_results(peers: list[_Peer], codes: list[int]) -> None:
    from rich.table import Table

    table = Table(title="Results per peer")
    for column in ("peer", "exit", "steps", "rounds", "test accuracy", "checkpoint"):
        table.add_column(column, overflow="fold")
    for peer, code in zip(peers, codes, strict=True):
        done = peer.finished or {}
        accuracy = done.get("accuracy")
        table.add_row(
            str(peer.index),
            str(code),
            str(done.get("step", "-")),
            str(done.get("rounds", "-")),
            "-" if accuracy is None else f"{accuracy:.3f}",
            str(done.get("checkpoint", "-")),
        )
    (_output.stderr if any(p.json_output for p in peers) else _output.stdout).print(table)


def _child_environment(n: int) -> dict[str, str]:
    """The peers' environment: each gets its share of the CPU cores for torch's threads, as
    torchrun does, unless OMP_NUM_THREADS is set. N peers each running one thread per core
    oversubscribe the machine, and torch's threads then spin waiting for each other: on 2 cores,
    training with 2 threads per peer ran 1.5-5x slower than with 1 thread beside other work."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        from hivecli.cores import usable_cores

        env["OMP_NUM_THREADS"] = str(max(1, usable_cores() // n))
    return env
