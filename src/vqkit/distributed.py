"""Small helpers around ``torch.distributed`` for the trainer and the codebook code.

Everything is asked at call time (nothing is cached at import), so a module built
before ``init_process_group`` still syncs once training starts. Without an
initialised process group every helper behaves as a single process of rank 0.

Launch: ``torchrun --nproc_per_node=N -m vqkit train ...`` (or
``python -m torch.distributed.run ...``) sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; :func:`init_from_env` reads them (``env://``).
"""

from __future__ import annotations

import gc
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import UserError

__all__ = [
    "all_gather_rows",
    "all_reduce_sum",
    "barrier",
    "broadcast_",
    "env_world_size",
    "gather_objects",
    "init_from_env",
    "is_distributed",
    "is_main",
    "launch_rank",
    "local_rank",
    "rank",
    "rank_device",
    "resolve_device",
    "step_figures",
    "teardown",
    "world_size",
]


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """True when torch.distributed is initialised now with more than one rank."""
    return world_size(group) > 1


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Size of ``group`` if torch.distributed is initialised now, else 1."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (0 without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def local_rank() -> int:
    """LOCAL_RANK from the environment (the GPU index on this node), 0 if unset."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 of the world (the process that writes files and shows progress)."""
    return rank() == 0


def init_from_env(device: torch.device, timeout_s: float = 1800.0) -> bool:
    """Initialise the default process group from torchrun's environment when
    WORLD_SIZE > 1: NCCL for CUDA devices, gloo otherwise. Returns True when a group
    was created here (the caller then owns :func:`teardown`)."""
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    # DistributedDataParallel imports torch's compiler stack (torch._dynamo) on first use;
    # imported while a process group exists, it keeps hidden references to the group
    # (measured: 10), so destroy_process_group could never free it nor join its worker
    # threads (see teardown). Importing it first (list_backends: public, no side effect)
    # leaves the group to the ones who hold it.
    torch.compiler.list_backends()
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return True


def teardown() -> None:
    """Destroy the default process group if one is initialised, and with it its worker
    threads (joined here, while the interpreter runs).

    The caller must have dropped whatever else holds the group (a
    DistributedDataParallel wrapper's reducer): the group then dies here with its last
    reference. A group kept alive past this point keeps gloo's worker threads alive; one
    of them destroys the work of the last collective (tensors whose Python objects need
    the GIL) whenever the scheduler lets it, and if the interpreter is finalising by
    then, taking the GIL ends that thread inside C++: the process aborts with
    "terminate called without an active exception" after its work is done."""
    if dist.is_available() and dist.is_initialized():
        # wrappers the caller dropped but a reference cycle still holds: freed now, while
        # the group's registry holds it, so that it is not their reducer (destroyed with
        # the GIL held) that lets go of it last and joins the threads
        gc.collect()
        dist.destroy_process_group()


def _src(group: dist.ProcessGroup | None) -> int:
    """Global rank of the group's rank 0."""
    return 0 if group is None else dist.get_global_rank(group, 0)


def broadcast_(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """In place: every rank gets the group's rank-0 value. A no-op in one process."""
    if world_size(group) > 1:
        dist.broadcast(tensor, src=_src(group), group=group)
    return tensor


def all_gather_rows(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` (N_r, ...) along dim 0, in rank order, on all ranks.

    The N_r may differ (0 included): sizes are exchanged first, then the rows are
    gathered padded to the largest. Two collectives, called unconditionally.
    """
    ws = world_size(group)
    if ws == 1:
        return x
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes_t = [torch.zeros_like(n) for _ in range(ws)]
    dist.all_gather(sizes_t, n, group=group)
    sizes = [int(s) for s in sizes_t]
    m = max(1, max(sizes))
    padded = x.new_zeros((m, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(ws)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])


def all_reduce_sum(
    tensors: list[torch.Tensor], group: dist.ProcessGroup | None = None
) -> list[torch.Tensor]:
    """Sum each tensor over all ranks with ONE collective (flattened and fused).

    Every rank must call this the same number of times with the same shapes;
    a no-op without an initialised process group.
    """
    if world_size(group) == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def step_figures(
    values: dict[str, float],
    stop: bool,
    device: torch.device,
    counts: torch.Tensor | None = None,
    *,
    save: bool = False,
) -> tuple[dict[str, float], torch.Tensor | None, bool, bool]:
    """The figures of one training step over the global batch, by ONE all-reduce in
    float64: each value averaged over the ranks, ``counts`` (per-code assignment
    counts, any shape) summed, whether ANY rank was asked to stop and whether any rank
    asks for a checkpoint (``save``: rank 0's clock). In one process the inputs come
    back unchanged."""
    if world_size() == 1:
        return values, counts, stop, save
    keys = list(values)
    flags = [float(stop), float(save)]
    parts = [torch.tensor([values[k] for k in keys] + flags, dtype=torch.float64)]
    if counts is not None:
        parts.append(counts.detach().reshape(-1).cpu().to(torch.float64))
    buf = all_reduce_sum([torch.cat(parts).to(device)])[0].cpu()
    world = world_size()
    out = {k: float(buf[i]) / world for i, k in enumerate(keys)}
    n = len(keys)
    summed = None
    if counts is not None:
        summed = buf[n + 2 :].round().to(torch.int64).reshape(counts.shape)
    return out, summed, bool(buf[n] > 0), bool(buf[n + 1] > 0)


def gather_objects(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in one process): a collective,
    every rank must call it."""
    if world_size(group) == 1:
        return [obj]
    out: list[Any] = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait for every rank of ``group`` (no-op in one process)."""
    if world_size(group) > 1:
        dist.barrier(group)


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` in DistributedDataParallel on ``device`` (one GPU per process, or CPU).

    ``forward_sync_buffers=False``: DDP would otherwise copy rank 0's buffers to every
    rank before each forward. vqkit's buffers (EMA codebooks, usage statistics,
    BatchNorm run per rank as in taming) are either identical on every rank already,
    being computed from statistics all-reduced inside the modules, or per rank by
    design; the copy would only cost a collective per step. (At construction DDP syncs
    parameters and buffers from rank 0 once.) The older spelling,
    ``broadcast_buffers=False``, is deprecated."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        forward_sync_buffers=False,
    )


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; any other name is checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}")
    return dev


def launch_rank() -> int:
    """This process's rank: the process group's, else torchrun's RANK (0 when alone);
    usable before the group exists (a run directory is locked by rank 0 first)."""
    return rank() if is_distributed() else int(os.environ.get("RANK", 0))


def rank_device(name: str) -> torch.device:
    """:func:`resolve_device`, and under torchrun one GPU per process (by LOCAL_RANK)."""
    dev = resolve_device(name)
    if env_world_size() > 1 and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank())
    return dev
