"""The log window: the per-step figures of one log interval, summed until the next
``"train"`` record, and checkpointed with the run, so a resumed run writes the same
records as an uninterrupted one (train windows included)."""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["Window"]


class Window:
    """Sums of the per-step figures since the last record, each averaged over the steps
    that reported it (the adversarial figures exist only from ``disc_start`` on).

    ``k``: codes of the quantizer whose per-step counts (``(K,)``, or ``(Q, K)`` pooled)
    the window adds up for ``window_usage``; None: no counts. ``rate_key``: the record's
    throughput figure, ``items`` added per step over the wall time of the window (the only
    figure that is not restored: time is not state); ``tallies``: counts reported as
    sums, 0 in a window without any (``revived``); ``per_group``: keep the counts' rows
    too (``group_counts`` (G, K): a quantizer's ``code_groups``, e.g. the scales)."""

    def __init__(
        self,
        k: int | None = None,
        rate_key: str = "items_per_s",
        tallies: tuple[str, ...] = (),
        per_group: bool = False,
    ) -> None:
        self.k, self.rate_key, self.tally_names = k, rate_key, tallies
        self.per_group = per_group
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.seen: dict[str, int] = {}  # steps that reported each figure
        self.counts: torch.Tensor | None = None
        self.group_counts: torch.Tensor | None = None
        self.items = 0
        self.tallies: dict[str, int] = dict.fromkeys(self.tally_names, 0)
        self.t0 = time.perf_counter()

    def add(
        self, values: dict[str, float], counts: torch.Tensor | None = None, items: int = 0
    ) -> None:
        """One step's figures (already global), its per-code counts and its items."""
        for key, v in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + v
            self.seen[key] = self.seen.get(key, 0) + 1
        if counts is not None and self.k is not None:
            # (K,), (Q, K) for rvq (pooled); None: a huge implicit grid is never counted
            pooled = counts.reshape(-1, self.k).sum(0).cpu().to(torch.int64)
            self.counts = pooled if self.counts is None else self.counts + pooled
            if self.per_group:
                rows = counts.reshape(-1, self.k).cpu().to(torch.int64)
                old = self.group_counts
                self.group_counts = rows if old is None else old + rows
        self.items += items

    def tally(self, name: str, n: int) -> None:
        """Add ``n`` to a count of the window (revived codes): reported as a sum."""
        self.tallies[name] = self.tallies.get(name, 0) + n

    def steps(self, key: str) -> int:
        """How many steps of the window reported ``key``."""
        return self.seen.get(key, 0)

    def summary(self) -> dict[str, Any]:
        """The means, ``window_usage`` (with ``k``), the rate and the tallies; then a
        fresh window begins."""
        out: dict[str, Any] = {k: v / self.seen[k] for k, v in self.sums.items()}
        if self.k is not None:
            used = None if self.counts is None else float((self.counts > 0).float().mean())
            out["window_usage"] = used
        out[self.rate_key] = self.items / max(time.perf_counter() - self.t0, 1e-9)
        out.update(self.tallies)
        self.reset()
        return out

    # -- checkpoint ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "sums": dict(self.sums),
            "seen": dict(self.seen),
            "counts": self.counts,
            "group_counts": self.group_counts,
            "items": self.items,
            "tallies": dict(self.tallies),
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict` (None, from a checkpoint written before windows were
        saved: an empty window). The rate's clock starts now."""
        self.reset()
        if not state:
            return
        self.sums = {k: float(v) for k, v in state["sums"].items()}
        # a prior's window of before the runtime: {"sums", "n"}, every figure in every step
        seen = state.get("seen") or dict.fromkeys(self.sums, int(state.get("n", 0)))
        self.seen = {k: int(v) for k, v in seen.items()}
        counts = state.get("counts")
        self.counts = None if counts is None else counts.cpu().to(torch.int64)
        rows = state.get("group_counts")  # absent in checkpoints of before it
        self.group_counts = None if rows is None else rows.cpu().to(torch.int64)
        self.items = int(state.get("items", 0))
        self.tallies.update({k: int(v) for k, v in state.get("tallies", {}).items()})
