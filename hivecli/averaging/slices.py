"""Big memory-bound ops of the all-reduce (reductions and copies) split across a few threads,
where a peer has cores to spare.

Why: a round's reductions and copies run on the DHT's thread, one pass over the tensors each
(the reducer's copy of its input for audits, its running mean, the sender's copy of the averages
into its tensors). On one thread they were a fifth to a third of a 50M fp32 round on 16 cores:
memory bandwidth grows with the threads that pull on it.

Why not OpenMP's threads (torch.set_num_threads, or more than the one thread that
hivecli.cores.single_threaded_here leaves each data-plane thread): its idle threads busy-wait
after every op. Four OpenMP threads per data-plane thread made 2 x 50M fp32 on 16 cores 1.3x
faster in processes whose main thread had run a parallel op first (libgomp then throttles the
spinning), but 4 x 10M 2.6x slower in processes where the averager was the first to use OpenMP,
as in a process that trains on a GPU (412 against 83 ms of CPU per peer). These workers wait on
a queue instead, and run each slice on one OpenMP thread.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from hivecli.cores import single_threaded_here

# Below this many elements an op runs whole on the caller: handing slices to threads costs tens
# of microseconds, about what one thread takes for a quarter of a million floats.
MIN_SPLIT_ELEMENTS = 1 << 20
ALIGN_ELEMENTS = 4096  # slice boundaries: whole cache lines and pages of fp32


# Threads for a peer with `cores` cores to itself (hivecli.cores.cores_per_peer): one per
# CORES_PER_THREAD, at most MAX_THREADS. With fewer cores they only take them from the other
# peers and the training loop: 2 cores are the usual volunteer's machine, 4 of them with 4 peers
# were already slower on bulk links' worker threads (link.AUTO_BULK_MIN_CORES).
CORES_PER_THREAD = 4
MAX_THREADS = 4


def threads_for(cores: int) -> int:
    """Threads (the caller's included) for the split ops of a peer with `cores` cores: 1 up to 7
    cores, 2 from 8, 3 from 12, 4 from 16."""
    return max(1, min(MAX_THREADS, cores // CORES_PER_THREAD))


class SliceWorkers:
    """Runs elementwise ops over 1-D tensors in `count` slices at once: one on the calling thread,
    the others on worker threads of its own. With a count of 1 (the default) it starts no thread."""

    def __init__(self) -> None:
        self.count = 1
        self._pool: ThreadPoolExecutor | None = None

    def resize(self, count: int) -> None:
        """Use `count` threads (the caller's included) from the next op on."""
        count = max(1, count)
        if count == self.count:
            return
        self.close()
        self.count = count
        if count > 1:
            self._pool = ThreadPoolExecutor(count - 1, "hive-slices", initializer=single_threaded_here)

    def apply(self, op: Callable[..., object], *tensors: torch.Tensor) -> None:
        """`op(*slices)` over matching slices of `tensors` (1-D, of one length) that together
        cover them; blocks until every slice is done. `op` must touch only its slices.

        Raises:
            ValueError: the tensors are not 1-D, or not of one length.
            Whatever `op` raised, once every slice has finished.
        """
        numel = tensors[0].numel()
        if any(t.dim() != 1 or t.numel() != numel for t in tensors):
            shapes = [tuple(t.shape) for t in tensors]
            raise ValueError(f"split ops take 1-D tensors of one length, got shapes {shapes}")
        pool = self._pool
        if pool is None or numel < MIN_SPLIT_ELEMENTS:
            op(*tensors)
            return
        step = -(-numel // self.count // ALIGN_ELEMENTS) * ALIGN_ELEMENTS
        bounds = [(start, min(start + step, numel)) for start in range(0, numel, step)]
        futures: list[Future[object]] = [pool.submit(op, *(t[lo:hi] for t in tensors)) for lo, hi in bounds[1:]]
        try:
            lo, hi = bounds[0]
            op(*(t[lo:hi] for t in tensors))
        finally:
            errors = [f.exception() for f in futures]  # waits for each: no slice outlives this call
        for error in errors:
            if error is not None:
                raise error

    def copy(self, destination: torch.Tensor, source: torch.Tensor) -> None:
        """destination.copy_(source), split."""
        self.apply(lambda d, s: d.copy_(s), destination, source)

    def close(self) -> None:
        """Stop the worker threads (after the ops they run); later ops run on the caller."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.count = 1
