"""torch.optim.Adafactor swapped in for the script's Adam/AdamW (factored second moment, no first moment)."""

from __future__ import annotations

import torch

from memtune.optim.base import _Swapped


class _AdafactorSwap(_Swapped, torch.optim.Adafactor if hasattr(torch.optim, "Adafactor") else torch.optim.Optimizer):
    """torch's Adafactor, with the group lr scaled by 1 / RMS of the group's params at the swap: Adafactor's
    step is lr * max(eps2, RMS(param)) per element where AdamW's is about lr, so the script's lr (and its
    schedule, which keeps writing group["lr"]) keeps meaning roughly the same step size."""

    _memtune_name = "adafactor"

    def step(self, closure=None):
        f = torch.optim.Adafactor.step
        if getattr(f, "hooked", False):  # the hook wrapper: ours already runs the step hooks
            f = f.__wrapped__
        saved = [g["lr"] for g in self.param_groups]
        for g in self.param_groups:
            g["lr"] = g["lr"] * g.get("memtune_lr_scale", 1.0)
        try:
            return f(self, closure)
        finally:
            for g, lr in zip(self.param_groups, saved, strict=True):
                g["lr"] = lr


_ADAFACTOR_GROUP = {"beta2_decay": -0.8, "eps": (None, 1e-3), "d": 1.0, "foreach": None, "memtune_lr_scale": 1.0}
