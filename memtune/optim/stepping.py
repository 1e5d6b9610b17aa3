"""Running an optimizer's own update somewhere else: the helpers behind fp32 master weights and host-resident
optimizer state, which work with any elementwise optimizer class because the class's own `step` does the
arithmetic on stand-in tensors.

- `raw_step(opt)`: the class's update without the global step hooks (memtune's step counter sees one step).
- `wrap_step(opt, new_raw)`: replace `opt.step` for this object only, keeping hooks and LR schedulers working.
- `step_on(opt, subs)`: run `opt`'s update with stand-ins for its parameters, state keyed by the real ones.
- `run_closure(closure)`: what `optimizer.step(closure)` does first.
"""

from __future__ import annotations

import types
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from memtune.errors import PlanError
from memtune.undo import Undo, replace_on_instance


def run_closure(closure: Callable[[], Any] | None) -> Any:
    """What `optimizer.step(closure)` does first: re-evaluate the loss with grad enabled (steps run under
    no_grad), or None without a closure."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def raw_step(opt: torch.optim.Optimizer) -> Callable[..., Any]:
    """The class's update without the step hooks (so the Session's step counter sees one step, not many)."""
    f = type(opt).step
    if getattr(f, "hooked", False) and hasattr(f, "__wrapped__"):
        f = f.__wrapped__
    return f


def wrap_step(opt: torch.optim.Optimizer, new_raw: Callable[..., Any]) -> Undo:
    """Replace `opt.step` for this object only, keeping the step hooks (LR schedulers, step counting).

    `new_raw(opt, closure=None)` does the update. It records `_opt_called` itself, all an LR scheduler's
    own step wrapper does, so schedulers created before or after keep working without warnings.
    """
    def raw(self, *args, **kwargs):
        self._opt_called = True  # what LRScheduler's own wrapper records
        return new_raw(self, *args, **kwargs)

    hooked = torch.optim.Optimizer.profile_hook_step(raw)
    hooked._wrapped_by_lr_sched = True  # schedulers: this step records `_opt_called`, no need to wrap it
    return replace_on_instance(opt, "step", types.MethodType(hooked, opt))


def check_elementwise(opt: torch.optim.Optimizer, what: str) -> None:
    """Stand-in updates (step_on) need an optimizer that updates each parameter from its own gradient and
    state, on whatever device the stand-in lives (all of torch.optim except LBFGS)."""
    cls = type(opt)
    if cls.__name__ == "LBFGS" or cls.__module__.split(".")[0] == "bitsandbytes":
        raise PlanError(f"{what} cannot drive {cls.__module__}.{cls.__name__} (it needs the whole model's gradient "
                        "at once, or device-only kernels): remove that section or use e.g. torch.optim.AdamW")


def step_on(
    opt: torch.optim.Optimizer,
    subs: dict[int, torch.Tensor],
    overrides: dict[str, Any] | None = None,
    only: Iterable[torch.Tensor] | None = None,
) -> None:
    """Run `opt`'s own update on stand-ins: `subs[id(p)]` (with `.grad` set) replaces parameter p.

    The optimizer's state stays keyed by the real parameters (so `state_dict()` is unchanged); the update
    sees the stand-ins, which is how fp32 master weights and host-resident optimizer state work with any
    optimizer class. `only` limits the update to some parameters (a chunk); `overrides` set group options
    for this call (e.g. fused=True on the host).
    """
    only_ids = None if only is None else {id(p) for p in only}
    saved_groups, saved_state = opt.param_groups, opt.state
    tmp_state: defaultdict = defaultdict(dict)
    groups, pairs = [], []
    for g in saved_groups:
        ps = [p for p in g["params"] if id(p) in subs and (only_ids is None or id(p) in only_ids)
              and subs[id(p)].grad is not None]
        if not ps:
            continue
        ng = dict(g)
        ng["params"] = [subs[id(p)] for p in ps]
        if overrides:
            ng.update(overrides)
        groups.append((g, ng))
        for p in ps:
            tmp_state[subs[id(p)]] = saved_state[p]
            pairs.append((p, subs[id(p)]))
    if not groups:
        return
    opt.param_groups = [ng for _, ng in groups]
    opt.state = tmp_state
    try:
        raw_step(opt)(opt)
    finally:
        opt.param_groups, opt.state = saved_groups, saved_state
        for p, s in pairs:
            saved_state[p] = tmp_state[s]
        for g, ng in groups:  # group-level values an optimizer may update (rare)
            for k, v in ng.items():
                if k != "params" and not (overrides and k in overrides):
                    g[k] = v
