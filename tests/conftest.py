"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models: one thread is faster, and fair to a shared 2-core machine (a module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """One thread while a module-scoped fixture builds its runs (request it there)."""
    with _torch_threads(1):
        yield
