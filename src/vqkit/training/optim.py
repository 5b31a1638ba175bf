"""The weight average of the tokenizer job: an exponential moving average of the weights
that carries its whole state in :meth:`WeightEMA.state_dict`, so a resumed run continues
exactly. (The learning-rate schedules live in :mod:`vqkit.runtime.schedule`.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["WeightEMA"]


class WeightEMA:
    """An exponential moving average of a model's floating-point parameters and buffers
    (integer buffers are copied), kept in float32 beside the model.

    ``update()`` after each optimizer step: ``avg = d * avg + (1 - d) * live`` with
    ``d = min(decay, (1 + n) / (10 + n))``, n the number of updates before this one: the
    usual warmup, so a short run is not dominated by the random initial weights.
    ``copy_to(model)`` loads the average into a model of the same architecture (the
    trainer's evaluation and export copy).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1); got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {k: self._own(v) for k, v in model.state_dict().items()}

    @staticmethod
    def _own(v: torch.Tensor) -> torch.Tensor:
        v = v.detach()
        v = v.to(torch.float32) if v.is_floating_point() else v
        # contiguous clone: the shadow must not alias the live tensor (nor keep its layout)
        return v.clone(memory_format=torch.contiguous_format)

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        avg, live = [], []
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if s.is_floating_point():
                avg.append(s)
                live.append(v.detach().to(torch.float32))
            else:
                s.copy_(v)
        torch._foreach_lerp_(avg, live, 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def reset_rows(self, model: nn.Module, prefix: str, mask: torch.Tensor) -> None:
        """Copy the rows ``mask`` of every entry under ``prefix`` whose first dimension
        has ``len(mask)`` rows from the live model: a revived code restarts its average
        instead of blending the dead code with its replacement."""
        rows = mask.to(torch.bool)
        for k, v in model.state_dict().items():
            if k.startswith(prefix) and v.dim() >= 1 and v.shape[0] == rows.shape[0]:
                s = self.shadow[k]
                s[rows.to(s.device)] = v.detach()[rows.to(v.device)].to(s.dtype)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> nn.Module:
        model.load_state_dict(self.shadow)
        return model

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The average and its update count; the decay stays this run's (it may change on
        resume, and applies from the next update)."""
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"weight EMA state lacks {sorted(missing)[:3]}")
        for k, s in self.shadow.items():
            s.copy_(state["shadow"][k])
        self.updates = int(state["updates"])
