"""`hive keygen`: create the keys of a private swarm and of a peer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hivecli.cli import _output


def keygen(
    swarm_key: Annotated[
        Path | None,
        typer.Option("--swarm-key", help="Write a new swarm key here (default: ./swarm.key unless --identity)."),
    ] = None,
    identity: Annotated[
        Path | None,
        typer.Option("--identity", help="Write a new peer identity (private key) here and print its peer ID."),
    ] = None,
) -> None:
    """Create a swarm key for a private run, or a peer identity.

    A swarm key is a shared secret: a peer without it cannot connect to, read from or store into a swarm started with it (`hive start RECIPE --swarm-key FILE`, or HIVE_SWARM_KEY=FILE). Give the file to every peer of the run over a channel you trust. An identity is a peer's private key (`--identity FILE` on start/join/dht): a run started with it keeps its owner, and so its `--run PREFIX@OWNER` address, across restarts. Neither file is ever overwritten.
    """
    from hivecli.net.identity import Identity
    from hivecli.net.secure import generate_swarm_key, swarm_key_fingerprint

    if swarm_key is None and identity is None:
        swarm_key = Path("swarm.key")
    if swarm_key is not None:
        key = generate_swarm_key(swarm_key)
        _output.stdout.print(f"Wrote swarm key {swarm_key} (fingerprint {swarm_key_fingerprint(key)}).", markup=False)
        _output.stdout.print(
            f"Keep it secret; every peer of the run needs it: hive start RECIPE --swarm-key {swarm_key}", markup=False
        )
    if identity is not None:
        if identity.exists():
            from hivecli._exceptions import ConfigError

            raise ConfigError(
                f"--identity {identity}: the file exists; keygen never overwrites a key, choose a new path"
            )
        peer = Identity.load_or_create(identity).peer_id
        _output.stdout.print(f"Wrote identity {identity}: peer {peer}", markup=False)
