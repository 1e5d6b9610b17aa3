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
- cast (with params bf16): `all` (default) casts every floating parameter; `autocast` casts only the weights
  autocast would cast anyway (those of Linear and convolution modules, not shared with another kind of
  module) and keeps the rest (embeddings, norms) in fp32. Under the script's bf16 autocast a matmul on the
  bf16 weight computes exactly what autocast's cached cast of the fp32 weight did, and its gradient is the
  same bf16 matmul result the cast's backward upcasts: with fp32 masters this is the script's arithmetic,
  so `cast: autocast` is lossless (the forward refuses to run without bf16 autocast). The script's fp32
  gradients are kept: on the device through `Tensor.grad_dtype` (torch >= 2.10), or, when offload streams
  gradients, as their bf16 values sent to the host and accumulated, unscaled and clipped there in fp32.
Otherwise changes the numbers (labelled lossy); tests check it against the same recipe written by hand.

When the run's model is still on the host (placement deferred the script's `.to("cuda")`), a host master is
the script's own fp32 tensor, not a copy.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from memtune.costmodel import drop_autocast_copies, use_bf16_params_probe
from memtune.errors import PlanError, ScriptError
from memtune.optim.stepping import check_elementwise, run_closure, step_on, wrap_step
from memtune.plan import SectionConfig, check_bool, check_choice, check_keys
from memtune.strategies.base import ApplyContext, PlanFacts, Strategy, register
from memtune.undo import Undo, Undos, wrap_forward

AUTOCAST = ("none", "bf16", "fp16")
PARAMS = ("fp32", "bf16")
CAST = ("all", "autocast")
KEYS = {"autocast": "none | bf16 | fp16", "params": "fp32 | bf16", "master_weights": "true | false",
        "cast": "all (default) | autocast: only the weights bf16 autocast casts (lossless under it)"}
_MATMUL = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
           torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
_LOW_AUTOCAST = ("bfloat16", "bf16", "torch.bfloat16")
_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Autocast without measured matmul rates: saved activations and block time assumed to halve.
AUTOCAST_BYTES = 0.5
AUTOCAST_TIME = 0.5


# A 16-bit matmul measured slower than fp32 is charged as measured, up to this factor (a 2-core CPU without
# bf16 units, torch 2.13: 25x slower matmuls, the README's GPT 16x slower per step under bf16 autocast).
MAX_SLOWDOWN = 50.0


def _measured_rate_ratio(profile: Any, dtype: str) -> float | None:
    """fp32 over 16-bit matmul time on this device, from the profile's measured rates; None when not measured."""
    rates = profile.hardware.matmul_tflops or {}
    if rates.get("fp32") and rates.get(dtype):
        return min(MAX_SLOWDOWN, max(0.1, rates["fp32"] / rates[dtype]))
    return None


class MasterWeights:
    """fp32 masters for one optimizer's low-precision parameters; the update runs on them."""

    def __init__(self, opt: torch.optim.Optimizer, masters: dict[int, torch.Tensor]):
        check_elementwise(opt, "precision.master_weights")
        self.opt = opt
        self.params = [p for g in opt.param_groups for p in g["params"] if id(p) in masters]
        self.subs = {id(p): masters[id(p)] for p in self.params}
        # parameters without a master (cast: autocast keeps norms and embeddings in fp32) update in place
        self.subs.update({id(p): p for g in opt.param_groups for p in g["params"] if id(p) not in masters})
        self.ver = {id(p): p._version for p in self.params}
        self.undo = wrap_step(opt, self._step)

    def sync_versions(self) -> None:
        """The parameters' data were replaced on purpose (placement moved them): not a change to follow."""
        self.ver = {id(p): p._version for p in self.params}

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


RNN_CLASSES = ("LSTM", "GRU", "RNN")  # torch.nn.RNNBase subclasses, as block classes in a profile

@dataclass(frozen=True)
class PrecisionConfig(SectionConfig):
    autocast: str = "none"
    params: str = "fp32"
    master_weights: bool = True
    cast: str | None = None  # None = "all" (a plan without the key writes none)

    @property
    def matmul_only(self) -> bool:
        return self.params != "fp32" and self.cast == "autocast"

    @property
    def lossy(self) -> bool:
        return self.autocast != "none" or (self.params != "fp32" and not self.matmul_only)

    def describe(self) -> str:
        parts = []
        if self.autocast != "none":
            parts.append(f"{self.autocast} autocast")
        if self.matmul_only:
            parts.append(f"{self.params} matmul weights (what autocast casts) + fp32 masters, the rest fp32")
        elif self.params != "fp32":
            parts.append(f"{self.params} params" + (" + fp32 masters" if self.master_weights else ""))
        return ", ".join(parts) or "unchanged"


def matmul_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters autocast casts for its matmuls: those of Linear / convolution modules (and
    transformers' Conv1D) that no other kind of module also holds (a tied embedding stays)."""
    owners: dict[int, list[bool]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for m in model.modules():
        mm = isinstance(m, _MATMUL) or type(m).__name__ == "Conv1D"
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(mm)
            params[id(p)] = p
    return [params[k] for k, v in owners.items() if all(v)]


def _cast_block(cls: str) -> bool:
    """(cost model) a profiled block whose weights `cast: autocast` casts: not an embedding or a norm."""
    c = cls.lower()
    return "embed" not in c and "norm" not in c


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
        cast = section.get("cast")
        if cast is not None:
            check_choice(cast, CAST, "precision.cast")
        params = check_choice(section.get("params", "fp32"), PARAMS, "precision.params")
        if cast == "autocast" and params == "fp32":
            raise PlanError("precision.cast: autocast casts the matmul weights to `params`; give params: bf16")
        if cast == "autocast" and not mw:
            raise PlanError("precision.cast: autocast is the script's arithmetic only with fp32 master weights: "
                            "set master_weights: true (or cast: all for a lossy plan without masters)")
        return PrecisionConfig(autocast=check_choice(section.get("autocast", "none"), AUTOCAST, "precision.autocast"),
                               params=params, master_weights=mw, cast=cast)

    def declare(self, config: PrecisionConfig, facts: PlanFacts) -> None:
        if config.params != "fp32":
            facts.params_dtype = config.params
            facts.master_weights = config.master_weights
            facts.cast_scope = "autocast" if config.matmul_only else "all"

    def conflicts(self, config: PrecisionConfig, facts: PlanFacts) -> list[str]:
        if config.params != "fp32" and config.master_weights and facts.optimizer == "inbackward":
            return ["precision.master_weights updates fp32 masters in optimizer.step(); optimizer inbackward "
                    "updates the bf16 weights during backward instead: set master_weights: false or drop one"]
        return []

    def space(self, trial: Any, profile: Any, layout: Any, opts: Any) -> dict[str, Any] | None:
        if str(profile.autocast or "").lower() in _LOW_AUTOCAST and opts.device == "cuda" \
                and trial.suggest_categorical("precision.cast_autocast", [False, True]):
            return {"params": "bf16", "cast": "autocast", "master_weights": True}  # lossless under bf16 autocast
        if opts.lossless_only:
            return None
        # torch's CPU autocast cannot run an LSTM/GRU/RNN (the hidden state stays fp32: oneDNN refuses the mix)
        rnn_on_cpu = opts.device != "cuda" and any(b.cls in RNN_CLASSES for b in profile.blocks)
        autocast = "none" if profile.autocast or rnn_on_cpu else \
            trial.suggest_categorical("precision.autocast", ["none", "bf16"])
        params = trial.suggest_categorical("precision.params", list(PARAMS))
        if autocast == "none" and params == "fp32":
            return None
        return {"autocast": autocast, "params": params, "master_weights": True}

    def memory_seed(self, profile: Any, opts: Any) -> dict[str, Any]:
        return {"precision.cast_autocast": True}  # proposed only under the script's bf16 autocast (lossless)

    def effect(self, profile: Any, config: PrecisionConfig, sim: Any) -> None:
        if config.matmul_only:
            self._matmul_effect(profile, config, sim)
            return
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
        rate_ratio = _measured_rate_ratio(profile, config.autocast if config.autocast != "none" else "bf16")
        if config.autocast != "none" and not profile.autocast:
            # no measured rates: a GPU's tensor cores roughly halve the time; a CPU gains nothing to count on
            ratio = rate_ratio or (AUTOCAST_TIME if profile.device == "cuda" else 1.0)
            for b in sim.blocks:
                if b.name not in probed:  # a probed block's bytes were measured in bf16 already
                    b.act_bytes *= AUTOCAST_BYTES
                b.fwd_s *= ratio
                b.bwd_s *= ratio
            sim.notes.append(f"autocast: activations assumed x{AUTOCAST_BYTES}, block time x{ratio:.2f}")
        elif config.params == "bf16" and not profile.autocast and rate_ratio and rate_ratio > 1.0:
            # bf16 weights make the script's matmuls bf16; where this device runs those slower (a CPU without
            # bf16 units), that is measured and must not be left out. A speed-up is not counted: the script's
            # own casts decide which of its ops follow the weights
            for b in sim.blocks:
                b.fwd_s *= rate_ratio
                b.bwd_s *= rate_ratio
            sim.notes.append(f"bf16 weights: block time x{rate_ratio:.2f} (this device's measured matmul rates)")

    def _matmul_effect(self, profile: Any, config: PrecisionConfig, sim: Any) -> None:
        """cast: autocast: matmul weights in 16 bits on the device, fp32 masters, the script's fp32 gradients
        (on the device through grad_dtype; streamed as 16-bit values when offload streams them); activations
        and times unchanged (the same arithmetic); autocast's cached weight copies gone."""
        by_name = {b.name: b for b in profile.blocks}
        cast = 0.0
        for b in sim.blocks:
            pb = by_name.get(b.name)
            if pb is None or not _cast_block(pb.cls):
                continue
            f = pb.param_bytes.get("float32", 0)
            b.param_bytes -= f / 2
            cast += f
        trainable = min(cast, profile.trainable_param_bytes)
        sim.param_bytes -= cast / 2
        sim.master_bytes += trainable
        sim.cast_grad_bytes += trainable
        if profile.autocast:
            drop_autocast_copies(sim)
        sim.notes.append(f"precision cast: autocast: {cast / 1e9:.2f} GB of matmul weights as bf16 + fp32 masters "
                         "(the script's arithmetic under its bf16 autocast)")

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
        if dev == "cpu":
            rnn = next((type(m).__name__ for mod in (models if models is not None else ctx.all_models)
                        for m in mod.modules() if isinstance(m, torch.nn.RNNBase)), None)
            if rnn is not None:
                raise PlanError(f"precision.autocast: {name} on a CPU cannot run this model's {rnn} (torch's CPU "
                                "autocast leaves its hidden state fp32, which oneDNN refuses): set autocast: none, "
                                "or run on a GPU")

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
        if config.matmul_only:
            params = [p for m in ctx.all_models for p in matmul_weights(m) if p.dtype == torch.float32]
        else:
            # batch norms keep fp32 weights beside their fp32 running statistics (a CPU batch_norm refuses the
            # mix: the zoo's GAN under bf16 weights + autocast); their few bytes stay uncounted by the cost model
            norms = {id(p) for m in ctx.all_models for mod in m.modules()
                     if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for p in mod.parameters(recurse=False)}
            params = [p for m in ctx.all_models for p in m.parameters()
                      if p.dtype == torch.float32 and id(p) not in norms]
        params = list({id(p): p for p in params}.values())
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
                if offload and p.device.type == "cpu":  # still on the host (placement): the script's own tensor
                    m = p.data  # (`.data`, not detach(): its own version counter, so updates don't bump p's)
                elif offload:  # offload keeps them on the host (pageable: only the CPU touches them)
                    m = torch.empty_like(p, device="cpu").copy_(p.detach())
                else:
                    m = p.detach().to(ctx.device, copy=True)
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
                ctx.master_weights.append(wrapped[-1])
        if offload and masters:
            ctx.master_params = masters
        fp32_grads = ""
        if config.matmul_only:
            undos_mm = self._matmul_only(ctx, params, dtype)
            fp32_grads = ("; gradients sent to the host as bf16 values, kept in fp32 there" if ctx.facts.grads_on_host
                          else "; fp32 gradients on the device (grad_dtype)" if _has_grad_dtype()
                          else "; gradients bf16 on the device (this torch has no grad_dtype: accumulation and "
                               "clipping round to bf16)")
        else:
            undos_mm = None
        n = sum(p.numel() for p in params)
        frozen = sum(p.numel() for p in params if id(p) not in trained)
        where = "on the host (offload runs the update)" if offload else "on the device"
        ctx.note(self.name, f"{len(params)} parameters ({n / 1e6:.1f}M) cast to {config.params}"
                            + (f"; fp32 master weights {where}" if masters else "; no master weights (lossy updates)")
                            + (f"; {frozen / 1e6:.1f}M frozen ones without masters" if frozen and masters else "")
                            + (" (matmul weights only: the rest stays fp32)" if config.matmul_only else "")
                            + fp32_grads)

        def undo() -> None:
            if undos_mm is not None:
                undos_mm()
            for w in wrapped:
                w.undo()
            if ctx.run_over and offload:  # the script has ended: the fp32 masters need not go back to the device
                return
            with torch.no_grad():
                for p in params:
                    m = masters.get(id(p))
                    p.data = m.to(p.device) if m is not None else p.data.to(torch.float32)

        return undo

    def _matmul_only(self, ctx: ApplyContext, params: list[torch.nn.Parameter], dtype: torch.dtype) -> Undo:
        """cast: autocast: the script's fp32 gradients (grad_dtype on the device, or the reference dtype for
        offload's host gradients), and a forward that refuses to run outside the matching autocast."""
        ctx.reference_grad_dtypes = {**(ctx.reference_grad_dtypes or {}), **{id(p): torch.float32 for p in params}}
        with Undos() as undos:
            if not ctx.facts.grads_on_host and _has_grad_dtype():
                for p in params:
                    if p.requires_grad:
                        p.grad_dtype = torch.float32

                def grads_back() -> None:
                    for p in params:
                        if p.requires_grad:
                            p.grad_dtype = p.dtype

                undos.add(grads_back)
            dev = ctx.device.type

            def make(forward):
                @functools.wraps(forward)
                def checked(*args, **kwargs):
                    if not torch.is_autocast_enabled(dev) or torch.get_autocast_dtype(dev) != dtype:
                        raise ScriptError(
                            f"precision cast: autocast stores the matmul weights in {dtype} for a forward under "
                            f"{dtype} autocast, but this forward runs without it: run it under "
                            f"torch.autocast('{dev}', dtype={dtype}) as the profiled script did, or add "
                            "`autocast: bf16` to the precision section, or use cast: all (lossy)")
                    return forward(*args, **kwargs)

                return checked

            undos.add(wrap_forward(ctx.model, make))
        return undos


def _has_grad_dtype() -> bool:
    return hasattr(torch.Tensor, "grad_dtype")
