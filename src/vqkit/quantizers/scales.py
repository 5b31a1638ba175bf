"""The scales of a multi-scale quantizer (:mod:`vqkit.quantizers.multiscale`): the
``--scales`` list, which of VAR's phi convolutions each scale uses, and how revived
codes are shared among the scales."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import UserError

__all__ = ["parse_scales", "phi_assignment", "revival_quota"]


def parse_scales(scales: str | Sequence[int]) -> list[int]:
    """``"1,2,3,4,5,6,8"`` or ``[1, 2, ...]`` -> the list of sides; UserError (one
    line) unless it is a non-empty, strictly increasing list of positive ints."""
    if isinstance(scales, str):
        try:
            parsed = [int(v) for v in scales.replace(" ", "").split(",") if v]
        except ValueError:
            raise UserError(f"scales must be comma-separated ints; got {scales!r}") from None
    else:
        parsed = list(scales)
    ok = bool(parsed) and all(isinstance(v, int) and not isinstance(v, bool) for v in parsed)
    if not ok or parsed[0] < 1 or any(b <= a for a, b in zip(parsed[:-1], parsed[1:], strict=True)):
        raise UserError(
            f"scales must be strictly increasing positive ints, e.g. 1,2,3,4,5,6,8; got {scales!r}"
        )
    return parsed


def phi_assignment(num_scales: int, num_convs: int) -> list[int | None]:
    """Which of ``num_convs`` phi convs each scale uses (None: no phi), as VAR picks it:
    the tick nearest to ``i / (S - 1)`` among ``num_convs`` evenly spaced ticks (numpy
    ``linspace``'s arithmetic: ``start + j * step``, the last tick ``stop``)."""
    if num_convs == 0:
        return [None] * num_scales
    p = num_convs
    start, stop = (1 / 3 / p, 1 - 1 / 3 / p) if p == 4 else (1 / 2 / p, 1 - 1 / 2 / p)
    step = (stop - start) / (p - 1) if p > 1 else 0.0
    ticks = [start + j * step for j in range(p)]
    ticks[-1] = stop
    out: list[int | None] = []
    for i in range(num_scales):
        at = i / (num_scales - 1) if num_scales > 1 else 0.0
        out.append(min(range(p), key=lambda j: abs(ticks[j] - at)))  # first of ties
    return out


def revival_quota(n: int, deficit: torch.Tensor) -> list[int]:
    """``n`` codes shared among scales in proportion to their ``deficit`` (S,) (largest
    remainders, ties to the coarser scale; equal shares when no scale has a deficit)."""
    d = deficit.to(torch.float64).cpu()
    if float(d.sum()) <= 0:
        d = torch.ones_like(d)
    exact = n * d / d.sum()
    quota = exact.floor().long()
    rest = n - int(quota.sum())
    if rest:
        frac = exact - quota
        quota[torch.argsort(-frac, stable=True)[:rest]] += 1
    return quota.tolist()
