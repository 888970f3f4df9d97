"""The training loop behind `hive start` and `hive join`: a recipe in, a run directory out.

`Trainer` builds the dataset, model and optimizers a recipe names, wraps the optimizer in a
`DecentralizedOptimizer`, and trains until a limit or a stop request. It reports through a
callback (`on_event(name, fields)`): the CLI turns events into a live display or JSON lines.
It also writes the run directory:

    DIR/PREFIX/PEER/recipe.toml        the resolved recipe
    DIR/PREFIX/PEER/metrics.jsonl      one row per report: step, loss, samples/s, peers, rounds, accuracy
    DIR/PREFIX/PEER/checkpoints/       step-N.pt and latest.pt: {"model", "optimizer", "step", "recipe"}

and publishes its progress in the DHT under `{prefix}.progress` (what `hive peers --run` shows).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hivecli._exceptions import ConfigError, HiveError
from hivecli.dht.dht import DHT
from hivecli.optim import DecentralizedOptimizer
from hivecli.recipe import Recipe
from hivecli.registry import build_model, load_dataset
from hivecli.runs import count_peers, publish_progress, publish_run
from hivecli.utils.timing import get_dht_time

logger = logging.getLogger(__name__)
EventCallback = Callable[[str, dict[str, Any]], None]
KEEP_CHECKPOINTS = 3
RECIPE_REPUBLISH_S = 120.0


def build_optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = recipe.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


def build_model_and_optimizer(recipe: Recipe, input_shape: tuple[int, ...], num_classes: int) -> tuple[Any, Any]:
    torch.manual_seed(recipe.run.seed)  # every peer starts from the same model
    model = build_model(recipe.model, input_shape, num_classes)
    return model, build_optimizer(recipe, model)


def averager_kwargs(recipe: Recipe) -> dict[str, Any]:
    a = recipe.averaging
    return {
        "prefix": recipe.run.prefix,
        "target_group_size": a.target_group_size,
        "min_group_size": a.min_group_size,
        "average_parameters": a.average_parameters,
        "average_gradients": a.average_gradients,
        "average_opt_statistics": tuple(a.average_opt_statistics),
        "averaging_steps_period": a.every_steps,
        "averaging_time_period": a.every_seconds,
        "compression": a.compression,
        "min_matchmaking_time": a.min_matchmaking_time,
        "request_timeout": a.request_timeout,
        "allreduce_timeout": a.allreduce_timeout,
        "timeout": a.round_timeout,
    }


class Trainer:
    """Trains one peer of a run. Create it after the DHT is up; call `run()`; then `close()`.

    Raises (from the constructor):
        ConfigError: the recipe's model, dataset or optimizer settings do not fit together.
    """

    def __init__(self, recipe: Recipe, dht: DHT, run_dir: Path, on_event: EventCallback, joining: bool = False):
        self.recipe, self.dht, self.run_dir, self.on_event = recipe, dht, run_dir, on_event
        data = load_dataset(recipe.data)
        self.data = data
        self.model, base_opt = build_model_and_optimizer(recipe, data.input_shape, data.num_classes)
        # each peer its own order of the data: same model seed, different batches
        shuffle = torch.Generator().manual_seed(
            int.from_bytes(hashlib.sha256(dht.peer_id.to_bytes()).digest()[:8], "big")
        )
        self.loader = DataLoader(
            data.train,
            batch_size=recipe.data.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=recipe.data.workers,
            generator=shuffle,
        )
        self.test_loader = (
            DataLoader(data.test, batch_size=512, num_workers=recipe.data.workers) if data.test is not None else None
        )
        if len(self.loader) == 0:
            raise ConfigError(
                f"data.batch_size = {recipe.data.batch_size} is larger than the {len(data.train)} training samples "
                f"of dataset {recipe.data.name!r}; lower data.batch_size"
            )
        # a joiner shares its state only once it has the run's: before, it would hand out a fresh model
        self.opt = DecentralizedOptimizer(
            base_opt,
            dht,
            allow_state_sharing=not joining,
            extra_tensors=list(self.model.buffers()),  # BatchNorm statistics travel with the state
            **averager_kwargs(recipe),
        )
        self.steps_per_epoch = len(self.loader)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.toml").write_text(recipe.to_toml())
        self._metrics = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115  (closed in close())
        self.last_accuracy: float | None = None
        self.loss_ema: float | None = None
        self.samples_per_s = 0.0
        self.peers = 1
        self._published = -math.inf
        self._checkpointed = -1  # the step of the last checkpoint written

    def publish(self) -> None:
        """Announce the run, its recipe and the model's shapes in the DHT (repeated while training).

        Raises:
            HiveError: the DHT could not store them.
        """
        self._published = time.monotonic()
        publish_run(self.dht, self.recipe.to_dict(), self.data.input_shape, self.data.num_classes)

    @property
    def step(self) -> int:
        return self.opt.local_step

    def load_state_from_peers(self, stop: threading.Event, timeout: float = 30.0) -> bool:
        """Start from the run's current parameters, optimizer state and step. False if no peer
        shared its state within `timeout`, or `stop` was set (the caller warns: it starts from
        the recipe's seed)."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and not stop.is_set():
                try:
                    loaded = self.opt.averager.load_state_from_peers(timeout=max(1.0, deadline - time.monotonic()))
                except HiveError as e:
                    logger.warning("Could not load the run's state: %s; retrying", e)
                    loaded = None
                if loaded is not None:
                    self.on_event("state_loaded", {"step": self.step})
                    return True
                stop.wait(1.0)
            return False
        finally:
            self.opt.averager.allow_state_sharing = True

    # ---- the loop -----------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> str:
        """Train until a limit is reached or `stop` is set; returns why it stopped."""
        limits, output = self.recipe.limits, self.recipe.output
        started = time.monotonic()
        max_steps = limits.max_steps or math.inf
        if limits.max_epochs is not None:
            max_steps = min(max_steps, math.ceil(limits.max_epochs * self.steps_per_epoch))
        next_report = started + output.report_every_seconds
        window_samples, window_start = 0, time.monotonic()
        reason = ""
        self.model.train()
        while not reason:
            for x, y in self.loader:
                if stop.is_set():
                    reason = "stopped"
                elif self.step >= max_steps:
                    reason = "max_steps" if limits.max_steps and self.step >= limits.max_steps else "max_epochs"
                elif limits.max_seconds is not None and time.monotonic() - started >= limits.max_seconds:
                    reason = "max_seconds"
                if reason:
                    break
                self._train_step(x, y)
                window_samples += len(y)
                if self.step % output.eval_every_steps == 0:
                    self.evaluate()
                if self.step % output.checkpoint_every_steps == 0:
                    self.save_checkpoint()
                now = time.monotonic()
                if now >= next_report:
                    self.samples_per_s = window_samples / (now - window_start)
                    window_samples, window_start = 0, now
                    next_report = now + output.report_every_seconds
                    self._report()
        averaged_at_end = reason != "stopped" and self._finish_last_round()  # on Ctrl+C: no waiting
        if averaged_at_end or self.step % output.eval_every_steps != 0 or self.last_accuracy is None:
            self.evaluate()  # the model the peer leaves with
        if window_samples:
            self.samples_per_s = window_samples / max(1e-9, time.monotonic() - window_start)
        self._report()
        path = self.save_checkpoint() if self._checkpointed != self.step else self._checkpoint_path()
        self.on_event(
            "finished",
            {"reason": reason, "step": self.step, "accuracy": self.last_accuracy, "checkpoint": str(path),
             "rounds": self.opt.rounds_finished},
        )  # fmt: skip
        return reason

    def _finish_last_round(self) -> bool:
        """Average once more with the peers that finish at about the same time, so that they
        leave with the same averaged model; alone, this costs one matchmaking wait. True if
        the parameters changed."""
        a = self.recipe.averaging
        try:
            if self.opt.average_now(timeout=2 * a.min_matchmaking_time + a.request_timeout):
                return True
            logger.info("No peer to average with at the end; keeping local parameters")
        except TimeoutError:
            logger.info("The last averaging round did not finish in time; keeping local parameters")
        return False

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        value = loss.item()
        self.loss_ema = value if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * value
        return value

    def evaluate(self) -> float | None:
        if self.test_loader is None:
            return None
        self.model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in self.test_loader:
                correct += (self.model(x).argmax(1) == y).sum().item()
                total += len(y)
        self.model.train()
        self.last_accuracy = correct / max(1, total)
        self.on_event("eval", {"step": self.step, "accuracy": round(self.last_accuracy, 4)})
        self._write_metrics({"accuracy": self.last_accuracy})
        return self.last_accuracy

    def _report(self) -> None:
        try:
            if time.monotonic() - self._published > RECIPE_REPUBLISH_S:
                self.publish()
            publish_progress(
                self.dht,
                self.recipe.run.prefix,
                self.progress(),
                ttl=max(30.0, 5 * self.recipe.output.report_every_seconds),
            )
            self.peers = count_peers(self.dht, self.recipe.run.prefix)
        except HiveError as e:
            logger.debug("Could not report progress to the DHT: %s", e)
        fields = {
            "step": self.step,
            "loss": None if self.loss_ema is None else round(self.loss_ema, 4),
            "samples_per_s": round(self.samples_per_s, 1),
            "peers": self.peers,
            "rounds": self.opt.rounds_finished,
            "last_group_size": self.opt.last_group_size,
        }
        self.on_event("progress", fields)
        self._write_metrics(fields)

    def progress(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "loss": None if self.loss_ema is None else round(self.loss_ema, 4),
            "samples_per_s": round(self.samples_per_s, 1),
            "accuracy": self.last_accuracy,
            "maddrs": [str(m) for m in self.dht.get_visible_maddrs()],
            "time": get_dht_time(),
        }

    def _write_metrics(self, fields: dict[str, Any]) -> None:
        self._metrics.write(json.dumps({"time": round(time.time(), 3), "step": self.step, **fields}) + "\n")
        self._metrics.flush()

    # ---- checkpoints --------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step-N.pt and latest.pt; plain `torch.load(path)["model"]` reads them."""
        folder = self.run_dir / "checkpoints"
        with self.opt.lock_parameters:
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "step": self.step,
                "recipe": self.recipe.to_dict(),
            }
            path = self._checkpoint_path()
            torch.save(state, path)
        temporary = folder / "latest.pt.tmp"
        shutil.copyfile(path, temporary)  # the bytes just written, not a second serialization
        temporary.replace(folder / "latest.pt")  # readers never see half a file
        for old in sorted(folder.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))[:-KEEP_CHECKPOINTS]:
            old.unlink()
        self._checkpointed = self.step
        self.on_event("checkpoint", {"step": self.step, "path": str(path)})
        return path

    def _checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / f"step-{self.step}.pt"

    def close(self) -> None:
        self.opt.shutdown()
        self._metrics.close()
