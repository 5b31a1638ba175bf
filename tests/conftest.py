"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (pyproject's addopts) each worker takes its share of the cores,
    for torch and for the processes it starts: torch's default of a thread per core in
    every worker would oversubscribe them, and a torch process sharing its core with
    another slows tenfold or more. A single process keeps torch's default."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = max(1, len(os.sched_getaffinity(0)) // workers)
        torch.set_num_threads(share)
        os.environ.setdefault("OMP_NUM_THREADS", str(share))


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


@pytest.fixture
def fsdd_archive() -> Path:
    """The shared FSDD archive (``$VQKIT_SHARED_DATA/fsdd-8k.tar.gz``, else
    ``../shared/data`` beside the checkout or /work/shared/data); the test is skipped
    when it is absent (users' machines)."""
    base = os.environ.get("VQKIT_SHARED_DATA")
    root = Path(__file__).resolve().parent.parent
    folders = [Path(base)] if base else [root.parent / "shared" / "data", Path("/work/shared/data")]
    for folder in folders:
        if (folder / "fsdd-8k.tar.gz").is_file():
            return folder / "fsdd-8k.tar.gz"
    pytest.skip("fsdd-8k.tar.gz not found (set VQKIT_SHARED_DATA to the shared data folder)")
