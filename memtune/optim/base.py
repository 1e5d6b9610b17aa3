"""What every swapped-in optimizer family shares: the marker mixin and the Adam hyper-parameters of a group."""

from __future__ import annotations

from typing import Any, ClassVar

import torch


class _Swapped:
    """Marker mixin: `_memtune_orig_cls` is the class the script built."""

    _memtune_name: ClassVar[str] = ""


def _decoupled(opt: torch.optim.Optimizer, group: dict) -> bool:
    return bool(group.get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW)))


def _hyper(opt, group) -> dict[str, Any]:
    b1, b2 = group["betas"]
    return dict(lr=float(group["lr"]), beta1=float(b1), beta2=float(b2), eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]), decoupled=_decoupled(opt, group),
                maximize=bool(group.get("maximize", False)))
