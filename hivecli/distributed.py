"""Multi-process peers (`hive start/join --nproc-per-node N`): one peer of a run, made of N processes.

The launcher (the `hive` command the user ran) runs the same command again as N processes through
torchrun's own launcher (`torch.distributed.run`, see `launch`): each process gets torchrun's
RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; Ctrl+C and SIGTERM reach every one of
them; the launcher exits with the peer's exit code. Inside the peer, the processes train one model
with DistributedDataParallel (gloo on the CPU, NCCL on GPUs), each on its own shard of the data.

Rank 0 is the peer as the run sees it: its DHT node, progress reports, checkpoints, metrics.jsonl
and averaging optimizer are those of a single-process peer (hivecli.training.Trainer, given a
`Leader`). The other ranks (`follow`) run no DHT and publish nothing: they train with DDP and take
the parameters an averaging round gave rank 0 through the process group.

Who owns what:

    launch()        the processes, the signals that stop them and the peer's exit code (launcher)
    PeerProcesses   this process's membership: torchrun's store, the process group (every rank)
    Leader          what the other ranks train with (`Setup`) and when they may leave (rank 0)
    Trainer         when to stop, the learning rate of each step, the state's loads (rank 0);
                    the averaging rounds are its optimizer's (`rounds_finished`)
    Replicas        the per-step protocol below, the same on every rank

The protocol: at every step boundary every rank takes part in one all-reduce (MAX) of a control
tensor [stop, learning-rate factor, state version, rounds, step]: rank 0 writes its values, the
other ranks zeros and their own stop request (a signal that reached them). Then, on every rank:

    version changed  (rank 0 loaded a checkpoint or the run's state, or rolled back): rank 0
                     broadcasts its optimizer state, every parameter and every buffer
    rounds changed   (an averaging round was applied on rank 0): every parameter and buffer,
                     and the optimizer statistics that averaging.average_opt_statistics names
    stop             every rank leaves its loop; rank 0 averages once more with the run, and one
                     last boundary hands its final parameters to the others, which then exit
    else             one DDP step, at the learning rate rank 0 sent

After each broadcast every rank appends the digest of its parameters and buffers to
RUN_DIR/ranks/rank-K.jsonl ({"sync", "kind", "round", "step", "digest"}): the same on every rank.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import pickle
import signal
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from hivecli._exceptions import ConfigError, HiveError
from hivecli.recipe import DataSection, Recipe

logger = logging.getLogger(__name__)

# the least time a rank waits in one collective for the others (see group_timeout), and for the store
GROUP_TIMEOUT = datetime.timedelta(minutes=10)
SETUP_KEY = "hivecli/setup"
SETUP_POLL_S = 0.1
SETUP_GRACE_S = 5.0  # a rank > 0 that got a signal before training waits this long for rank 0's word
EXIT_INTERRUPTED = 130
_STOP, _LR, _VERSION, _ROUNDS, _STEP = range(5)


# ---- the launcher ---------------------------------------------------------------------------------


def launch(processes: int, argv: list[str]) -> int:
    """Run `python -m hivecli.cli.main ARGV` as the `processes` processes of one peer, with torchrun's
    launcher on this machine only (rendezvous and process group on 127.0.0.1), and wait for them.

    A SIGINT or SIGTERM to this process is sent on to every process, which stops as a peer does
    (rank 0 saves a checkpoint); processes that have not exited 30 s later are killed.

    Returns:
        the peer's exit code: 0 when every process exited 0; else rank 0's exit code if it failed,
        else the first failed process's (128 + N for a process killed by signal N); 130 after
        SIGINT, 0 after SIGTERM.

    Raises:
        ConfigError: this torch has no torch.distributed.
    """
    if not dist.is_available():
        raise ConfigError(f"--nproc-per-node needs torch.distributed, which torch {torch.__version__} lacks here")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from hivecli.cores import usable_cores

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // processes)))  # the machine's cores, shared
    args = get_args_parser().parse_args(
        [
            "--nnodes=1", f"--nproc-per-node={processes}", "--max-restarts=0", "--monitor-interval=0.1",
            "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", f"--rdzv-id={uuid.uuid4()}",
            "--local-addr=127.0.0.1", f"--log-dir={os.devnull}",
            "-m", "hivecli.cli.main", *argv,
        ]
    )  # fmt: skip
    quiet, handlers = _QuietTorchrun(), _torchrun_handlers()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        run(args)
    except SignalException as e:
        _kill_children()  # only after a second signal: the first one waited for them
        return _signal_exit_code(e.sigval)
    except ChildFailedError as e:
        failure = e.failures.get(0) or e.get_first_failure()[1]
        return failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)
    return 0


_TORCHRUN_LOGGERS = ("torch.distributed.run", "torch.distributed.elastic", "torch.distributed.launch")


class _QuietTorchrun(logging.Filter):
    """torchrun's own log lines ("Sending process 123 closing signal SIGINT", "failed (exitcode: 2)"):
    rank 0 already said what happened, in one line. Shown with --verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        mine = record.name.startswith(_TORCHRUN_LOGGERS)
        return not mine or logging.getLogger().isEnabledFor(logging.DEBUG)


def _torchrun_handlers() -> set[logging.Handler]:
    """The handlers torchrun's log records reach (torch.distributed has one of its own)."""
    handlers: set[logging.Handler] = set()
    for name in _TORCHRUN_LOGGERS:
        node: logging.Logger | None = logging.getLogger(name)
        while node is not None:
            handlers.update(node.handlers)
            node = node.parent if node.propagate else None
    return handlers


def _signal_exit_code(signum: int) -> int:
    if signum == signal.SIGINT:
        return EXIT_INTERRUPTED
    return 0 if signum == signal.SIGTERM else 128 + int(signum)


def _kill_children() -> None:
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            continue


# ---- what each process trains on -----------------------------------------------------------------


def peer_device(recipe: Recipe, processes: int = 1, local_rank: int = 0) -> torch.device:
    """The device process `local_rank` of a peer of `processes` processes trains on: run.device =
    "cpu"; "cuda" (a GPU per process, the local rank's); "auto" (CUDA if this machine has a GPU,
    else the CPU).

    Raises:
        ConfigError: "cuda" without a CUDA device, fewer GPUs than processes, or a multi-process peer
            of an averaging mode other than "parameters".
    """
    mode = recipe.averaging.mode
    if processes > 1 and mode != "parameters":
        raise ConfigError(
            f'--nproc-per-node {processes}: a peer of several processes averages with averaging.mode = "parameters" '
            f'only, and this recipe has mode = "{mode}"; run this peer as one process (no --nproc-per-node)'
        )
    setting = recipe.run.device
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if setting == "cpu" or (setting == "auto" and gpus == 0):
        return torch.device("cpu")
    if gpus == 0:
        raise ConfigError(
            f'run.device = "cuda", but this machine has no CUDA device that torch {torch.__version__} can use; '
            f'set run.device = "cpu" or "auto"'
        )
    if processes > gpus:
        raise ConfigError(
            f'run.device = "{setting}" gives each of the {processes} processes (--nproc-per-node) a GPU of its own, '
            f'and this machine has {gpus}; use --nproc-per-node {gpus}, or set run.device = "cpu"'
        )
    return torch.device("cuda", local_rank)


class ShardSampler:
    """The indices of one rank's shard: every pass draws a permutation of the whole dataset from
    `generator` (seeded alike on every rank: the same permutation everywhere, as a single-process
    peer's shuffle draws it) and takes every `world`-th index from `rank` on, all shards equally long."""

    def __init__(self, size: int, rank: int, world: int, generator: torch.Generator):
        self.size, self.rank, self.world, self.generator = size, rank, world, generator

    def __len__(self) -> int:
        return self.size // self.world

    def __iter__(self) -> Any:
        order = torch.randperm(self.size, generator=self.generator)
        return iter(order[self.rank : len(self) * self.world : self.world].tolist())


def shard_loader(dataset: Dataset[Any], data: DataSection, seed: int, rank: int, world: int) -> DataLoader[Any]:
    """The training batches of rank `rank` of `world`: its shard of `dataset`, shuffled by `seed`."""
    sampler = ShardSampler(len(dataset), rank, world, torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=data.batch_size, sampler=sampler, drop_last=True, num_workers=data.workers)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Setup:
    """What rank 0 tells the other ranks once it is ready to train."""

    recipe: Recipe
    run_dir: str  # the peer's run directory: the ranks' digests go to RUN_DIR/ranks/
    shuffle_seed: int  # the peer's data order (hivecli.training.Trainer's, from its peer id)


def group_timeout(recipe: Recipe) -> datetime.timedelta:
    """How long a rank waits in one collective for the others: longer than rank 0's slowest work
    between two steps (evaluating, a checkpoint, a rollback, the last averaging round)."""
    a = recipe.averaging
    last_round = 2 * (2 * a.min_matchmaking_time + a.request_timeout) + a.allreduce_timeout
    return max(GROUP_TIMEOUT, datetime.timedelta(seconds=2 * last_round))


def rank_log_path(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / "ranks" / f"rank-{rank}.jsonl"


# ---- one process of the peer ---------------------------------------------------------------------


class PeerProcesses:
    """This process's place in its peer: its rank, torchrun's store, and (once started) the
    process group. Create with `from_env()`, in a process that torchrun started; `close()` at the end."""

    def __init__(self, rank: int, local_rank: int, world: int, store: Any, master: str):
        self.rank, self.local_rank, self.world, self.store, self.master = rank, local_rank, world, store, master

    @classmethod
    def from_env(cls) -> PeerProcesses:
        """Raises:
        HiveError: torchrun's variables are missing, or its store does not answer."""
        env = os.environ
        try:
            rank, local_rank, world = int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"])
            master, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
        except (KeyError, ValueError) as e:
            raise HiveError(
                f"this process belongs to a multi-process peer, but torchrun's variable {e} is missing or not a "
                f"number; start the peer with `hive start/join --nproc-per-node N`"
            ) from None
        hosts = rank == 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") != "True"  # else the launcher holds it
        try:
            store = dist.TCPStore(master, port, world, is_master=hosts, timeout=GROUP_TIMEOUT, wait_for_workers=False)
        except RuntimeError as e:
            raise HiveError(f"rank {rank} of this peer cannot reach its launcher at {master}:{port}: {e}") from e
        return cls(rank, local_rank, world, store, master)

    def publish(self, setup: Setup | None) -> None:
        """Rank 0: let the other ranks start training with `setup`; None: there is nothing to train."""
        self.store.set(SETUP_KEY, pickle.dumps(setup))

    def wait_for_setup(self, stop: threading.Event) -> Setup | None:
        """Ranks > 0: rank 0's `Setup`, as long as rank 0 takes (it joins the run, waits for
        run.min_peers); None if there is nothing to train. Once `stop` is set (the launcher stops the
        peer, or rank 0 failed), rank 0 has SETUP_GRACE_S more to say so; then None."""
        deadline = None
        while not self.store.check([SETUP_KEY]):
            if stop.is_set():
                deadline = deadline or time.monotonic() + SETUP_GRACE_S
                if time.monotonic() > deadline:
                    return None
            time.sleep(SETUP_POLL_S)
        return pickle.loads(self.store.get(SETUP_KEY))  # written by rank 0 of this very peer

    def init_group(self, device: torch.device, timeout: datetime.timedelta) -> None:
        """Join the process group: NCCL between GPUs, else gloo, over loopback (one machine); a
        collective that waits longer than `timeout` for another rank fails."""
        if device.type == "cuda":
            torch.cuda.set_device(device)
        elif _is_loopback(self.master) and (interface := _loopback_interface()) is not None:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)  # not the address the hostname resolves to
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            store=dist.PrefixStore("hivecli/group", self.store),
            rank=self.rank,
            world_size=self.world,
            timeout=timeout,
        )

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _loopback_interface() -> str | None:
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address.startswith("127.") for a in addresses):
            return name
    return None


# ---- the per-step protocol ------------------------------------------------------------------------


@dataclass(frozen=True)
class Control:
    """One step boundary's control values, the same on every rank."""

    stop: bool
    lr_factor: float
    version: int
    rounds: int
    step: int


class Replicas:
    """The model's copies on the peer's processes and the protocol that keeps them identical (see
    the module's docstring); the same object on every rank. `ddp` is the model to train with."""

    def __init__(
        self,
        processes: PeerProcesses,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        device: torch.device,
        statistics: Sequence[str],
        log_path: Path,
    ):
        self.rank, self.device, self.model, self.opt = processes.rank, device, model, opt
        self.statistics = tuple(statistics)
        # broadcasts rank 0's parameters and buffers: every rank starts from the same model
        self.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self._anchors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._control = self._anchored(torch.zeros(5, dtype=torch.float64, device=device))
        self.synced = (-1, -1)  # (version, rounds) that every rank holds
        self.syncs = 0
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[str] = open(log_path, "a")  # noqa: SIM115  (closed in close())

    def boundary(self, stop: bool, lr_factor: float = 0.0, version: int = 0, rounds: int = 0, step: int = 0) -> Control:
        """The step boundary: every rank calls it with its values (see the module's docstring).

        Raises:
            HiveError: another rank is gone, or did not come in time (group_timeout).
        """
        mine = torch.tensor([float(stop), lr_factor, version, rounds, step], dtype=torch.float64)
        try:
            self._control.copy_(mine)
            dist.all_reduce(self._control, op=dist.ReduceOp.MAX)
            reduced = self._control.tolist()
            control = Control(reduced[_STOP] > 0, reduced[_LR], *(int(reduced[i]) for i in (_VERSION, _ROUNDS, _STEP)))
            kind = None
            if control.version != self.synced[0]:
                kind = "start" if self.synced[0] < 0 else "state"
            elif control.rounds != self.synced[1]:
                kind = "round"
            if kind is not None:
                self._broadcast_state(full=kind != "round")
        except RuntimeError as e:  # gloo and NCCL errors: a process died, or the group timed out
            raise HiveError(f"the processes of this peer lost each other (rank {self.rank}): {e}") from e
        if kind is not None:
            self.synced = (control.version, control.rounds)
            self._write(kind, control)
        return control

    def _anchored(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor`, which a collective may now use. A gloo thread lets go of a collective's tensors a
        moment after it returned; were its reference the last one besides Python's, it would take the
        GIL to drop the Python object, and the group's destructor (which joins those threads with the
        GIL held) would wait for it forever. A view, kept here, is a lasting reference of its own."""
        kept = self._anchors.get(id(tensor))
        if kept is None or kept[0] is not tensor:
            with torch.no_grad():
                self._anchors[id(tensor)] = (tensor, tensor.view(tensor.shape))
        return tensor

    def _broadcast_state(self, full: bool) -> None:
        live = {id(t) for t in [self._control, *self.model.parameters(), *self.model.buffers()]}
        self._anchors = {key: kept for key, kept in self._anchors.items() if key in live}  # the last sync's others go
        if full:  # rank 0's optimizer state (momentum, ...): loaded from a checkpoint or a peer
            state = self._broadcast_object(_to_cpu(self.opt.state_dict()) if self.rank == 0 else None)
            if self.rank != 0:
                self.opt.load_state_dict(state)
        statistics = [
            slot[name]
            for p in self.model.parameters()
            for name in self.statistics
            if isinstance(slot := self.opt.state.get(p, {}), dict) and isinstance(slot.get(name), torch.Tensor)
        ]
        with torch.no_grad():  # in place, into the live tensors
            for tensor in [*self.model.parameters(), *self.model.buffers(), *statistics]:
                dist.broadcast(self._anchored(tensor), src=0)

    def _broadcast_object(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (pickled: this peer's own processes only)."""
        data = pickle.dumps(value) if self.rank == 0 else b""
        size = self._anchored(torch.tensor([len(data)], dtype=torch.int64, device=self.device))
        dist.broadcast(size, src=0)
        if self.rank == 0:
            payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        else:
            payload = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        dist.broadcast(self._anchored(payload), src=0)
        return pickle.loads(payload.cpu().numpy().tobytes()) if self.rank != 0 else value

    def _write(self, kind: str, control: Control) -> None:
        row = {"time": round(time.time(), 3), "sync": self.syncs, "kind": kind, "round": control.rounds,
               "step": control.step, "digest": parameters_digest(self.model)}  # fmt: skip
        self._log.write(json.dumps(row) + "\n")
        self._log.flush()
        self.syncs += 1

    def close(self) -> None:
        self._log.close()


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def parameters_digest(model: torch.nn.Module) -> str:
    """sha256 of the bytes of every parameter and buffer of `model`, in order."""
    digest = hashlib.sha256()
    for tensor in [*model.parameters(), *model.buffers()]:
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---- rank 0 -------------------------------------------------------------------------------------------


class Leader:
    """Rank 0's side of the peer's processes, driven by the Trainer: `start` once it is ready to
    train, `boundary` before every step, `finish` after the last averaging round. The CLI creates it
    before anything else and calls `close()` whatever happens: the other ranks are then released."""

    def __init__(self, processes: PeerProcesses):
        self.processes = processes
        self.world, self.local_rank = processes.world, processes.local_rank
        self.replicas: Replicas | None = None
        self._published = self._stopped = self._finished = False
        self._last = (0, 0, 0)  # the (version, rounds, step) last sent

    def start(
        self, setup: Setup, model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device
    ) -> torch.nn.Module:
        """Let the other ranks start (they build the model and data from `setup`), join the process
        group with them and return the model to train with (DDP around `model`)."""
        self.processes.publish(setup)
        self._published = True
        self.processes.init_group(device, group_timeout(setup.recipe))
        statistics = setup.recipe.averaging.average_opt_statistics
        self.replicas = Replicas(self.processes, model, opt, device, statistics, rank_log_path(setup.run_dir, 0))
        return self.replicas.ddp

    def boundary(self, stop: bool, lr_factor: float, *, version: int, rounds: int, step: int) -> bool:
        """The step boundary (the module's docstring): `stop` if this step is not to be taken,
        `version` the count of the state's loads, `rounds` of the averaging rounds applied. True if
        the peer stops here: `stop`, or another rank was asked to (a signal reached it)."""
        if self.replicas is None:  # not started: stopped before training
            return stop
        self._last = (version, rounds, step)
        self._stopped = self.replicas.boundary(stop, lr_factor, version, rounds, step).stop
        return self._stopped

    def finish(self, *, version: int, rounds: int, step: int) -> None:
        """The last boundary: the other ranks take rank 0's final parameters, and exit."""
        if self.replicas is None or self._finished:
            return
        if not self._stopped:
            self.boundary(True, 0.0, version=version, rounds=rounds, step=step)
        self._finished = True  # whatever happens next, never twice
        self.replicas.boundary(True, 0.0, version, rounds, step)

    def close(self) -> None:
        """Release the other ranks (nothing to train; or training ended by an error on rank 0) and
        leave the process group. Never raises: the ranks that cannot be told are stopped by the
        launcher once this process exits."""
        try:
            if not self._published:
                self.processes.publish(None)
            elif self.replicas is not None and not self._finished:
                version, rounds, step = self._last
                self.finish(version=version, rounds=rounds, step=step)
        except Exception as e:
            logger.warning("Could not tell the other processes of this peer to stop: %s", e)
        finally:
            if self.replicas is not None:
                self.replicas.close()
            self.processes.close()


# ---- ranks > 0 ---------------------------------------------------------------------------------------


def follow(processes: PeerProcesses, stop: threading.Event) -> int:
    """The life of a rank > 0: wait for rank 0's `Setup`, build the same model and optimizer, and train
    its shard with DDP, step for step with rank 0, until rank 0 says stop. `stop` (a signal that
    reached this process) asks the whole peer to stop at the next step. Returns the exit code.

    Raises:
        HiveError: rank 0 is gone (its own exit code tells why), or the processes lost each other.
        ConfigError: the recipe's device does not fit this process.
    """
    from hivecli.registry import load_dataset
    from hivecli.training import build_model_and_optimizer

    replicas = None
    try:
        setup = processes.wait_for_setup(stop)
        if setup is None:
            return 0  # rank 0 ended before training (stopped, or failed and says why)
        recipe = setup.recipe
        device = peer_device(recipe, processes.world, processes.local_rank)
        data = load_dataset(recipe.data)
        model, opt = build_model_and_optimizer(recipe, data.input_shape, data.num_classes)
        model.to(device)
        loader = shard_loader(data.train, recipe.data, setup.shuffle_seed, processes.rank, processes.world)
        processes.init_group(device, group_timeout(recipe))
        replicas = Replicas(
            processes, model, opt, device, recipe.averaging.average_opt_statistics,
            rank_log_path(setup.run_dir, processes.rank),
        )  # fmt: skip
        base_lrs = [group["lr"] for group in opt.param_groups]
        clip = recipe.optimizer.clip_grad_norm
        model.train()
        stopping = False
        while not stopping:
            for x, y in loader:  # as many batches per pass as rank 0's: one boundary each
                control = replicas.boundary(stop.is_set())
                if control.stop:
                    stopping = True
                    break
                for group, base in zip(opt.param_groups, base_lrs, strict=True):
                    group["lr"] = base * control.lr_factor
                opt.zero_grad()
                loss = F.cross_entropy(replicas.ddp(x.to(device)), y.to(device))
                loss.backward()  # DDP: the gradients of all ranks, averaged
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
        replicas.boundary(False)  # the last one: rank 0's final parameters
        return 0
    finally:
        if replicas is not None:
            replicas.close()
        processes.close()
