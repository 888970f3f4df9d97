"""`hive pull-state ADDRESS -o FILE`: download a run's current model and optimizer state."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from hivecli._exceptions import HiveError
from hivecli.cli import _output
from hivecli.cli.train_cmd import RunFlag, TrustRecipeFlag


def pull_state(
    address: Annotated[str, typer.Argument(help="Multiaddr of any peer of the run.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint file to write.")],
    run: RunFlag = None,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="A local recipe instead of the one the run published.")
    ] = None,
    trust_recipe: TrustRecipeFlag = False,
    timeout: Annotated[float, typer.Option("--timeout", min=1.0, help="Seconds to find a donor and download.")] = 120.0,
) -> None:
    """Download the current model and optimizer state of a run from one of its peers.

    Writes a checkpoint that plain PyTorch reads: ckpt = torch.load(FILE); model.load_state_dict(ckpt["model"]); also "optimizer" (an optimizer state_dict), "step" and "recipe". Exit code 3 if ADDRESS does not answer, 1 if no peer shares its state within --timeout.
    """
    from hivecli.dht.dht import DHT
    from hivecli.recipe import load_recipe
    from hivecli.runs import check_run_prefix, choose_run, fetch_recipe, list_runs, trusted_recipe

    with DHT(initial_peers=[address], client_mode=True, start=True) as dht:
        if recipe is not None:
            loaded = load_recipe(recipe)
            check_run_prefix(run, loaded, recipe)
            prefix = loaded.run.prefix
        else:
            prefix = choose_run(dht, run)
            loaded = trusted_recipe(
                fetch_recipe(dht, prefix), prefix, None, trust_recipe, instead="pass a local --recipe"
            )
        summary = list_runs(dht).get(prefix, {})
        state = _download(dht, loaded, summary, timeout)
    import torch

    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, output)
    size = output.stat().st_size / 2**20
    _output.stderr.print(f"Saved step {state['step']} of run {prefix!r} to {output} ({size:.1f} MiB)")


def _download(dht: Any, recipe: Any, summary: dict[str, Any], timeout: float) -> dict[str, Any]:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from hivecli.optim.training_averager import TrainingAverager
    from hivecli.training import build_model_and_optimizer

    if "input_shape" in summary:
        shape, classes = tuple(summary["input_shape"]), int(summary["num_classes"])
    else:  # an older peer did not publish them: the dataset tells
        from hivecli.registry import load_dataset

        data = load_dataset(recipe.data)
        shape, classes = data.input_shape, data.num_classes
    model, opt = build_model_and_optimizer(recipe, shape, classes)
    averager = TrainingAverager(
        opt,
        dht,
        prefix=recipe.run.prefix,
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
            deadline = time.monotonic() + timeout
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
