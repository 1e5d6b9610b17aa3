"""The `optimizer` plan section: memory-lean optimizers swapped in place of the script's Adam/AdamW.

```yaml
optimizer: {name: adamw8bit}                 # adamw | adamw8bit | adamw4bit | adafactor | galore | inbackward
optimizer: {name: adamw8bit, stochastic_rounding: true}   # bf16 params: round updates stochastically
optimizer: {name: galore, rank: 128, update_proj_gap: 200, scale: 1.0}
optimizer: {name: adamw, state_bits: 8}      # same as adamw8bit
```

The swap changes `optimizer.__class__` to a subclass of the script's class (or of torch.optim.Adafactor) and
converts its state: the object, its param_groups and their lr/betas/eps/weight_decay stay, so LR schedulers
and anything else holding the optimizer keep working. `undo` converts the state back and restores the class.

- adamw: the script's Adam/AdamW, switched to torch's fused implementation where every param is a CUDA float.
- adamw8bit / adamw4bit: moments quantized block-wise, one fused Triton launch per step
  (memtune/kernels/quantized_adamw.py; the torch reference runs where Triton can't). state_dict() holds the
  codes and absmax tensors plus a `memtune_quantized` descriptor; load_state_dict() also takes a plain
  AdamW state dict (it quantizes it) and `dequantized_state_dict()` gives one back.
- adafactor: torch.optim.Adafactor (factored second moment, no first moment). Its lr is relative to each
  param's RMS, so the same number means a smaller step than AdamW's: lossy and a different schedule.
- galore: Adam on a rank-r projection of each 2-D gradient (Zhao et al. 2024), projection refreshed every
  `update_proj_gap` steps from a randomized range finder with its own generator (the script's RNG stream is
  untouched); other params get plain AdamW.
- inbackward: the AdamW update runs in each param's post-accumulate-grad hook and the gradient is freed at
  once (LOMO, Lv et al. 2023), so all gradients never coexist. Same arithmetic as the script's AdamW (lossless),
  but it refuses gradient accumulation, GradScaler, DDP/sharding and global-norm clipping, which all need every
  gradient before any update: clip_grad_norm_ is patched (by `install`) to raise instead of silently clipping
  nothing.
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from memtune.errors import PlanError, ScriptError
from memtune.plan import check_choice, check_keys
from memtune.strategies.base import (
    ApplyContext,
    SearchOptions,
    Strategy,
    Undo,
    patch_functions,
    register,
    run_closure,
)

if TYPE_CHECKING:
    from memtune.costmodel import SimStep
    from memtune.plan import Plan
    from memtune.profile import Profile

CHOICES = ("adamw", "adamw8bit", "adamw4bit", "adafactor", "galore", "inbackward")
LOSSLESS = ("adamw", "inbackward")
KEYS = {
    "name": f"one of {', '.join(CHOICES)}",
    "state_bits": "32, 8 or 4 (with name adamw: adamw8bit / adamw4bit)",
    "stochastic_rounding": "adamw8bit/4bit with bf16 params: round updates stochastically (default false)",
    "rank": "galore: rank of the projection (default 128)",
    "update_proj_gap": "galore: steps between projection refreshes (default 200)",
    "scale": "galore: scale of the projected update (default 1.0)",
}

# Step time per parameter (ns), 268M fp32 params as 16 x (4096 x 4096), back-to-back steps, H100 80GB HBM3,
# torch 2.11+cu130, triton 3.6, 2026-11-25, `python benchmarks/optim.py --steps 25 --warmup 5`
# (docs/benchmarks.md). Memory-bound, so the cost model scales them by the profile's copy bandwidth.
MEASURED_GBPS = 2995.0  # that GPU's device copy bandwidth (read + write), same run
_N = 268_435_456
STEP_NS_PER_PARAM = {
    "adamw": 2.944e6 / _N,  # torch fused AdamW
    "adamw8bit": 1.494e6 / _N,
    "adamw4bit": 1.302e6 / _N,
    "adafactor": 10.18e6 / _N,  # torch.optim.Adafactor (foreach)
    "galore": 6.783e6 / _N,  # rank 128, a step without a projection refresh
    "inbackward": 2.944e6 / _N,  # the same AdamW arithmetic, one param at a time inside backward
}
GALORE_REFRESH_NS_PER_PARAM = 0.4e9 / _N  # first step (16 range finders + state allocation): 0.4 s, same run
GALORE_DEFAULTS = {"rank": 128, "update_proj_gap": 200, "scale": 1.0}


# --- the swappable optimizers ------------------------------------------------------------------------


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


class QuantizedAdamW(_Swapped):
    """AdamW with block-wise quantized moments (8 or 4 bits); mixed into the script's Adam/AdamW class."""

    _memtune_bits: ClassVar[int] = 8
    _memtune_name = "adamw8bit"

    @torch.no_grad()
    def step(self, closure=None):
        from memtune.kernels import quantized_adamw as Q

        loss = run_closure(closure)
        bits = self._memtune_bits
        self._memtune_seed = getattr(self, "_memtune_seed", 0) + 1
        for gi, group in enumerate(self.param_groups):
            buckets: dict[int, tuple[list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ScriptError("quantized AdamW does not take sparse gradients: drop the optimizer section")
                st = self.state[p]
                if "exp_avg_q" not in st:
                    st.update(Q.new_state(p, bits))
                    st["step"] = 0.0  # a Python number: no tensor op per param per step (torch loads it too)
                st["step"] += 1
                b = buckets.setdefault(int(st["step"]), ([], [], []))
                b[0].append(p)
                b[1].append(p.grad if p.grad.is_contiguous() else p.grad.contiguous())
                b[2].append(st)
            h = _hyper(self, group)
            for step, (ps, gs, ss) in buckets.items():
                fresh = [q for q in ps if not q.is_contiguous()]
                if fresh:
                    raise ScriptError("quantized AdamW needs contiguous parameters: drop the optimizer section")
                # the Triton interpreter is a test tool: on CPU run the torch reference unless asked otherwise
                use = getattr(self, "_memtune_use_triton", None)
                Q.fused_step(ps, gs, ss, bits=bits, step=step, stochastic_rounding=bool(group.get(
                    "stochastic_rounding", False)), seed=self._memtune_seed * 1000 + gi, cache_key=id(self),
                    use_triton=use if use is not None or ps[0].is_cuda else False, **h)
        return loss

    # -- portable state ---------------------------------------------------------------------------------
    def state_dict(self):
        from memtune.kernels import quantized_adamw as Q

        sd = super().state_dict()
        sd["memtune_quantized"] = {"bits": self._memtune_bits, "block": Q.QBLOCK[self._memtune_bits],
                                   "exp_avg": "signed square map: m = absmax * c*|c| / L^2",
                                   "exp_avg_sq": "codes of sqrt(v): sqrt(v) = absmax * ((c+1)/S)^2, no zero",
                                   "layout": "8-bit: one code per element; 4-bit: per 128-block, element k low "
                                             "nibble, k+64 high nibble"}
        return sd

    def dequantized_state_dict(self) -> dict:
        """The same state as a plain torch AdamW state dict (fp32 exp_avg / exp_avg_sq), loadable anywhere."""
        from memtune.kernels import quantized_adamw as Q

        sd = torch.optim.Optimizer.state_dict(self)
        params = [p for g in self.param_groups for p in g["params"]]
        out = {}
        for k, st in sd["state"].items():
            p = params[k]
            st = dict(st)
            if "exp_avg_q" in st:
                m, v = Q.moments_from_state(st, p.numel(), self._memtune_bits)
                for key in ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax"):
                    st.pop(key)
                st["exp_avg"], st["exp_avg_sq"] = m.view_as(p).clone(), v.view_as(p).clone()
                st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)
            out[k] = st
        return {"state": out, "param_groups": sd["param_groups"]}

    def load_state_dict(self, state_dict):
        from memtune.kernels import quantized_adamw as Q

        bits = self._memtune_bits
        saved_bits = (state_dict.get("memtune_quantized") or {}).get("bits", bits)
        id_map = _saved_id_map(self, state_dict)
        conv: dict[Any, dict] = {}
        for k, st in state_dict["state"].items():
            st = dict(st)
            p = id_map.get(k)
            if p is not None and "exp_avg" in st:  # a plain AdamW state dict
                st.update(Q.state_from_moments(st.pop("exp_avg").float().reshape(-1).cpu(),
                                               st.pop("exp_avg_sq").float().reshape(-1).cpu(), bits))
                st.pop("max_exp_avg_sq", None)
            elif p is not None and "exp_avg_q" in st and saved_bits != bits:
                m, v = Q.moments_from_state({a: b.cpu() for a, b in st.items() if a != "step"}, p.numel(), saved_bits)
                st.update(Q.state_from_moments(m, v, bits))
            conv[k] = st
            if "step" in st:
                st["step"] = float(st["step"])
        sd = {"state": conv, "param_groups": state_dict["param_groups"]}
        torch.optim.Optimizer.load_state_dict(self, sd)
        # the base class casts floating state to the param dtype: keep absmax in fp32
        for k, st in conv.items():
            p = id_map.get(k)
            if p is None:
                continue
            for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                if key in st:
                    self.state[p][key] = st[key].to(device=p.device, dtype=torch.float32)


class QuantizedAdamW4bit(QuantizedAdamW):
    _memtune_bits = 4
    _memtune_name = "adamw4bit"


def _saved_id_map(opt, state_dict) -> dict[Any, torch.Tensor]:
    saved = state_dict["param_groups"]
    if len(saved) != len(opt.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(saved, opt.param_groups, strict=True)):
        raise ScriptError("the optimizer state dict does not match this optimizer's param groups")
    return {k: p for a, b in zip(saved, opt.param_groups, strict=True) for k, p in zip(a["params"], b["params"],
                                                                                       strict=True)}


class GaLoreAdamW(_Swapped):
    """Adam on a low-rank projection of each 2-D gradient; plain AdamW for the other params."""

    _memtune_name = "galore"

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        cfg = self._memtune_galore
        for group in self.param_groups:
            h = _hyper(self, group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                g = p.grad.float()
                if h["maximize"]:
                    g = -g
                if not h["decoupled"] and h["weight_decay"]:
                    g = g + h["weight_decay"] * p.float()  # Adam's L2 term, before projecting
                low = p.dim() == 2 and min(p.shape) > cfg["rank"]
                if "step" not in st:
                    st["step"] = torch.tensor(0.0)
                st["step"] += 1
                t = int(st["step"].item())
                if low:
                    left = p.shape[0] < p.shape[1]  # project the smaller side: state is rank x larger side
                    if "proj" not in st or (t - 1) % cfg["update_proj_gap"] == 0:
                        st["proj"] = _top_subspace(g if left else g.T, cfg["rank"], self._memtune_gen(p.device))
                    P = st["proj"]
                    r = P.T @ g if left else g @ P
                else:
                    r = g
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(r)
                    st["exp_avg_sq"] = torch.zeros_like(r)
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.lerp_(r, 1 - h["beta1"])
                v.mul_(h["beta2"]).addcmul_(r, r, value=1 - h["beta2"])
                bc1, bc2 = 1 - h["beta1"] ** t, 1 - h["beta2"] ** t
                n = (m / bc1) / ((v / bc2).sqrt_().add_(h["eps"]))
                if low:
                    n = (P @ n if left else n @ P.T) * cfg["scale"]
                if h["decoupled"] and h["weight_decay"]:
                    p.mul_(1 - h["lr"] * h["weight_decay"])
                p.add_(n.to(p.dtype), alpha=-h["lr"])
        return loss

    def _memtune_gen(self, device) -> torch.Generator:
        gens = self.__dict__.setdefault("_memtune_gens", {})
        if str(device) not in gens:
            gens[str(device)] = torch.Generator(device=device).manual_seed(0x6A1)
        return gens[str(device)]


def _top_subspace(a: torch.Tensor, rank: int, gen: torch.Generator, power_iters: int = 2) -> torch.Tensor:
    """Orthonormal basis (rows x rank) of `a`'s top left singular vectors: randomized range finder
    (Halko et al. 2011, alg. 4.4) with a private generator, a few matmuls instead of a full SVD."""
    k = min(rank + 8, min(a.shape))
    omega = torch.randn(a.shape[1], k, device=a.device, dtype=a.dtype, generator=gen)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(power_iters):
        q, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ q)
    u, _, _ = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ u[:, :rank]).contiguous()


# id(param) -> weakref, for params whose grads are consumed in backward (tensors can't sit in a WeakSet: their
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


# --- swapping ----------------------------------------------------------------------------------------

_CLASS_CACHE: dict[tuple[type, type], type] = {}


def _subclass(mixin: type, base: type) -> type:
    key = (mixin, base)
    if key not in _CLASS_CACHE:
        name = {"adamw8bit": "AdamW8bit", "adamw4bit": "AdamW4bit", "galore": "GaLore",
                "inbackward": "InBackward"}.get(mixin._memtune_name, mixin.__name__)
        _CLASS_CACHE[key] = type(f"{name}{base.__name__}", (mixin, base), {"__module__": __name__})
    return _CLASS_CACHE[key]


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
    check_choice(name, CHOICES, "optimizer: name")
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


# --- the strategy ------------------------------------------------------------------------------------


def _adam_like(kind: str) -> bool:
    return kind.lower() in ("adam", "adamw")


def _counts(profile: Profile) -> tuple[float, float, float]:
    """(elements under Adam-like optimizers, their measured state bytes, their measured step seconds)."""
    opts = [o for o in profile.optimizers if _adam_like(o.kind)]
    if opts:
        return (sum(o.n_params for o in opts), sum(o.state_bytes for o in opts), sum(o.step_s for o in opts))
    if profile.optimizers:
        return 0.0, 0.0, 0.0
    return profile.trainable_param_bytes / 4, float(profile.optimizer_state_bytes), profile.optimizer_s


def _matrix_dim(profile: Profile) -> float:
    """Typical smaller side of the 2-D weights: a transformer block holds ~12 d^2 params (Kaplan et al. 2020,
    table 1); used for factored / low-rank state sizes the profile doesn't break down."""
    rep = profile.repeated_blocks
    per_block = (sum(b.n_params for b in rep) / len(rep)) if rep else (profile.trainable_param_bytes / 4)
    return max(64.0, math.sqrt(max(per_block, 1) / 12))


def state_bytes_per_param(name: str, profile: Profile | None = None, rank: int = 128) -> float:
    from memtune.kernels.quantized_adamw import state_bytes_per_param as qbytes

    if name in ("adamw", "inbackward"):
        return 8.0
    if name == "adamw8bit":
        return qbytes(8)
    if name == "adamw4bit":
        return qbytes(4)
    d = _matrix_dim(profile) if profile is not None else 1024.0
    if name == "adafactor":
        return 4 * 2 / d  # row + column second-moment factors of a d x d matrix
    return min(8.0, 12 * rank / d)  # galore: 2 moments of rank x larger side + the projection


@register
class OptimizerStrategy(Strategy):
    name = "optimizer"
    order = 10
    summary = "swap Adam/AdamW for a memory-lean optimizer (quantized, factored, low-rank, update-in-backward)"

    def validate(self, section: Any) -> dict[str, Any]:
        if isinstance(section, str):
            section = {"name": section}
        if not isinstance(section, dict):
            raise PlanError(f"optimizer: give a mapping, e.g. {{name: adamw8bit}}; names: {', '.join(CHOICES)}")
        check_keys(section, KEYS, "optimizer")
        out = dict(section)
        bits = out.pop("state_bits", None)
        name = out.get("name", "adamw" if bits is not None else None)
        if name is None:
            raise PlanError(f"optimizer: `name` is required; one of {', '.join(CHOICES)}")
        check_choice(name, CHOICES, "optimizer: name")
        if bits is not None:
            check_choice(bits, (32, 8, 4), "optimizer: state_bits")
            if name != "adamw" and not (name == f"adamw{bits}bit"):
                raise PlanError(f"optimizer: state_bits applies to name adamw only, not {name}")
            name = {32: "adamw", 8: "adamw8bit", 4: "adamw4bit"}[bits]
        out["name"] = name
        if "stochastic_rounding" in out:
            if name not in ("adamw8bit", "adamw4bit"):
                raise PlanError("optimizer: stochastic_rounding applies to adamw8bit and adamw4bit only")
            if not isinstance(out["stochastic_rounding"], bool):
                raise PlanError("optimizer: stochastic_rounding must be true or false")
        for key, typ in (("rank", int), ("update_proj_gap", int), ("scale", (int, float))):
            if key in out:
                if name != "galore":
                    raise PlanError(f"optimizer: {key} applies to galore only")
                v = out[key]
                if isinstance(v, bool) or not isinstance(v, typ) or v <= 0:
                    raise PlanError(f"optimizer: {key} must be a positive number, got {v!r}")
        return out

    def conflicts(self, plan: Plan, section: dict[str, Any]) -> list[str]:
        out = []
        if section["name"] == "inbackward":
            if plan.get("sharding"):
                out.append("optimizer inbackward updates each param during backward, before sharding's gradient "
                           "reduction: drop one of the two sections")
            off = plan.get("offload") or {}
            if off.get("optimizer_state"):
                out.append("optimizer inbackward can't run with offload.optimizer_state: drop one of the two")
        return out

    def lossy(self, section: dict[str, Any]) -> bool:
        return section.get("name", "adamw") not in LOSSLESS

    def describe(self, section: dict[str, Any]) -> str:
        extra = {k: v for k, v in section.items() if k != "name"}
        return section["name"] + (f" ({', '.join(f'{k}={v}' for k, v in extra.items())})" if extra else "")

    def _inbackward_ok(self, profile: Profile) -> bool:
        ex = profile.extra or {}
        return (profile.micro_batches_per_step <= 1 and not profile.grad_scaler and profile.world_size <= 1
                and not profile.ddp and not ex.get("clip_grad_norm") and not ex.get("grad_clip"))

    def space(self, trial: Any, profile: Profile, opts: SearchOptions) -> dict[str, Any] | None:
        n, _, _ = _counts(profile)
        if n <= 0:
            return None
        choices = list(LOSSLESS if opts.lossless_only else CHOICES)
        if not self._inbackward_ok(profile) or opts.world_size > 1:
            choices.remove("inbackward")
        if opts.device != "cuda":  # quantized steps fall back to the slow torch reference off-GPU
            choices = [c for c in choices if c not in ("adamw8bit", "adamw4bit")]
        name = trial.suggest_categorical("optimizer.name", choices)
        section: dict[str, Any] = {"name": name}
        if name == "galore":
            section["rank"] = trial.suggest_categorical("optimizer.rank", [64, 128, 256, 512])
        return section

    def effect(self, profile: Profile, section: dict[str, Any], sim: SimStep) -> None:
        name = section["name"]
        n, old_state, old_s = _counts(profile)
        if n <= 0:
            sim.notes.append("optimizer: the script's optimizer is not Adam/AdamW; section ignored")
            return
        rank = int(section.get("rank", GALORE_DEFAULTS["rank"]))
        new_state = n * state_bytes_per_param(name, profile, rank)
        sim.opt_state_bytes = max(0.0, sim.opt_state_bytes - old_state) + new_state
        gbps = profile.hardware.d2d_gbps or MEASURED_GBPS
        ns = STEP_NS_PER_PARAM[name]
        if name == "galore":
            ns += GALORE_REFRESH_NS_PER_PARAM / int(section.get("update_proj_gap", GALORE_DEFAULTS["update_proj_gap"]))
        new_s = n * ns * 1e-9 * MEASURED_GBPS / gbps
        if old_s > 0 and profile.device == "cuda":  # keep what was measured, scale by the measured ratio
            new_s = old_s * ns / STEP_NS_PER_PARAM["adamw"]
        sim.opt_s = max(0.0, sim.opt_s - old_s) + (0.0 if name == "inbackward" else new_s)
        if name == "inbackward":
            sim.grads_freed_in_backward = True
            sim.extra_s += new_s  # the same update, run inside backward one param at a time
            sim.opt_transient_bytes = 0.0
            sim.notes.append("optimizer inbackward: each gradient is applied and freed in backward")
        elif name in ("adafactor", "galore"):
            d = _matrix_dim(profile)
            sim.opt_transient_bytes = max(sim.opt_transient_bytes, 2 * 4 * d * 4 * d)  # fp32 temporaries of a d x 4d weight
        if self.lossy(section):
            sim.lossy.append("optimizer")
            sim.notes.append(f"optimizer {name}: {state_bytes_per_param(name, profile, rank):.2f} B/param of state "
                             f"(AdamW: 8); changes the numbers")

    def install(self, section: dict[str, Any], session: Any) -> Undo:
        if section["name"] == "inbackward":
            return install_clip_guard()  # before the script binds `from torch.nn.utils import clip_grad_norm_`
        return lambda: None

    def apply(self, ctx: ApplyContext, section: dict[str, Any]) -> Undo:
        name = section["name"]
        prof = ctx.profile
        if name == "inbackward":
            why = None
            if prof is not None and prof.micro_batches_per_step > 1:
                why = f"the script accumulates gradients over {prof.micro_batches_per_step} backwards per step"
            elif prof is not None and prof.grad_scaler:
                why = "the script uses a GradScaler, which must see every gradient before the update"
            elif isinstance(ctx.model, torch.nn.parallel.DistributedDataParallel) or (prof is not None and prof.ddp):
                why = "the model is wrapped in DDP, which reduces gradients after the hooks would update"
            if why:
                raise ScriptError(f"optimizer inbackward refused: {why}; choose another optimizer choice")
        adam = [o for o in ctx.optimizers if isinstance(o, torch.optim.Adam)]
        if not adam:
            kinds = ", ".join(type(o).__name__ for o in ctx.optimizers) or "none"
            raise ScriptError(f"optimizer: {{name: {name}}} replaces Adam/AdamW, but the script's optimizers are "
                              f"{kinds}; drop the optimizer section")
        kw = {k: section[k] for k in ("stochastic_rounding", "rank", "update_proj_gap", "scale") if k in section}
        undos = [install_clip_guard()] if name == "inbackward" else []
        for o in adam:
            was = type(o).__name__
            undos.append(swap_optimizer(o, name, **kw))
            ctx.note("optimizer", f"{was} -> {name}" + (" (lossy)" if self.lossy(section) else ""))
        for o in ctx.optimizers:
            if o not in adam:
                ctx.note("optimizer", f"{type(o).__name__} left alone (not Adam/AdamW)")

        def undo() -> None:
            for u in reversed(undos):
                u()

        return undo
