"""`hive pull-state ADDRESS -o FILE|DIR`: download a run's current model and optimizer state."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from hivecli._exceptions import ConfigError, HiveError
from hivecli.cli import _output
from hivecli.cli._network import SwarmKeyOption, net_settings
from hivecli.cli.train_cmd import RunFlag, TrustRecipeFlag


def pull_state(
    address: Annotated[str, typer.Argument(help="Multiaddr of any peer of the run.")],
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            metavar="<path>",
            help="Checkpoint file to write, or an existing directory to write PREFIX-step-N.pt in.",
        ),
    ],
    run: RunFlag = None,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="A local recipe instead of the one the run published.")
    ] = None,
    trust_recipe: TrustRecipeFlag = False,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout", min=1.0, help="Seconds to wait for the run to be announced, find a donor and download."
        ),
    ] = 120.0,
    swarm_key: SwarmKeyOption = None,
) -> None:
    """Download the current model and optimizer state of a run from one of its peers.

    Writes a checkpoint that plain PyTorch reads: ckpt = torch.load(FILE); model.load_state_dict(ckpt["model"]); also "optimizer" (an optimizer state_dict), "step" and "recipe". The file appears whole or not at all. If no run is announced yet, waits for one up to --timeout. Exit code 2 if -o names a directory that does not exist, 3 if ADDRESS does not answer, 1 if no peer shares its state within --timeout.
    """
    deadline = time.monotonic() + timeout
    folder, file_name = _destination(output)  # before connecting: a typo costs no download

    from hivecli.dht.dht import DHT
    from hivecli.recipe import load_recipe
    from hivecli.runcard import parse_run_ref
    from hivecli.runs import check_run_prefix, list_runs, trusted_recipe, wait_for_run

    wanted, owner = parse_run_ref(run) if run else (None, None)
    loaded = load_recipe(recipe) if recipe is not None else None
    if loaded is not None:
        check_run_prefix(wanted, loaded, recipe)
        wanted = loaded.run.prefix
    with DHT(initial_peers=[address], client_mode=True, net_settings=net_settings(swarm_key), start=True) as dht:
        # the run's card names its owner, and so the peers to download from, even with a local recipe
        card = wait_for_run(dht, wanted, owner, max(0.0, deadline - time.monotonic()), _say_waiting(wanted))
        if loaded is None:
            loaded = trusted_recipe(card, None, trust_recipe, instead="pass a local --recipe")
        prefix = card.prefix
        summary = list_runs(dht, owner=card.owner).get(prefix, {})
        state = _download(dht, loaded, card.address, summary, deadline, timeout)
    # the validated run.prefix, never the DHT's key (any string, e.g. "/etc/x"), names the file
    path = folder / (file_name or f"{loaded.run.prefix}-step-{int(state['step'])}.pt")
    _save_atomically(state, path)
    size = path.stat().st_size / 2**20
    _output.stderr.print(f"Saved step {state['step']} of run {prefix!r} to {path} ({size:.1f} MiB)", markup=False)


def _destination(output: str) -> tuple[Path, str | None]:
    """(directory, file name) that `-o OUTPUT` names; file name None: `<prefix>-step-<N>.pt`,
    once known. An existing directory gets that file; a path ending in a separator must be an
    existing directory; a file's directory must exist. Creates nothing.

    Raises:
        ConfigError: one line naming OUTPUT, what is wrong with it and what to do.
    """
    if not output:
        raise ConfigError("-o '': empty path; name a checkpoint file or an existing directory")
    separators = tuple(sep for sep in (os.sep, os.altsep) if sep)
    into_folder = os.path.isdir(output) or output.endswith(separators)
    path = Path(output)
    folder = path if into_folder else path.parent
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise ConfigError(f"-o {output}: {folder} is not a directory; choose another path")
        raise ConfigError(f"-o {output}: directory {folder} does not exist; create it first or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"-o {output}: directory {folder} is not writable; choose a directory you can write to")
    if not into_folder and os.path.lexists(path) and not os.path.isfile(path):
        raise ConfigError(f"-o {output}: exists and is not a regular file; choose another path")
    return folder, None if into_folder else path.name


def _say_waiting(run: str | None) -> Any:
    """An `on_wait` for wait_for_run: one line on stderr the first time it waits."""
    said = []

    def on_wait(_seconds: float) -> None:
        if not said:
            said.append(True)
            what = f"run {run!r}" if run else "a run"
            _output.stderr.print(f"waiting for {what} to be announced in the DHT ...", markup=False)

    return on_wait


def _save_atomically(state: dict[str, Any], path: Path) -> None:
    """Write the checkpoint so that an interrupted pull-state leaves the old file or none, never half of one.

    Raises:
        HiveError: the file could not be written (disk full, directory removed meanwhile, ...).
    """
    from hivecli.checkpoints import atomic_save

    try:
        atomic_save(state, path)
    except OSError as error:
        raise HiveError(
            f"could not write {path}: {error.strerror or error}; free some space or choose another -o"
        ) from error


def _download(
    dht: Any, recipe: Any, run_address: str, summary: dict[str, Any], deadline: float, timeout: float
) -> dict[str, Any]:
    import torch
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from hivecli.optim import DiLoCoOptimizer, Optimizer
    from hivecli.optim.training_averager import TrainingAverager, parameters_of
    from hivecli.training import build_model_and_optimizer

    if "input_shape" in summary:
        shape, classes = tuple(summary["input_shape"]), int(summary["num_classes"])
    else:  # an older peer did not publish them: the dataset tells
        from hivecli.registry import load_dataset

        data = load_dataset(recipe.data)
        shape, classes = data.input_shape, data.num_classes
    model, opt = build_model_and_optimizer(recipe, shape, classes)
    a = recipe.averaging
    # each mode shares its state under its own prefix; DiLoCo's is its outer parameters and momentum
    prefix = {"parameters": run_address, "collaborative": Optimizer.state_prefix(run_address)}.get(a.mode)
    shared = opt
    if a.mode == "diloco":
        prefix = DiLoCoOptimizer.state_prefix(run_address)
        shared = DiLoCoOptimizer.outer_state(model.parameters(), a.outer_lr, a.outer_momentum).opt
    averager = TrainingAverager(
        shared,
        dht,
        prefix=prefix,
        target_group_size=recipe.averaging.target_group_size,
        client_mode=True,
        allow_state_sharing=False,
        extra_tensors=list(model.buffers()),
        start=True,
    )
    try:
        with Progress(
            "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            console=_output.stderr, transient=False,
        ) as bar:  # fmt: skip
            task = bar.add_task("downloading state", total=None)
            loaded = None
            while loaded is None and time.monotonic() < deadline:  # donors declare themselves every few s
                loaded = averager.load_state_from_peers(
                    timeout=max(1.0, deadline - time.monotonic()),
                    progress=lambda done, total: bar.update(task, completed=done, total=total),
                )
                if loaded is None:
                    time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    finally:
        averager.shutdown()
    if loaded is not None and shared is not opt:  # DiLoCo: the model is the outer parameters
        with torch.no_grad():
            for param, outer in zip(model.parameters(), parameters_of(shared), strict=True):
                param.copy_(outer)
    if loaded is None:
        raise HiveError(
            f"no peer of run {recipe.run.prefix!r} shared its state within {timeout:g} s; "
            f"is a peer training (hive peers ADDRESS --run {recipe.run.prefix})?"
        )
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": averager.local_step,
        "recipe": recipe.to_dict(),
    }
