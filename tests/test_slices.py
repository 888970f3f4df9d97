"""SliceWorkers: a round's big copies and reductions split across a few threads."""

from __future__ import annotations

import threading

import pytest
import torch

from hivecli.averaging.slices import MIN_SPLIT_ELEMENTS, SliceWorkers, threads_for


def test_one_thread_per_four_cores_of_the_peer_at_most_four():
    assert [threads_for(n) for n in (1, 2, 4, 7, 8, 12, 15, 16, 64)] == [1, 1, 1, 1, 2, 3, 3, 4, 4]


def test_the_slices_cover_every_element_once_across_the_threads():
    workers = SliceWorkers()
    workers.resize(3)
    try:
        numel = 2 * MIN_SPLIT_ELEMENTS + 12_345  # not a multiple of anything
        target, source = torch.zeros(numel), torch.randn(numel)
        seen: list[tuple[str, int]] = []
        lock = threading.Lock()

        def add(t: torch.Tensor, s: torch.Tensor) -> None:
            with lock:
                seen.append((threading.current_thread().name, t.numel()))
            t.add_(s)

        workers.apply(add, target, source)
        workers.apply(add, target, source)
        assert torch.equal(target, 2 * source)  # each element exactly twice: no gap, no overlap
        assert sum(n for _, n in seen) == 2 * numel
        assert len(seen) == 6 and sum(name.startswith("hive-slices") for name, _ in seen) == 4
        workers.copy(target, source)
        assert torch.equal(target, source)
    finally:
        workers.close()


def test_small_ops_run_whole_on_the_caller_and_one_thread_starts_none():
    workers = SliceWorkers()
    names: list[str] = []
    big = torch.zeros(MIN_SPLIT_ELEMENTS)
    workers.apply(lambda t: names.append(threading.current_thread().name), big)  # count 1: no threads
    workers.resize(4)
    try:
        workers.apply(lambda t: names.append(threading.current_thread().name), torch.zeros(1000))
    finally:
        workers.close()
    assert names == [threading.current_thread().name] * 2


def test_only_1d_tensors_of_one_length_are_split():
    workers = SliceWorkers()
    with pytest.raises(ValueError, match="1-D tensors of one length"):
        workers.apply(lambda a, b: a.copy_(b), torch.zeros(10), torch.zeros(11))
    with pytest.raises(ValueError, match="1-D tensors of one length"):
        workers.copy(torch.zeros(2, 5), torch.zeros(2, 5))


def test_an_error_in_a_slice_is_raised_once_every_slice_is_done_and_close_stops_the_threads():
    workers = SliceWorkers()
    workers.resize(2)
    done: list[int] = []

    def op(t: torch.Tensor) -> None:
        if threading.current_thread().name.startswith("hive-slices"):
            raise ValueError("a bad slice")
        done.append(t.numel())

    with pytest.raises(ValueError, match="a bad slice"):
        workers.apply(op, torch.zeros(2 * MIN_SPLIT_ELEMENTS))
    assert done == [MIN_SPLIT_ELEMENTS]  # the caller's half ran
    workers.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("hive-slices")]
    assert workers.count == 1
