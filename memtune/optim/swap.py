"""Swapping: the script's optimizer object becomes another family in place (`optimizer.__class__` becomes a
subclass of the script's class, or torch.optim.Adafactor) and its state is converted; the object, its
param_groups and their lr/betas/eps/weight_decay stay, so LR schedulers and anything else holding the
optimizer keep working. Each swap returns an undo that converts the state back and restores the class."""

from __future__ import annotations

import math
import weakref

import torch

from memtune.errors import PlanError, ScriptError
from memtune.optim.adafactor import _ADAFACTOR_GROUP, _AdafactorSwap
from memtune.optim.base import _Swapped
from memtune.optim.galore import GaLoreAdamW
from memtune.optim.inbackward import _INBACKWARD_PARAMS, InBackwardAdamW
from memtune.optim.quantized import QuantizedAdamW, QuantizedAdamW4bit
from memtune.undo import Undo

CHOICES = ("adamw", "adamw8bit", "adamw4bit", "adafactor", "galore", "inbackward")
GALORE_DEFAULTS = {"rank": 128, "update_proj_gap": 200, "scale": 1.0}

_CLASS_CACHE: dict[tuple[type, type], type] = {}


def _subclass(mixin: type, base: type) -> type:
    key = (mixin, base)
    if key not in _CLASS_CACHE:
        name = {"adamw8bit": "AdamW8bit", "adamw4bit": "AdamW4bit", "galore": "GaLore",
                "inbackward": "InBackward"}.get(mixin._memtune_name, mixin.__name__)
        _CLASS_CACHE[key] = type(f"{name}{base.__name__}", (mixin, base), {"__module__": __name__})
    return _CLASS_CACHE[key]


def _check_swappable(opt: torch.optim.Optimizer, name: str) -> None:
    if isinstance(opt, _Swapped):
        raise ScriptError(f"the optimizer was already swapped to {type(opt).__name__}: apply one optimizer section")
    if not isinstance(opt, torch.optim.Adam):  # AdamW subclasses Adam in torch >= 2.6
        raise ScriptError(
            f"optimizer: {{name: {name}}} replaces Adam/AdamW, but the script uses {type(opt).__name__}; "
            "drop the optimizer section for this script")
    for g in opt.param_groups:
        for key in ("amsgrad", "capturable", "differentiable"):
            if g.get(key) and name != "adamw":
                raise ScriptError(f"optimizer: {{name: {name}}} does not support {key}=True in the script's "
                                  f"{type(opt).__name__}; drop the optimizer section or that flag")


def swap_optimizer(opt: torch.optim.Optimizer, name: str, *, stochastic_rounding: bool = False,
                   rank: int | None = None, update_proj_gap: int | None = None, scale: float | None = None) -> Undo:
    """Turn the script's Adam/AdamW `opt` into `name` in place; returns an undo that converts it back."""
    if name not in CHOICES:
        raise PlanError(f"optimizer: name {name!r} is not allowed; choose one of: {', '.join(CHOICES)}")
    _check_swappable(opt, name)
    orig_cls = type(opt)
    opt._memtune_orig_cls = orig_cls
    if name == "adamw":
        return _use_fused(opt)
    if name in ("adamw8bit", "adamw4bit"):
        return _swap_quantized(opt, orig_cls, QuantizedAdamW if name == "adamw8bit" else QuantizedAdamW4bit,
                               stochastic_rounding)
    if name == "adafactor":
        return _swap_adafactor(opt, orig_cls)
    if name == "galore":
        cfg = {"rank": rank or GALORE_DEFAULTS["rank"],
               "update_proj_gap": update_proj_gap or GALORE_DEFAULTS["update_proj_gap"],
               "scale": GALORE_DEFAULTS["scale"] if scale is None else scale}
        return _swap_plain_state(opt, orig_cls, GaLoreAdamW, extra={"_memtune_galore": cfg})
    return _swap_inbackward(opt, orig_cls)


def _set_class(opt, cls) -> None:
    opt.__class__ = cls
    opt._patch_step_function()  # torch wraps step() per class for step hooks (capture.Session counts steps)
    inst = opt.__dict__.get("step")
    if inst is None:
        return
    # an LR scheduler built before the swap wrapped the *instance's* step around the old class's function
    orig = getattr(inst, "_memtune_orig", inst)
    if getattr(orig, "_wrapped_by_lr_sched", False):
        if getattr(opt, "_memtune_orig_cls", None) is cls:  # swapping back: the scheduler's wrapper is right
            opt.__dict__["step"] = orig
            return
        ref = weakref.ref(opt)

        def step(*args, **kwargs):
            o = ref()
            o._opt_called = True  # what the scheduler's wrapper records
            return type(o).step(o, *args, **kwargs)

        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        step._memtune_orig = orig  # type: ignore[attr-defined]
        opt.__dict__["step"] = step


def _use_fused(opt) -> Undo:
    params = [p for g in opt.param_groups for p in g["params"]]
    ok = params and all(p.is_cuda and p.is_floating_point() for p in params) and not any(
        g.get("capturable") or g.get("differentiable") for g in opt.param_groups)
    if not ok:
        return lambda: None
    saved = [(g.get("fused"), g.get("foreach")) for g in opt.param_groups]
    for g in opt.param_groups:
        g["fused"], g["foreach"] = True, False
    for st in opt.state.values():  # fused keeps `step` on the param's device
        if "step" in st and torch.is_tensor(st["step"]):
            st["step"] = st["step"].to(params[0].device, torch.float32)

    def undo() -> None:
        for g, (f, fe) in zip(opt.param_groups, saved, strict=True):
            g["fused"], g["foreach"] = f, fe
        for st in opt.state.values():
            if "step" in st and torch.is_tensor(st["step"]):
                st["step"] = st["step"].cpu()

    return undo


def _swap_quantized(opt, orig_cls, mixin, stochastic_rounding) -> Undo:
    from memtune.kernels import quantized_adamw as Q

    bits = mixin._memtune_bits
    for st in opt.state.values():
        if "exp_avg" in st:
            q = Q.state_from_moments(st["exp_avg"].float().reshape(-1), st["exp_avg_sq"].float().reshape(-1), bits)
            step = float(st["step"])
            st.clear()
            st.update(q)
            st["step"] = step
    for g in opt.param_groups:
        g["stochastic_rounding"] = bool(stochastic_rounding)
    _set_class(opt, _subclass(mixin, orig_cls))

    def undo() -> None:
        for p, st in list(opt.state.items()):
            if "exp_avg_q" in st:
                m, v = Q.moments_from_state(st, p.numel(), bits)
                step = torch.tensor(float(st["step"]), dtype=torch.float32)
                st.clear()
                st.update(step=step, exp_avg=m.view_as(p).to(p.dtype), exp_avg_sq=v.view_as(p).to(p.dtype))
        for g in opt.param_groups:
            g.pop("stochastic_rounding", None)
        _set_class(opt, orig_cls)

    return undo


def _swap_plain_state(opt, orig_cls, mixin, extra: dict) -> Undo:
    """GaLore: its projected moments don't map to full ones, so the state starts fresh (and again on undo)."""
    saved_state = {p: dict(st) for p, st in opt.state.items()}
    opt.state.clear()
    for k, v in extra.items():
        setattr(opt, k, v)
    _set_class(opt, _subclass(mixin, orig_cls))

    def undo() -> None:
        opt.state.clear()
        opt.state.update(saved_state)
        for k in extra:
            opt.__dict__.pop(k, None)
        _set_class(opt, orig_cls)

    return undo


def _swap_adafactor(opt, orig_cls) -> Undo:
    if not hasattr(torch.optim, "Adafactor"):
        raise ScriptError("optimizer: {name: adafactor} needs torch >= 2.5 (torch.optim.Adafactor); upgrade torch")
    saved_groups = [{k: g.get(k, _MISSING) for k in _ADAFACTOR_GROUP} for g in opt.param_groups]
    saved_state = {p: dict(st) for p, st in opt.state.items()}
    opt.state.clear()
    for g in opt.param_groups:
        g.update(_ADAFACTOR_GROUP)
        g.setdefault("maximize", False)
        with torch.no_grad():
            sq = sum(float(p.float().square().sum()) for p in g["params"])
            n = sum(p.numel() for p in g["params"])
        rms = math.sqrt(sq / max(n, 1))
        g["memtune_lr_scale"] = 1.0 / max(_ADAFACTOR_GROUP["eps"][1], rms)
    _set_class(opt, _AdafactorSwap)

    def undo() -> None:
        for g, s in zip(opt.param_groups, saved_groups, strict=True):
            for k, v in s.items():
                if v is _MISSING:
                    g.pop(k, None)
                else:
                    g[k] = v
        opt.state.clear()
        opt.state.update(saved_state)
        _set_class(opt, orig_cls)

    return undo


_MISSING = object()


def _swap_inbackward(opt, orig_cls) -> Undo:
    handles = []
    opt._memtune_group_of = {}
    opt._memtune_updated = set()
    _set_class(opt, _subclass(InBackwardAdamW, orig_cls))
    for g in opt.param_groups:
        for p in g["params"]:
            if not p.requires_grad:
                continue
            opt._memtune_group_of[p] = g
            _INBACKWARD_PARAMS[id(p)] = weakref.ref(p)
            handles.append(p.register_post_accumulate_grad_hook(opt._memtune_hook))

    def undo() -> None:
        for h in handles:
            h.remove()
        for p in list(opt._memtune_group_of):
            _INBACKWARD_PARAMS.pop(id(p), None)
        del opt._memtune_group_of, opt._memtune_updated
        _set_class(opt, orig_cls)

    return undo


def make_optimizer(name: str, params, lr: float = 1e-3, **kw) -> torch.optim.Optimizer:
    """A fresh optimizer of choice `name` (AdamW hyperparameters), for benchmarks and tests."""
    opt_kw = {k: kw.pop(k) for k in ("betas", "eps", "weight_decay") if k in kw}
    opt = torch.optim.AdamW(params, lr=lr, **opt_kw)
    swap_optimizer(opt, name, **kw)
    return opt
