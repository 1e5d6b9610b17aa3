"""The `optimizer` plan section: memory-lean optimizers swapped in place of the script's Adam/AdamW
(the families and the swap live in memtune/optim).

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from memtune.errors import PlanError, ScriptError
from memtune.optim.inbackward import install_clip_guard
from memtune.optim.swap import CHOICES, GALORE_DEFAULTS, swap_optimizer
from memtune.plan import SectionConfig, check_choice, check_keys
from memtune.strategies.base import ApplyContext, PlanFacts, SearchOptions, Strategy, register
from memtune.undo import Undo, Undos, noop

if TYPE_CHECKING:
    from memtune.costmodel import SimStep
    from memtune.profile import Profile

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


@dataclass(frozen=True)
class OptimizerConfig(SectionConfig):
    name: str
    stochastic_rounding: bool | None = None
    rank: int | None = None
    update_proj_gap: int | None = None
    scale: float | None = None

    @property
    def lossy(self) -> bool:
        return self.name not in LOSSLESS

    def describe(self) -> str:
        extra = {k: v for k, v in self.to_dict().items() if k != "name"}
        return self.name + (f" ({', '.join(f'{k}={v}' for k, v in extra.items())})" if extra else "")


@register
class OptimizerStrategy(Strategy):
    name = "optimizer"
    order = 10
    summary = "swap Adam/AdamW for a memory-lean optimizer (quantized, factored, low-rank, update-in-backward)"

    def validate(self, section: Any) -> OptimizerConfig:
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
        return OptimizerConfig(**out)

    def declare(self, config: OptimizerConfig, facts: PlanFacts) -> None:
        facts.optimizer = config.name

    def conflicts(self, config: OptimizerConfig, facts: PlanFacts) -> list[str]:
        out = []
        if config.name == "inbackward":
            if facts.sharding_stage:
                out.append("optimizer inbackward updates each param during backward, before sharding's gradient "
                           "reduction: drop one of the two sections")
            if facts.update_on_host:
                out.append("optimizer inbackward can't run with offload.optimizer_state: drop one of the two")
        return out

    def _inbackward_ok(self, profile: Profile) -> bool:
        ex = profile.extra or {}
        return (profile.micro_batches_per_step <= 1 and not profile.grad_scaler and profile.world_size <= 1
                and not profile.ddp and not ex.get("clip_grad_norm") and not ex.get("grad_clip"))

    def space(self, trial: Any, profile: Profile, layout: Any, opts: SearchOptions) -> dict[str, Any] | None:
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

    def effect(self, profile: Profile, config: OptimizerConfig, sim: SimStep) -> None:
        name = config.name
        n, old_state, old_s = _counts(profile)
        if n <= 0:
            sim.notes.append("optimizer: the script's optimizer is not Adam/AdamW; section ignored")
            return
        rank = int(config.rank or GALORE_DEFAULTS["rank"])
        new_state = n * state_bytes_per_param(name, profile, rank)
        sim.opt_state_bytes = max(0.0, sim.opt_state_bytes - old_state) + new_state
        gbps = profile.hardware.d2d_gbps or MEASURED_GBPS
        ns = STEP_NS_PER_PARAM[name]
        if name == "galore":
            ns += GALORE_REFRESH_NS_PER_PARAM / int(config.update_proj_gap or GALORE_DEFAULTS["update_proj_gap"])
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
        if config.lossy:
            sim.lossy.append("optimizer")
            sim.notes.append(f"optimizer {name}: {state_bytes_per_param(name, profile, rank):.2f} B/param of state "
                             f"(AdamW: 8); changes the numbers")

    def install(self, config: OptimizerConfig, session: Any) -> Undo:
        if config.name == "inbackward":
            return install_clip_guard()  # before the script binds `from torch.nn.utils import clip_grad_norm_`
        return noop

    def apply(self, ctx: ApplyContext, config: OptimizerConfig) -> Undo:
        name = config.name
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
        with Undos() as undos:
            if name == "inbackward":
                undos.add(install_clip_guard())
            for o in adam:
                undos.add(self._swap(ctx, config, o))
        for o in ctx.optimizers:
            if o not in adam:
                ctx.note("optimizer", f"{type(o).__name__} left alone (not Adam/AdamW)")
        return undos

    def add_optimizer(self, ctx: ApplyContext, config: OptimizerConfig, optimizer: Any) -> Undo:
        """A second Adam (a GAN's generator's) is swapped as the first was: the cost model counts both."""
        if not isinstance(optimizer, torch.optim.Adam):
            ctx.note("optimizer", f"{type(optimizer).__name__} left alone (not Adam/AdamW)")
            return noop
        return self._swap(ctx, config, optimizer)

    @staticmethod
    def _swap(ctx: ApplyContext, config: OptimizerConfig, opt: Any) -> Undo:
        was = type(opt).__name__
        undo = swap_optimizer(opt, config.name, **{k: v for k, v in config.to_dict().items() if k != "name"})
        ctx.note("optimizer", f"{was} -> {config.name}" + (" (lossy)" if config.lossy else ""))
        return undo
