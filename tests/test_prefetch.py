"""Tests of vqkit's prefetch module: the same batches, one drawn ahead in a thread."""

from __future__ import annotations

import threading

import pytest
import torch

from vqkit.data import BatchLoader
from vqkit.runtime.prefetch import Prefetcher


def _loader(seed: int = 0) -> BatchLoader:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (50, 1, 4, 4), dtype=torch.uint8, generator=g)
    return BatchLoader(images, 8, seed=seed)  # 6 batches per epoch


def test_same_batches_and_states_as_the_loader():
    plain, ahead = _loader(), Prefetcher(_loader())
    for _ in range(14):  # crosses two epochs
        x, y = plain.next_batch()
        xp, yp = ahead.next_batch()
        assert torch.equal(x, xp) and torch.equal(y, yp)
        # the state after the batch returned, not after the one drawn ahead
        assert ahead.state_dict() == plain.state_dict()
        assert ahead.epoch == plain.epoch
    ahead.close()


def test_resume_from_a_state_continues_exactly():
    ref = _loader()
    batches = [ref.next_batch()[0] for _ in range(10)]
    a = Prefetcher(_loader())
    for _ in range(4):
        a.next_batch()
    state = a.state_dict()
    b = Prefetcher(_loader(seed=99))  # the seed comes from the state
    b.next_batch()  # a batch in flight is discarded by load_state_dict
    b.load_state_dict(state)
    for i in range(4, 10):
        assert torch.equal(b.next_batch()[0], batches[i])
    a.close()
    b.close()


def test_a_failed_draw_is_raised_and_redrawn():
    loader = _loader()
    real, calls = loader.next_batch, []

    def flaky():
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk hiccup")
        return real()

    loader.next_batch = flaky  # type: ignore[method-assign]
    ahead = Prefetcher(loader)
    first = ahead.next_batch()[0]
    with pytest.raises(OSError, match="hiccup"):
        ahead.next_batch()
    second = ahead.next_batch()[0]  # the loader was rewound: the batch after `first`
    ref = _loader()
    assert torch.equal(first, ref.next_batch()[0]) and torch.equal(second, ref.next_batch()[0])
    ahead.close()


def test_draws_run_outside_the_calling_thread():
    loader = _loader()
    real, threads = loader.next_batch, []

    def spy():
        threads.append(threading.current_thread())
        return real()

    loader.next_batch = spy  # type: ignore[method-assign]
    ahead = Prefetcher(loader)
    ahead.next_batch()
    ahead.close()
    assert threads and all(t is not threading.current_thread() for t in threads)
    assert len(threads) == 2  # the one returned and the one drawn ahead (then discarded)
    assert ahead.state_dict() == loader.state_dict()  # close() rewound the loader
