"""Precision: autocast around the model's forward; bf16 parameters with fp32 master weights.

Plan section: `precision: {autocast: bf16 | fp16 | none, params: fp32 | bf16, master_weights: true | false}`.
- autocast: the model's forward runs under `torch.autocast(device, dtype)` (a script already under the same
  autocast is unchanged; the loss computed outside the model stays as the script has it).
- params bf16: floating-point parameters become bf16 in place (same Parameter objects, same state_dict keys;
  a checkpoint saved this way loads into the fp32 model with `load_state_dict`, which casts). Buffers stay.
- master_weights (default true with bf16 params): the optimizer keeps an fp32 copy of each parameter and
  updates that (gradients upcast to fp32, the optimizer's own update on the masters, copied back rounded to
  bf16), wrapping whatever optimizer class the script (or the `optimizer` section, applied before) uses. When
  the plan also offloads the optimizer state, the masters live on the host and offload does the update.
Changes the numbers (labelled lossy); tests check it against the same recipe written by hand.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from memtune.costmodel import drop_autocast_copies, use_bf16_params_probe
from memtune.errors import PlanError
from memtune.optim.stepping import check_elementwise, run_closure, step_on, wrap_step
from memtune.plan import SectionConfig, check_bool, check_choice, check_keys
from memtune.strategies.base import ApplyContext, PlanFacts, Strategy, register
from memtune.undo import Undo, Undos, wrap_forward

AUTOCAST = ("none", "bf16", "fp16")
PARAMS = ("fp32", "bf16")
KEYS = {"autocast": "none | bf16 | fp16", "params": "fp32 | bf16", "master_weights": "true | false"}
_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Autocast without measured matmul rates: saved activations and block time assumed to halve.
AUTOCAST_BYTES = 0.5
AUTOCAST_TIME = 0.5


class MasterWeights:
    """fp32 masters for one optimizer's low-precision parameters; the update runs on them."""

    def __init__(self, opt: torch.optim.Optimizer, masters: dict[int, torch.Tensor]):
        check_elementwise(opt, "precision.master_weights")
        self.opt = opt
        self.params = [p for g in opt.param_groups for p in g["params"] if id(p) in masters]
        self.subs = {id(p): masters[id(p)] for p in self.params}
        self.ver = {id(p): p._version for p in self.params}
        self.undo = wrap_step(opt, self._step)

    @torch.no_grad()
    def _step(self, opt, closure=None):
        loss = run_closure(closure)
        for p in self.params:
            m = self.subs[id(p)]
            if p._version != self.ver[id(p)]:  # weights set from outside (load_state_dict): follow them
                m.copy_(p)
            m.grad = None if p.grad is None else p.grad.to(torch.float32)
        try:
            step_on(opt, self.subs)
        finally:
            for p in self.params:
                m = self.subs[id(p)]
                if m.grad is not None:
                    p.copy_(m)
                m.grad = None
                self.ver[id(p)] = p._version
        return loss


@dataclass(frozen=True)
class PrecisionConfig(SectionConfig):
    autocast: str = "none"
    params: str = "fp32"
    master_weights: bool = True

    @property
    def lossy(self) -> bool:
        return self.autocast != "none" or self.params != "fp32"

    def describe(self) -> str:
        parts = []
        if self.autocast != "none":
            parts.append(f"{self.autocast} autocast")
        if self.params != "fp32":
            parts.append(f"{self.params} params" + (" + fp32 masters" if self.master_weights else ""))
        return ", ".join(parts) or "unchanged"


@register
class Precision(Strategy):
    name = "precision"
    order = 20
    summary = "bf16/fp16 autocast; bf16 parameters with fp32 master weights"

    def validate(self, section: Any) -> PrecisionConfig:
        if not isinstance(section, dict):
            raise PlanError("precision: write it as {autocast: bf16|fp16|none, params: fp32|bf16, master_weights: true}")
        check_keys(section, KEYS, "precision")
        mw = section.get("master_weights", True)
        check_bool(mw, "precision.master_weights")
        return PrecisionConfig(autocast=check_choice(section.get("autocast", "none"), AUTOCAST, "precision.autocast"),
                               params=check_choice(section.get("params", "fp32"), PARAMS, "precision.params"),
                               master_weights=mw)

    def declare(self, config: PrecisionConfig, facts: PlanFacts) -> None:
        if config.params != "fp32":
            facts.params_dtype = config.params
            facts.master_weights = config.master_weights

    def conflicts(self, config: PrecisionConfig, facts: PlanFacts) -> list[str]:
        if config.params != "fp32" and config.master_weights and facts.optimizer == "inbackward":
            return ["precision.master_weights updates fp32 masters in optimizer.step(); optimizer inbackward "
                    "updates the bf16 weights during backward instead: set master_weights: false or drop one"]
        return []

    def space(self, trial: Any, profile: Any, layout: Any, opts: Any) -> dict[str, Any] | None:
        if opts.lossless_only:
            return None
        autocast = "none" if profile.autocast else trial.suggest_categorical("precision.autocast", ["none", "bf16"])
        params = trial.suggest_categorical("precision.params", list(PARAMS))
        if autocast == "none" and params == "fp32":
            return None
        return {"autocast": autocast, "params": params, "master_weights": True}

    def effect(self, profile: Any, config: PrecisionConfig, sim: Any) -> None:
        sim.lossy.append(self.name)
        probed: set[str] = set()
        if config.params == "bf16":
            fp32 = sum(b.param_bytes.get("float32", 0) for b in profile.blocks)
            trainable_fp32 = min(fp32, profile.trainable_param_bytes)
            by_name = {b.name: b for b in profile.blocks}
            for b in sim.blocks:
                pb = by_name.get(b.name)
                f = pb.param_bytes.get("float32", 0) if pb else 0
                b.param_bytes -= f / 2
                b.grad_bytes = b.grad_bytes / 2 if b.grad_bytes else b.grad_bytes
            sim.param_bytes -= fp32 / 2
            sim.grad_bytes -= trainable_fp32 / 2
            if config.master_weights:
                sim.master_bytes += trainable_fp32
            else:
                sim.opt_state_bytes /= 2
            # blocks the profiler re-ran with bf16 weights take that measurement (a bf16 residual stream and
            # HF RMSNorm's `.to(input_dtype)` shrink fp32 saved tensors, which an fp32 profile cannot show)
            probed = use_bf16_params_probe(profile, sim)
            if profile.autocast:
                # elsewhere: autocast no longer keeps 16-bit copies of weights that are 16-bit already
                drop_autocast_copies(sim)
        if config.autocast != "none" and not profile.autocast:
            # no measured rates: a GPU's tensor cores roughly halve the time; a CPU gains nothing to count on
            ratio = AUTOCAST_TIME if profile.device == "cuda" else 1.0
            rates = profile.hardware.matmul_tflops or {}
            if rates.get("fp32") and rates.get(config.autocast):
                ratio = min(1.0, max(0.1, rates["fp32"] / rates[config.autocast]))
            for b in sim.blocks:
                if b.name not in probed:  # a probed block's bytes were measured in bf16 already
                    b.act_bytes *= AUTOCAST_BYTES
                b.fwd_s *= ratio
                b.bwd_s *= ratio
            sim.notes.append(f"autocast: activations assumed x{AUTOCAST_BYTES}, block time x{ratio:.2f}")

    def apply(self, ctx: ApplyContext, config: PrecisionConfig) -> Undo:
        with Undos() as undos:
            if config.params != "fp32":
                undos.add(self._cast_params(ctx, config))
            if config.autocast != "none":
                undos.add(self._autocast(ctx, config.autocast))
        return undos

    def add_model(self, ctx: ApplyContext, config: PrecisionConfig, model: Any) -> Undo:
        if config.autocast == "none":
            return lambda: None
        ctx.models.append(model)
        return self._autocast(ctx, config.autocast, [model])

    def _autocast(self, ctx: ApplyContext, name: str, models: list[Any] | None = None) -> Undo:
        dtype, dev = _DT[name], ctx.device.type

        def make(forward):
            @functools.wraps(forward)
            def wrapper(*args, **kwargs):
                with torch.autocast(dev, dtype=dtype):
                    return forward(*args, **kwargs)

            return wrapper

        models = models if models is not None else ctx.all_models
        ctx.note(self.name, f"{name} autocast around {', '.join(type(m).__name__ for m in models)}.forward (a loss "
                            "the script computes after the forward keeps the script's precision)")
        undos = Undos()
        for m in models:  # every trained model: one model in bf16 feeding another in fp32 would not run
            undos.add(wrap_forward(m, make))
        return undos

    @torch.no_grad()
    def _cast_params(self, ctx: ApplyContext, config: PrecisionConfig) -> Undo:
        dtype = _DT[config.params]
        params = list({id(p): p for m in ctx.all_models for p in m.parameters() if p.dtype == torch.float32}.values())
        offload = ctx.facts.update_on_host  # then the masters live on the host and offload does the update
        if config.master_weights and not offload:
            for opt in ctx.optimizers:  # refuse before changing anything
                check_elementwise(opt, "precision.master_weights")
        # fp32 masters for the weights an optimizer updates; frozen weights (requires_grad False, or held by no
        # optimizer) are only cast: no master, no state, no gradient (their undo upcasts the bf16 values)
        trained = {id(p) for opt in ctx.optimizers for g in opt.param_groups for p in g["params"] if p.requires_grad}
        masters: dict[int, torch.Tensor] = {}
        if config.master_weights:
            for p in params:
                if id(p) not in trained:
                    continue
                if offload:  # offload keeps them on the host and runs the update there
                    from memtune.strategies.offload.transport import make_transport

                    m = make_transport(ctx.device).host_like(p)
                    m.copy_(p.detach())
                else:
                    m = p.detach().clone()
                masters[id(p)] = m
        for p in params:
            p.data = p.data.to(dtype)
        held = {id(p) for p in params}
        wrapped: list[MasterWeights] = []
        for opt in ctx.optimizers:
            mine = [p for g in opt.param_groups for p in g["params"] if id(p) in held]
            if not mine:
                continue
            if not masters:  # state must match the parameters' dtype
                for p in mine:
                    for k, v in list(opt.state.get(p, {}).items()):
                        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0:
                            opt.state[p][k] = v.to(dtype)
            elif not offload:
                wrapped.append(MasterWeights(opt, masters))
        if offload and masters:
            ctx.master_params = masters
        n = sum(p.numel() for p in params)
        frozen = sum(p.numel() for p in params if id(p) not in trained)
        where = "on the host (offload runs the update)" if offload else "on the device"
        ctx.note(self.name, f"{len(params)} parameters ({n / 1e6:.1f}M) cast to {config.params}"
                            + (f"; fp32 master weights {where}" if masters else "; no master weights (lossy updates)")
                            + (f"; {frozen / 1e6:.1f}M frozen ones without masters" if frozen and masters else ""))

        def undo() -> None:
            for w in wrapped:
                w.undo()
            with torch.no_grad():
                for p in params:
                    m = masters.get(id(p))
                    p.data = m.to(p.device) if m is not None else p.data.to(torch.float32)

        return undo
