"""ZeRO-style sharding across ranks with PyTorch's own engine (plan section `sharding`).

```yaml
sharding: {stage: 1}              # optimizer state sharded: torch.distributed.optim.ZeroRedundancyOptimizer
sharding: {stage: 2}              # + gradients: FSDP2 fully_shard(reshard_after_forward=False) per block + root
sharding: {stage: 3, offload: true}  # + parameters: fully_shard (resharded after forward), CPUOffloadPolicy
```

Stages follow ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models", section 5 / figure 1): P_os shards optimizer state, P_os+g also gradients, P_os+g+p also parameters.

How the script keeps working unchanged (it runs under torchrun and creates its own process group):
- stage 1: the script's DistributedDataParallel stays (it averages gradients); its optimizer object becomes a
  ZeroRedundancyOptimizer in place (same object: LR schedulers keep working), the local optimizer is the
  script's own class with its hyper-parameters and param groups.
- stages 2/3: `install` (before the script starts) makes `DistributedDataParallel(model, ...)` return the model
  itself (FSDP averages gradients instead); `apply` then calls `fully_shard` on every repeated block and on the
  root, on a mesh built from the script's process group. fully_shard replaces each parameter by a new DTensor
  Parameter, so the optimizers built before are re-pointed to the new parameters (by name).
- FSDP2 CPUOffloadPolicy when `offload: true` or the plan's `offload` section runs the optimizer update on
  the host (stages 2/3); MixedPrecisionPolicy when the plan's `precision` section asks for bf16/fp16 params.
"""

from __future__ import annotations

import contextlib
import inspect
import types
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memtune.errors import EnvironmentNotSupported, PlanError
from memtune.plan import SectionConfig, check_bool, check_choice, check_keys
from memtune.strategies.base import ApplyContext, PlanFacts, SearchOptions, ShardingState, Strategy, register
from memtune.undo import Undo, noop

if TYPE_CHECKING:
    import torch

    from memtune.costmodel import SimStep
    from memtune.profile import Profile

KEYS = {"stage": "1 (optimizer state), 2 (+ gradients) or 3 (+ parameters)",
        "offload": "true: FSDP2 CPUOffloadPolicy (stages 2/3): sharded params, grads and state on the host"}
STAGES = (1, 2, 3)
_LOW = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16"}
# used when the profile did not measure collectives (profiled without torchrun): a PCIe-class guess
_FALLBACK_GBPS = 10.0

# models whose DistributedDataParallel wrapping `install` took over -> what the script passed to DDP
_INTERCEPTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# models the script wrapped in a real DistributedDataParallel (stage 1) -> weakref to that DDP
_WRAPPED_BY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ShardingConfig(SectionConfig):
    stage: int
    offload: bool | None = None  # True, or absent

    def describe(self) -> str:
        what = {1: "optimizer state sharded (ZeroRedundancyOptimizer)",
                2: "optimizer state + gradients sharded (FSDP2, params kept gathered fwd->bwd)",
                3: "optimizer state + gradients + parameters sharded (FSDP2 fully_shard)"}[self.stage]
        return f"ZeRO-{self.stage}: {what}" + (", CPU offload" if self.offload else "")


@register
class Sharding(Strategy):
    name = "sharding"
    order = 30
    summary = "ZeRO stages across ranks: ZeroRedundancyOptimizer (1), FSDP2 fully_shard (2, 3)"

    # --- plan ------------------------------------------------------------------------------------
    def validate(self, section: Any) -> ShardingConfig:
        if isinstance(section, int) and not isinstance(section, bool):
            section = {"stage": section}
        if not isinstance(section, dict):
            raise PlanError("sharding: write a mapping, e.g. `sharding: {stage: 2}`")
        check_keys(section, KEYS, "sharding")
        if "stage" not in section:
            raise PlanError("sharding: `stage` is required: 1 (optimizer state), 2 (+ gradients) or 3 (+ parameters)")
        stage = check_choice(section["stage"], STAGES, "sharding.stage")
        offload = section.get("offload", False)
        check_bool(offload, "sharding.offload")
        if offload and stage == 1:
            raise PlanError("sharding.offload needs stage 2 or 3 (FSDP2 CPUOffloadPolicy); "
                            "for stage 1 use the `offload: {optimizer_state: true}` section instead")
        return ShardingConfig(stage=stage, offload=True if offload else None)

    def declare(self, config: ShardingConfig, facts: PlanFacts) -> None:
        facts.sharding_stage = config.stage

    # --- search ----------------------------------------------------------------------------------
    def space(self, trial: Any, profile: Profile, layout: Any, opts: SearchOptions) -> dict[str, Any] | None:
        if _world_size(profile, opts.world_size) <= 1:
            return None
        stage = trial.suggest_categorical("sharding.stage", [0, 1, 2, 3])
        if stage == 0:
            return None
        section: dict[str, Any] = {"stage": stage}
        if stage >= 2 and opts.device == "cuda" and trial.suggest_categorical("sharding.offload", [False, True]):
            section["offload"] = True
        return section

    # --- cost model ------------------------------------------------------------------------------
    def effect(self, profile: Profile, config: ShardingConfig, sim: SimStep) -> None:
        """Per-rank model states for the stage and the communication FSDP/ZeRO cannot hide.

        ZeRO paper section 5.1 (per rank, N ranks): stage 1 keeps params + grads + state/N, stage 2
        params + (grads + state)/N, stage 3 (params + grads + state)/N. FSDP2 specifics on top (PyTorch
        FSDP2 design, torch/distributed/fsdp/_fully_shard): the sharded parameters always stay resident;
        stage 2 (reshard_after_forward=False) keeps each block's gathered parameters from its forward to
        the end of its backward; stage 3 gathers one block at a time plus the next one prefetched, and the
        root module (embeddings, head: everything outside the repeated blocks) stays gathered through the
        step; each block's unsharded gradient is the reduce-scatter input in its backward.
        """
        n = _world_size(profile, sim.world_size)
        stage = config.stage
        if n <= 1:
            sim.notes.append(f"sharding stage {stage}: world size 1 (profile taken without torchrun): no effect; "
                             "profile under `torchrun --nproc-per-node N` to model it")
            return
        sim.world_size = n
        f = 1.0 / n
        ag_bw, rs_bw, note = _bandwidths(profile)
        if note:
            sim.notes.append(note)
        ag = lambda b: b * (n - 1) / n / (ag_bw * 1e9)  # nccl-tests bus-bandwidth convention
        rs = lambda b: b * (n - 1) / n / (rs_bw * 1e9)
        sim.opt_state_bytes *= f
        sim.opt_transient_bytes *= f
        sim.opt_s *= f  # each rank updates only its shard
        if stage == 1:
            # ZeroRedundancyOptimizer broadcasts each rank's updated shard after the step: an all-gather of
            # the parameters that nothing overlaps (step() returns after it).
            sim.comm_s += ag(sim.param_bytes)
            sim.notes.append(f"sharding stage 1: optimizer state / {n} per rank; parameter all-gather after the "
                             f"step {ag(sim.param_bytes) * 1e3:.3g} ms not hidden")
            return

        total_p = sim.param_bytes
        total_g = sim.grad_bytes
        rep = [b for b in sim.blocks if b.kind == "repeated"]
        rep_p = sum(b.param_bytes for b in rep)
        root_p = max(0.0, total_p - rep_p)  # root FSDP group: everything outside the repeated blocks
        root_g = max(0.0, total_g - sum(b.grad_bytes for b in rep))
        full_p = {id(b): b.param_bytes for b in sim.blocks}
        if stage == 2:
            sim.param_bytes = total_p * f + total_p
        else:
            sim.param_bytes = total_p * f + root_p
            for i, b in enumerate(rep):
                nxt = rep[i + 1].param_bytes if i + 1 < len(rep) else 0.0
                b.gather_bytes = b.param_bytes + nxt
        full_g = {id(b): b.grad_bytes for b in sim.blocks}
        for b in sim.blocks:
            if b.kind == "repeated":
                b.bwd_transient += b.grad_bytes  # unsharded gradient: the reduce-scatter input
                b.param_bytes *= f if stage == 3 else 1 + f  # resident: shard (+ gathered copy, stage 2)
            else:
                b.param_bytes *= 1 + f  # root group: shard + gathered copy through the step
            b.grad_bytes *= f
        sim.grad_bytes = total_g * f
        sim.master_bytes *= f

        # communication: forward gathers the root, then each block's gather hides behind the previous
        # block's forward (FSDP2 implicit forward prefetch); backward hides block i's gather (stage 3)
        # and block i+1's reduce-scatter behind block i+1's backward (explicit backward prefetch);
        # the root's gather and reduce-scatter have nothing to hide behind.
        first = min((b_i for b_i, b in enumerate(sim.blocks) if b.kind == "repeated"), default=len(sim.blocks))
        pre_fwd = sum(b.fwd_s for b in sim.blocks[:first] if b.kind != "repeated")
        post_bwd = sum(b.bwd_s for b in sim.blocks[first:] if b.kind != "repeated")
        pre_bwd = sum(b.bwd_s for b in sim.blocks[:first] if b.kind != "repeated")
        exposed = ag(root_p) + rs(root_g)
        prev_fwd = pre_fwd
        for b in rep:
            exposed += max(0.0, ag(full_p[id(b)]) - prev_fwd)
            prev_fwd = b.fwd_s
        gather_bwd = (lambda b: ag(full_p[id(b)])) if stage == 3 else (lambda b: 0.0)
        if rep:
            exposed += max(0.0, gather_bwd(rep[-1]) - post_bwd)
            for i in range(len(rep) - 2, -1, -1):
                later = rep[i + 1]
                exposed += max(0.0, gather_bwd(rep[i]) + rs(full_g[id(later)]) - later.bwd_s)
            exposed += max(0.0, rs(full_g[id(rep[0])]) - pre_bwd)
        sim.comm_s += exposed

        if config.offload:
            # CPUOffloadPolicy: sharded params, grads and state live on the host; each step copies the
            # sharded params to the device (before all-gather) and the sharded grads back.
            sim.opt_state_host_bytes += sim.opt_state_bytes
            sim.opt_state_bytes = 0.0
            sim.param_bytes -= total_p * f
            sim.grad_bytes = 0.0
            for b in sim.blocks:
                b.param_bytes -= full_p[id(b)] * f
                b.grad_bytes = 0.0
            sim.opt_h2d_bytes += total_p * f
            sim.opt_d2h_bytes += total_g * f
            sim.notes.append("sharding offload: the optimizer step runs on the host (its CPU time is not modelled)")
        sim.notes.append(
            f"sharding stage {stage} over {n} ranks: grads and optimizer state / {n}"
            + (f", parameters / {n} (blocks gathered one at a time + one prefetched)" if stage == 3
               else ", parameters gathered from forward to backward")
            + f"; communication not hidden {exposed * 1e3:.3g} ms"
            + (" (the script's DDP all-reduce time, in the profile's step time, is not subtracted)"
               if profile.ddp else "")
        )

    # --- live run --------------------------------------------------------------------------------
    def install(self, config: ShardingConfig, session: Any) -> Undo:
        """Before the script: stages 2/3 make `DistributedDataParallel(model, ...)` return `model`; stage 1
        only records which DDP wraps which model (the Session hands `apply` the unwrapped model)."""
        import os

        if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
            from memtune.distributed import require_process_group

            require_process_group(f"sharding stage {config.stage}")
        return take_over_ddp(replace=config.stage != 1)

    def apply(self, ctx: ApplyContext, config: ShardingConfig) -> Undo:
        from memtune.distributed import require_process_group

        stage = config.stage
        w = require_process_group(f"sharding stage {stage}")
        for opt in ctx.optimizers:
            if opt.state:
                raise EnvironmentNotSupported(
                    "sharding must be applied before the first optimizer step (the optimizer already has state): "
                    "apply the plan through `memtune apply`, which patches before the first forward")
        cpu_offload = False
        if stage == 1:
            _apply_zero1(ctx)
        else:
            cpu_offload = _apply_fsdp(ctx, config, stage)
        ctx.sharding = ShardingState(stage=stage, world_size=w.world_size, cpu_offload=cpu_offload)
        # Nothing to undo in place: the sharded module and optimizer live until the script ends.
        return noop


# --- helpers ---------------------------------------------------------------------------------------

def _world_size(profile: Profile, hint: int = 1) -> int:
    return max(int(hint or 1), int(profile.world_size or 1), int(profile.hardware.world_size or 1))


def _bandwidths(profile: Profile) -> tuple[float, float, str | None]:
    hw = profile.hardware
    ag, rs = hw.allgather_gbps, hw.reduce_scatter_gbps
    if ag and rs:
        return ag, rs, None
    guess = hw.h2d_gbps or _FALLBACK_GBPS
    return (ag or guess, rs or ag or guess,
            f"sharding: collective bandwidth not measured in the profile; assumed {guess:.3g} GB/s "
            "(profile under torchrun to measure all-gather/reduce-scatter)")


def _ddp_class():
    """The real DistributedDataParallel, also while `take_over_ddp` has a stand-in installed."""
    import torch.nn.parallel.distributed as pdist

    cls = pdist.DistributedDataParallel
    while cls.__dict__.get("_memtune_stand_in", False):
        cls = cls.__bases__[0]
    return cls


def take_over_ddp(replace: bool = True) -> Undo:
    """Make `DistributedDataParallel(model, ...)` return `model` itself (remembering what was asked), or
    with `replace=False` build the real DDP and remember which model it wraps.

    The script's DDP import happens after this (inside runpy), so patching the two module attributes it
    can be imported from is enough; a subclass (not a function) keeps `isinstance(x, DDP)` valid. The
    returned model gets `.module` (itself) and `.no_sync()` (FSDP2's set_requires_gradient_sync) so
    scripts that use those DDP members keep working.
    """
    import torch.nn.parallel as par
    import torch.nn.parallel.distributed as pdist

    real = _ddp_class()

    class ShardedDDP(real):  # type: ignore[misc, valid-type]
        """Stand-in installed by memtune's sharding plan: returns the module; FSDP2 shards it later."""

        def __new__(cls, module, *args, **kwargs):
            bound = inspect.signature(real.__init__).bind_partial(None, module, *args, **kwargs).arguments
            _INTERCEPTED[module] = {"process_group": bound.get("process_group"),
                                    "device_mesh": bound.get("device_mesh")}
            _add_ddp_members(module)
            return module

    class RecordedDDP(real):  # type: ignore[misc, valid-type]
        """The real DDP, remembered per wrapped model for ZeRO-1 (which needs its process group)."""

        def __init__(self, module, *args, **kwargs):
            super().__init__(module, *args, **kwargs)
            _WRAPPED_BY[module] = weakref.ref(self)

    stand_in = ShardedDDP if replace else RecordedDDP
    stand_in._memtune_stand_in = True
    stand_in.__name__ = stand_in.__qualname__ = "DistributedDataParallel"
    stand_in.__module__ = real.__module__
    saved = (par.DistributedDataParallel, pdist.DistributedDataParallel)
    par.DistributedDataParallel = pdist.DistributedDataParallel = stand_in

    def undo() -> None:
        par.DistributedDataParallel, pdist.DistributedDataParallel = saved

    return undo


def _add_ddp_members(module: torch.nn.Module) -> None:
    ref = weakref.ref(module)

    @contextlib.contextmanager
    def no_sync():
        m = ref()
        fsdp = m is not None and hasattr(m, "set_requires_gradient_sync")
        if fsdp:
            m.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            if fsdp:
                m.set_requires_gradient_sync(True)

    # object.__setattr__: plain attributes, not registered submodules (no recursion, no state-dict keys);
    # `module` refers to the model itself (a cycle the garbage collector handles)
    for name, value in (("module", module), ("no_sync", no_sync)):
        if name not in module.__dict__ and not hasattr(type(module), name) and name not in module._modules:
            object.__setattr__(module, name, value)


def _intercepted_root(model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, Any]] | None:
    if model in _INTERCEPTED:
        return model, _INTERCEPTED[model]
    for m in model.modules():
        if m in _INTERCEPTED:
            return m, _INTERCEPTED[m]
    return None


# --- stage 1 ---------------------------------------------------------------------------------------

def _apply_zero1(ctx: ApplyContext) -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    ddp = ctx.model if isinstance(ctx.model, _ddp_class()) else None
    if ddp is None:  # the Session hands over the module inside the script's DDP
        ref = _WRAPPED_BY.get(ctx.model)
        ddp = ref() if ref is not None else None
    if ddp is None:
        raise EnvironmentNotSupported(
            "sharding stage 1 (ZeroRedundancyOptimizer) shards the optimizer of a data-parallel run, but the "
            "script does not wrap its model in DistributedDataParallel, so gradients are not averaged across "
            "ranks: wrap it in DDP, or use stage 2/3 (FSDP averages gradients itself)")
    params = {id(p) for p in ctx.model.parameters()}
    done = 0
    for opt in ctx.optimizers:
        if isinstance(opt, ZeroRedundancyOptimizer):
            continue
        if not all(id(p) in params for g in opt.param_groups for p in g["params"]):
            ctx.note("sharding", f"left {type(opt).__name__} alone: it holds parameters outside the model")
            continue
        to_zero_in_place(opt, ddp.process_group)
        done += 1
    ctx.note("sharding", f"stage 1: {done} optimizer(s) now ZeroRedundancyOptimizer (state sharded over "
                         f"{ddp.process_group.size()} ranks); DDP kept for the gradient all-reduce")


def to_zero_in_place(opt: torch.optim.Optimizer, process_group: Any = None) -> torch.optim.Optimizer:
    """Turn `opt` into a ZeroRedundancyOptimizer of its own class, keeping the object (schedulers hold it)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    cls = type(opt)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in opt.defaults.items() if k in accepted and k != "params"}
    # each group keeps its own keys (lr, weight_decay, a scheduler's initial_lr): ZeRO's local optimizer
    # gets per-rank groups carrying them, and syncs the public param_groups into it at every step
    groups = [dict(g, params=list(g["params"])) for g in opt.param_groups]
    zero = ZeroRedundancyOptimizer(groups, optimizer_class=cls, process_group=process_group, **kwargs)
    inner = zero.optim
    # The local step must not count as a training step for global optimizer hooks (memtune's step
    # counter among them): call the local class's step below its hook wrapper.
    step = type(inner).step
    if getattr(step, "hooked", False) and hasattr(step, "__wrapped__"):
        inner.step = types.MethodType(step.__wrapped__, inner)
    old = opt.__dict__
    new = zero.__dict__
    for key in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                "_optimizer_load_state_dict_post_hooks", "_optimizer_state_dict_pre_hooks",
                "_optimizer_state_dict_post_hooks"):
        if key in old:
            new[key] = old[key]  # hooks registered on the script's optimizer keep firing
    opt.__class__ = ZeroRedundancyOptimizer
    opt.__dict__ = new
    if getattr(old.get("step"), "_wrapped_by_lr_sched", False):
        # an LR scheduler wrapped the old class's step on the instance: wrap ZeRO's the same way
        ref = weakref.ref(opt)
        zstep = ZeroRedundancyOptimizer.step

        def wrapper(*args, **kwargs):
            o = ref()
            o._opt_called = True
            return zstep(o, *args, **kwargs)

        wrapper._wrapped_by_lr_sched = True
        new["step"] = wrapper
    return opt


# --- stages 2 and 3 --------------------------------------------------------------------------------

def _policies(ctx: ApplyContext, config: ShardingConfig, stage: int) -> tuple[dict[str, Any], list[str]]:
    """fully_shard keyword policies the plan asks for, and what they mean (for the notes)."""
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    kwargs: dict[str, Any] = {}
    said: list[str] = []
    want_offload = bool(config.offload) or ctx.facts.update_on_host
    if want_offload:
        if ctx.device.type == "cpu":
            said.append("offload asked but the run is already on the host: CPUOffloadPolicy not used")
        else:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
            said.append("CPUOffloadPolicy: sharded params, grads and optimizer state on pinned host memory, "
                        "optimizer step on the host")
    low = _LOW.get(str(ctx.facts.params_dtype or "").lower())
    if low:
        dt = getattr(torch, low)
        current = {p.dtype for p in ctx.model.parameters() if p.is_floating_point()}
        if current == {dt}:
            said.append(f"parameters already {low} (precision section): no MixedPrecisionPolicy, "
                        f"gradients reduced in {low}")
        else:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dt, reduce_dtype=torch.float32)
            said.append(f"MixedPrecisionPolicy: all-gather and compute in {low}, gradients reduced in float32, "
                        "sharded parameters kept in their own dtype")
    return kwargs, said


def _apply_fsdp(ctx: ApplyContext, config: ShardingConfig, stage: int) -> bool:
    """fully_shard the blocks and the root; True when FSDP2 offloads to the host (CPUOffloadPolicy)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    if isinstance(ctx.model, _ddp_class()):
        raise EnvironmentNotSupported(
            f"sharding stage {stage} must take over the script's DistributedDataParallel wrapping before it "
            "happens: run the script through `torchrun ... -m memtune apply PLAN` (its install step does that)")
    found = _intercepted_root(ctx.model)
    if found is None:
        raise EnvironmentNotSupported(
            f"sharding stage {stage} shards a data-parallel run, but the script does not wrap its model in "
            "DistributedDataParallel (each rank trains on its own): wrap it in DDP in the script, and run "
            "through `torchrun ... -m memtune apply PLAN`")
    root, asked = found
    mesh = asked.get("device_mesh")
    if mesh is None:
        group = asked.get("process_group") or dist.group.WORLD
        mesh = DeviceMesh.from_group(group, ctx.device.type)
    kwargs, said = _policies(ctx, config, stage)

    # FSDP2 registers new DTensor Parameters: remember each old parameter's name to re-point optimizers
    names = {id(p): n for n, p in root.named_parameters(remove_duplicate=False)}
    inside = {id(m) for m in root.modules()}
    blocks = [b for b in ctx.blocks if b.kind == "repeated" and id(b.module) in inside and b.module is not root]
    for b in blocks:
        fully_shard(b.module, mesh=mesh, reshard_after_forward=(stage == 3), **kwargs)
    # the root (embeddings, head: what the blocks leave) stays gathered from forward to backward in both
    # stages: stage 2 says so; for stage 3 FSDP2's default does it (its head is needed again at once)
    fully_shard(root, mesh=mesh, **({"reshard_after_forward": False} if stage == 2 else {}), **kwargs)
    new = dict(root.named_parameters(remove_duplicate=False))
    repointed = 0
    for opt in ctx.optimizers:
        for g in opt.param_groups:
            ps = []
            for p in g["params"]:
                n = names.get(id(p))
                if n is not None:
                    ps.append(new[n])
                    repointed += 1
                else:
                    ps.append(p)
            g["params"] = ps
    ctx.note("sharding", f"stage {stage}: fully_shard on {len(blocks)} blocks + root over {mesh.size()} ranks "
                         f"(reshard_after_forward={stage == 3}); the script's DDP wrapping replaced; "
                         f"{repointed} optimizer parameters re-pointed to the sharded ones")
    for s in said:
        ctx.note("sharding", s)
    return "offload_policy" in kwargs
