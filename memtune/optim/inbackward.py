"""Update in backward (LOMO, Lv et al. 2023): the script's Adam/AdamW update runs in each param's
post-accumulate-grad hook and the gradient is freed at once, so all gradients never coexist. Same arithmetic
as the script's AdamW (lossless), but it refuses gradient accumulation, GradScaler, DDP/sharding and
global-norm clipping, which all need every gradient before any update: clip_grad_norm_ is patched (by the
strategy's `install`) to raise instead of silently clipping nothing."""

from __future__ import annotations

import weakref

import torch

from memtune.errors import ScriptError
from memtune.optim.base import _decoupled, _Swapped
from memtune.optim.stepping import run_closure
from memtune.undo import Undo, patch_functions

# == is elementwise)
_INBACKWARD_PARAMS: dict[int, weakref.ref] = {}


def _in_backward(p) -> bool:
    r = _INBACKWARD_PARAMS.get(id(p))
    return r is not None and r() is p


class InBackwardAdamW(_Swapped):
    """The script's Adam/AdamW applied in each param's post-accumulate-grad hook; the grad is freed at once."""

    _memtune_name = "inbackward"

    def _memtune_hook(self, p: torch.Tensor) -> None:
        group = self._memtune_group_of[p]
        if id(p) in self._memtune_updated:
            raise ScriptError(
                "update-in-backward (optimizer: {name: inbackward}) saw a second backward before optimizer.step(): "
                "the script accumulates gradients, but each gradient is applied and freed as soon as it is "
                "computed; choose another optimizer choice for this script")
        self._memtune_updated.add(id(p))
        st = self.state[p]
        fused = bool(group.get("fused") or False)
        capturable = bool(group.get("capturable") or False)
        if len(st) == 0:
            st["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if fused or capturable
                          else torch.tensor(0.0, dtype=torch.float32))
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        b1, b2 = group["betas"]
        with torch.no_grad():
            _adam_functional()(
                [p], [p.grad], [st["exp_avg"]], [st["exp_avg_sq"]], [], [st["step"]],
                foreach=group.get("foreach"), capturable=capturable, differentiable=False, fused=group.get("fused"),
                grad_scale=None, found_inf=None, has_complex=torch.is_complex(p),
                decoupled_weight_decay=_decoupled(self, group), amsgrad=False, beta1=b1, beta2=b2,
                lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                maximize=group.get("maximize", False))
        p.grad = None

    def step(self, closure=None):
        loss = run_closure(closure)  # its backward runs the updates
        self._memtune_updated = set()
        return loss


def _adam_functional():
    import importlib

    return importlib.import_module("torch.optim.adam").adam


def _clip_guard(orig):
    def clip_grad_norm_(parameters, *args, **kwargs):
        ps = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        if any(_in_backward(p) for p in ps):
            raise ScriptError(
                "the script clips gradients by their global norm, but update-in-backward (optimizer: "
                "{name: inbackward}) applies and frees each gradient during backward, before the norm of all "
                "of them exists; remove the clip or choose another optimizer choice (e.g. adamw8bit)")
        return orig(ps, *args, **kwargs)

    clip_grad_norm_.__wrapped__ = orig  # type: ignore[attr-defined]
    return clip_grad_norm_


def install_clip_guard() -> Undo:
    """Patch torch.nn.utils.clip_grad_norm_ (and its aliases) to refuse clipping params updated in backward."""
    import torch.nn.utils as nu
    import torch.nn.utils.clip_grad as cg

    return patch_functions([(m, a) for m in (nu, cg) for a in ("clip_grad_norm_", "clip_grad_norm")],
                           _clip_guard, "_memtune_guard")
