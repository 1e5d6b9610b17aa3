"""Cost model: simulate one training step block by block and predict its peak memory and time.

CONTRACT (stable; strategies' `effect()` write these fields, the simulator reads them):
`build_sim(profile, batch_size=None) -> SimStep` fills the step as the profile measured it; each plan
section's strategy `effect(profile, section, sim)` then changes it, in strategy order; `simulate(sim)`
walks the timeline (forward keeps each block's `kept_bytes`; backward re-materializes `bwd_extra_bytes`,
frees the block's activations and creates its gradients; the optimizer step adds its transient) and
returns an `Estimate`. The implementation lives below the dataclasses.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memtune.errors import InputError

if TYPE_CHECKING:
    from memtune.plan import Plan
    from memtune.profile import BlockProfile, Profile


@dataclass
class BlockSim:
    name: str
    kind: str = "repeated"  # "repeated" or "other"
    act_bytes: float = 0.0  # saved for backward by the unmodified block (profile)
    input_bytes: float = 0.0
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    fwd_transient: float = 0.0
    bwd_transient: float = 0.0
    param_bytes: float = 0.0  # device-resident parameter bytes of this block
    grad_bytes: float = 0.0  # gradient bytes created in its backward
    # --- set by strategies' effect() ---
    mode: str = "keep"  # keep | recompute | selective | offload | compress | compress+offload
    kept_bytes: float | None = None  # on device from its forward to its backward; None -> act_bytes
    bwd_extra_bytes: float = 0.0  # extra live bytes during its backward (re-materialized activations)
    recompute_s: float = 0.0  # extra forward time during backward
    d2h_bytes: float = 0.0  # copied to the host during forward (overlaps later blocks' forward)
    h2d_bytes: float = 0.0  # copied back during backward (prefetched one block ahead)
    extra_fwd_s: float = 0.0  # kernel time added to forward (e.g. compression pack)
    extra_bwd_s: float = 0.0  # kernel time added to backward (e.g. unpack)
    gather_bytes: float = 0.0  # transient all-gathered parameters while it runs (sharding stage 3)
    # part of act_bytes that is autocast's 16-bit copies of fp32 weights (batch-independent); a strategy
    # that makes the weights 16-bit removes it with `drop_autocast_copies(sim)`
    autocast_copy_bytes: float = 0.0

    @property
    def kept(self) -> float:
        return self.act_bytes if self.kept_bytes is None else self.kept_bytes


@dataclass
class SimStep:
    blocks: list[BlockSim] = field(default_factory=list)
    param_bytes: float = 0.0  # device-resident parameters (all blocks + anything outside blocks)
    master_bytes: float = 0.0  # fp32 master copies kept on device (precision)
    buffer_bytes: float = 0.0
    grad_bytes: float = 0.0  # all gradients, if they all coexist before the optimizer step
    grads_persist: bool = False  # gradients allocated for the whole step (set_to_none=False, accumulation)
    grads_freed_in_backward: bool = False  # update in backward: each gradient consumed at once
    opt_state_bytes: float = 0.0  # on device
    opt_state_host_bytes: float = 0.0  # optimizer state offloaded to pinned host memory
    opt_transient_bytes: float = 0.0  # extra live bytes during optimizer.step()
    opt_s: float = 0.0  # optimizer step seconds not hidden behind anything
    opt_overlap_s: float = 0.0  # optimizer work that overlaps the backward (offloaded CPU update)
    opt_h2d_bytes: float = 0.0  # per-step transfers of an offloaded optimizer
    opt_d2h_bytes: float = 0.0
    other_act_bytes: float = 0.0  # saved for backward outside every block (loss etc.)
    loss_transient_bytes: float = 0.0  # live at the loss, on top of the kept activations
    fixed_bytes: float = 0.0  # inputs/labels and whatever else sits on device at step start
    calib_bytes: float = 0.0  # what the profile's measured peak leaves unexplained (allocator, workspace)
    output_bytes: float = 0.0  # the model's output (logits): live from the end of forward into the loss
    # how far the measured peak before backward (the loss's forward, autocast's weight copies still cached)
    # lay under the modelled loss event in the unchanged step; None when the profile did not measure it
    loss_fwd_gap_bytes: float | None = None
    other_s: float = 0.0  # step time outside blocks and optimizer (data loading, loss, glue)
    extra_s: float = 0.0  # time added by strategies outside any block
    comm_s: float = 0.0  # communication not hidden (sharding)
    h2d_gbps: float = 0.0
    d2h_gbps: float = 0.0
    world_size: int = 1
    micro_batches: int = 1  # forwards+backwards per optimizer step
    batch_size: int | None = None
    tokens_per_step: int | None = None
    lossy: list[str] = field(default_factory=list)  # sections that change the numbers
    notes: list[str] = field(default_factory=list)  # explanations a person reads in `estimate`


@dataclass
class Estimate:
    peak_bytes: float
    peak_phase: str  # "forward", "loss", "backward", "optimizer"
    peak_where: str | None  # block at the peak, when any
    step_s: float
    throughput: float  # samples/s when the batch size is known, else steps/s
    throughput_unit: str  # "samples/s" or "steps/s"
    breakdown: dict[str, float]  # bytes at the peak by component
    time_breakdown: dict[str, float] = field(default_factory=dict)
    timeline: list[tuple[str, float]] = field(default_factory=list)  # (event, live bytes) over one step
    host_bytes: float = 0.0  # pinned host memory the plan needs
    lossy: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


# =====================================================================================================
# Implementation
# =====================================================================================================
# Sources cited below:
#   [alloc]  PyTorch CUDA caching allocator: `max_memory_allocated` counts live tensor blocks, so the
#            peak of a step is the peak of the sum of live tensors over its timeline (torch.cuda memory docs).
#   [ckpt]   Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost": a recomputed segment keeps
#            its input and re-creates its activations during its own backward.
#   [offl]   torchtune `_activation_offloading.py` / ZeRO-Offload (Ren et al. 2021): saved tensors go to
#            host memory on a side stream during forward and come back one block ahead during backward.
#   [adam]   torch.optim.adam `_multi_tensor_adam` (foreach, the CUDA default): `_foreach_sqrt` of the
#            second moments allocates one temporary per parameter for the step; `fused=True` allocates none.
#   [amp]    torch.autocast caches the low-precision copy of each weight it casts for the rest of the
#            autocast region and matmuls save that copy for backward: bytes that do not scale with the batch.
#   [kaplan] Kaplan et al. 2020 and nanoGPT bench.py: at fixed sequence length activations and matmul time
#            grow linearly with the batch; we fit a line through one profile (through the origin, fixed
#            parts apart) or through two profiles at different batch sizes.
#   [data]   measured on an H100 with benchmarks/accuracy.py; numbers in docs/accuracy.md.
#   [probe]  the profiler's what-if run (profilers/runner.py `_saved_bytes_bf16_params`): one block of each
#            repeated class re-run with bf16 weights and bf16 inputs under the script's autocast, saved bytes
#            counted like the memory step's (`BlockProfile.activation_bytes_bf16_params`).

# Host<->device bandwidth when the profile measured none (CPU profile): PCIe 4.0 x16 moves ~25 GB/s
# pinned in practice (NVIDIA bandwidthTest on A100/H100 hosts); only used to rank plans on a CPU profile.
DEFAULT_PCIE_GBPS = 25.0

# How the unexplained remainder of the measured baseline peak carries to other plans and batch sizes:
# "additive" (a constant: allocator rounding, cuBLAS/cuDNN workspaces) or "proportional" (a fraction of
# the simulated peak). On the H100 data [data] the whole shortfall sat in the loss region (GPT-125m
# 0.006 GiB, GPT-350m 0.002 GiB, Llama-1.1B 1.47 GiB), where it is logit-sized and scales with the batch
# (`_calibration`); the remainder after it was 0 for all three, so the choice made no measurable
# difference there; additive is kept because workspace and rounding bytes do not grow with the plan.
CALIBRATION = "additive"

_LOW_PRECISION = {"bfloat16", "bf16", "float16", "fp16", "half", "torch.bfloat16", "torch.float16"}


def _autocast_fixed_bytes(profile: Profile, b: BlockProfile) -> float:
    """Activation bytes of block `b` that do not scale with the batch: the autocast weight copies [amp]."""
    if (profile.autocast or "").lower() not in _LOW_PRECISION or "embedding" in b.cls.lower():
        return 0.0  # an embedding lookup is not on autocast's cast list, so it saves no weight copy
    fp32 = float(b.param_bytes.get("float32", 0))
    return min(float(b.activation_bytes), fp32 / 2.0)  # one 16-bit copy per fp32 weight


def _block_times(profile: Profile) -> dict[str, tuple[float, float]]:
    """Per-block (fwd_s, bwd_s) per micro-batch, from CUDA events around each block (profilers/runner.py).

    The run-level `fwd_s`/`bwd_s` come from clean steps without per-block hooks; when the blocks add up to
    more than those (hooks slowed the launch), they are scaled down to them; what the blocks leave of a
    clean forward/backward is glue inside the model (embedding adds, the loss when the model computes it).
    """
    sf = sum(b.fwd_s for b in profile.blocks)
    sb = sum(b.bwd_s for b in profile.blocks)
    kf = min(1.0, profile.fwd_s / sf) if profile.fwd_s > 0 and sf > 0 else 1.0
    kb = min(1.0, profile.bwd_s / sb) if profile.bwd_s > 0 and sb > 0 else 1.0
    return {b.name: (b.fwd_s * kf, b.bwd_s * kb) for b in profile.blocks}


def _opt_s(profile: Profile) -> float:
    return profile.optimizer_s or sum(o.step_s for o in profile.optimizers)


def _split_time(profile: Profile) -> tuple[float, float]:
    """(glue_s, outside_s) of one step: inside the model's forward/backward but outside every block
    (scales with the batch), and outside the model and the optimizer (loss when the script computes it,
    clipping, data, zero_grad; mostly fixed)."""
    times = _block_times(profile)
    m = max(1, profile.micro_batches_per_step)
    blocks_f = sum(f for f, _ in times.values())
    blocks_b = sum(b for _, b in times.values())
    fwd = max(profile.fwd_s, blocks_f)
    bwd = max(profile.bwd_s, blocks_b)
    glue = m * ((fwd - blocks_f) + (bwd - blocks_b))
    outside = max(0.0, profile.step_s - m * (fwd + bwd) - _opt_s(profile))
    return glue, outside


def _last_block(profile: Profile) -> BlockProfile | None:
    return max(profile.blocks, key=lambda b: b.index) if profile.blocks else None


def _states_at_start(profile: Profile) -> float:
    return (profile.param_bytes + profile.buffer_bytes + profile.optimizer_state_bytes
            + ((profile.grad_bytes or profile.trainable_param_bytes) if profile.grads_persist else 0))


def _values(profile: Profile) -> dict[str, float]:
    """Quantities that change with the batch size, flat: 'block:<name>:<field>' or '<field>'."""
    v: dict[str, float] = {}
    times = _block_times(profile)
    for b in profile.blocks:
        k = f"block:{b.name}:"
        v[k + "act"] = float(b.activation_bytes)
        v[k + "input"] = float(b.input_bytes)
        v[k + "fwd_transient"] = float(b.transient_bytes)
        v[k + "bwd_transient"] = float(b.bwd_transient_bytes)
        v[k + "fwd_s"], v[k + "bwd_s"] = times[b.name]
    v["other_act"] = float(profile.other_activation_bytes)
    v["loss_transient"] = float(profile.loss_transient_bytes)
    last = _last_block(profile)
    v["output"] = float(last.output_bytes) if last else 0.0
    # what the step starts with beyond the model states: inputs, labels and whatever the script still
    # holds from the last step (its logits and loss): batch-sized
    v["fixed"] = max(0.0, float(profile.step_start_bytes) - _states_at_start(profile))
    v["glue_s"], v["outside_s"] = _split_time(profile)
    return v


# Share of the step time outside the model and the optimizer that grows with the batch (the loss when the
# script computes it, the input copy); the rest (clipping, zero_grad, scheduler, Python) does not. [data]
OUTSIDE_BATCH_SHARE = 0.5
# Share of a block's measured time that does not shrink or grow with the batch: kernel launches the GPU
# waits for and matmuls below full occupancy. Fitted on the batch-size plans in docs/accuracy.md [data]
# (GPT-125m at 4/16/24 against 8, Llama-1.1B at 2 against 4, H100): a line through the origin
# mispredicted those step times by 20-27%.
BLOCK_TIME_FIXED_SHARE = 0.4


def _fixed_parts(profile: Profile) -> dict[str, float]:
    """The part of each value that a single profile says does not scale with the batch."""
    fixed = {f"block:{b.name}:act": _autocast_fixed_bytes(profile, b) for b in profile.blocks}
    times = _block_times(profile)
    for b in profile.blocks:
        for k in ("fwd_s", "bwd_s"):
            fixed[f"block:{b.name}:{k}"] = BLOCK_TIME_FIXED_SHARE * times[b.name][k == "bwd_s"]
    fixed["outside_s"] = (1 - OUTSIDE_BATCH_SHARE) * _split_time(profile)[1]
    return fixed


def _fit_one(profile: Profile) -> dict[str, list[float]]:
    """value(B) = fixed + (value - fixed) * B / B0: proportional through the profile's point [kaplan]."""
    b0 = profile.batch_size or 1
    fixed = _fixed_parts(profile)
    out = {}
    for k, v in _values(profile).items():
        f = min(fixed.get(k, 0.0), v)
        out[k] = [f, (v - f) / b0]
    return out


# Phases of the measured peak that the block timeline does not resolve: the loss's forward and backward
# (inside the "loss" interval when the script computes the loss, in the glue after the last block and
# before the first block's backward when the model computes it, as transformers models do).
_LOSS_REGION = {("loss", None), ("forward", None), ("backward", None)}


def _calibration(profile: Profile) -> tuple[float, float]:
    """(loss_extra, residual) at the profile's own batch size: how far the modelled baseline falls short of
    the measured allocator peak [alloc].

    When the measured peak happened in the loss region, the shortfall is working memory of the loss
    (logit-sized: it grows with the batch) and is added to the loss's transient; whatever is left is a
    constant (allocator rounding, library workspaces) [data]."""
    return _calibrate(profile)[:2]


def _calibrate(profile: Profile) -> tuple[float, float, float | None]:
    """`_calibration`'s two numbers, and the loss-forward gap: the calibrated (first) loss event of the
    unchanged step less the peak the profiler measured before backward was called (`forward_peak_bytes`;
    None for profiles without it). Calibrated at the profile's batch, that event is the uncalibrated one
    plus loss_extra (its transient) plus residual (every event's constant)."""
    if not profile.peak.measured or profile.peak.allocated_bytes <= 0:
        return 0.0, 0.0, None  # a CPU profile's peak is the sum of our own parts: nothing to calibrate against
    measured = float(profile.peak.allocated_bytes)
    fwd_peak = profile.extra.get("forward_peak_bytes")
    in_loss = (profile.peak.phase, profile.peak.where) in _LOSS_REGION
    sim = build_sim(profile, calibrate=False)
    raw = dict(simulate(sim).timeline) if in_loss or fwd_peak else {}
    last_loss = "loss" if sim.micro_batches == 1 else f"mb{sim.micro_batches - 1}/loss"
    loss_extra = 0.0
    if in_loss and raw.get(last_loss) is not None:
        loss_extra = max(0.0, measured - raw[last_loss])
        sim.loss_transient_bytes += loss_extra
    residual = measured - simulate(sim).peak_bytes
    first_loss = raw.get("loss" if sim.micro_batches == 1 else "mb0/loss")
    gap = first_loss + loss_extra + residual - float(fwd_peak) if fwd_peak and first_loss is not None else None
    return loss_extra, residual, gap


def fit_batch(profile: Profile, other: Profile) -> Profile:
    """A copy of `profile` whose batch scaling is the line through it and `other` (same script and model,
    another batch size) [kaplan]. The calibration is fitted the same way, so the two measured peaks decide
    how much of it grows with the batch."""
    b1, b2 = profile.batch_size, other.batch_size
    if not b1 or not b2:
        raise InputError("fitting two profiles needs both batch sizes: profile scripts whose inputs show the batch")
    if b1 == b2:
        raise InputError(f"both profiles have batch size {b1}: profile the script again at another --batch-size")
    names1, names2 = [b.name for b in profile.blocks], [b.name for b in other.blocks]
    if names1 != names2:
        raise InputError("the two profiles have different blocks: profile the same model at two batch sizes")
    one = _fit_one(profile)
    v1, v2 = _values(profile), _values(other)
    coef: dict[str, list[float]] = {}
    for k, (f, s) in one.items():
        slope = (v2[k] - v1[k]) / (b2 - b1)
        if slope < 0 and not k.endswith("_s"):
            coef[k] = [f, s]  # a negative bytes slope is measurement noise: keep the single-profile line
            continue
        coef[k] = [v1[k] - slope * b1, slope]
    (l1, r1), (l2, r2) = _calibration(profile), _calibration(other)

    def line(y1: float, y2: float) -> list[float]:
        s = (y2 - y1) / (b2 - b1)
        return [y1 - s * b1, s]

    p = copy.deepcopy(profile)
    p.extra = dict(p.extra)
    p.extra["batch_fit"] = {"batch_sizes": [b1, b2], "coef": coef,
                            "loss_extra": line(l1, l2), "residual": line(r1, r2)}
    p.notes = [*p.notes, f"batch scaling fitted through batch sizes {b1} and {b2}"]
    return p


def _optimizer_transient(profile: Profile) -> float:
    """Extra live bytes inside optimizer.step() [adam]; a profile's own measurement wins when it has one."""
    if "optimizer_transient_bytes" in profile.extra:
        return float(profile.extra["optimizer_transient_bytes"])
    total = 0.0
    for o in profile.optimizers:
        hp = o.hyperparams or {}
        if hp.get("fused"):
            continue
        foreach = hp.get("foreach")
        if foreach is None:
            foreach = profile.device == "cuda"  # torch picks foreach on CUDA, the per-tensor loop on CPU
        # foreach Adam-family: one sqrt(v) temporary per parameter [adam]; the per-tensor loop (CPU
        # default) holds one tensor's worth at a time, which is negligible
        if foreach and o.kind.lower() in ("adam", "adamw", "nadam", "radam", "adamax"):
            total += o.param_bytes
    return total


def build_sim(profile: Profile, batch_size: int | None = None, *, calibrate: bool = True) -> SimStep:
    """The step as the profile measured it, at `batch_size` (default: the profile's own)."""
    b0 = profile.batch_size
    if batch_size is not None and batch_size <= 0:
        raise InputError(f"batch size {batch_size} must be a positive integer")
    if batch_size is not None and not b0 and batch_size != b0:
        raise InputError(
            f"cannot scale to batch size {batch_size}: the profile does not know its own batch size "
            "(its inputs did not show it); estimate without --batch-size"
        )
    bs = batch_size if batch_size is not None else b0
    fit = profile.extra.get("batch_fit")
    coef = fit["coef"] if fit else _fit_one(profile)
    if b0 and bs:
        val = {k: max(0.0, a + s * bs) for k, (a, s) in coef.items()}  # [kaplan]
    else:
        val = _values(profile)

    sim = SimStep(batch_size=bs)
    for b in sorted(profile.blocks, key=lambda x: x.index):  # forward order
        k = f"block:{b.name}:"
        sim.blocks.append(BlockSim(
            name=b.name, kind=b.kind,
            act_bytes=val[k + "act"], input_bytes=val[k + "input"],
            fwd_s=val[k + "fwd_s"], bwd_s=val[k + "bwd_s"],
            fwd_transient=val[k + "fwd_transient"], bwd_transient=val[k + "bwd_transient"],
            param_bytes=float(sum(b.param_bytes.values())),
            grad_bytes=float(b.trainable_param_bytes),  # a gradient has its parameter's dtype and shape
            autocast_copy_bytes=min(val[k + "act"], _autocast_fixed_bytes(profile, b)),
        ))
    sim.param_bytes = float(profile.param_bytes)
    sim.buffer_bytes = float(profile.buffer_bytes)
    sim.grad_bytes = float(profile.grad_bytes or profile.trainable_param_bytes)
    sim.grads_persist = bool(profile.grads_persist)
    sim.opt_state_bytes = float(profile.optimizer_state_bytes)
    sim.opt_transient_bytes = _optimizer_transient(profile)
    sim.opt_s = _opt_s(profile)
    sim.other_act_bytes = val["other_act"]
    sim.loss_transient_bytes = val["loss_transient"]
    sim.output_bytes = val.get("output", 0.0)
    sim.fixed_bytes = val.get("fixed", 0.0)
    sim.other_s = val.get("glue_s", 0.0) + val.get("outside_s", 0.0)
    sim.h2d_gbps = profile.hardware.h2d_gbps or DEFAULT_PCIE_GBPS
    sim.d2h_gbps = profile.hardware.d2h_gbps or DEFAULT_PCIE_GBPS
    sim.world_size = max(1, profile.world_size)
    sim.micro_batches = max(1, profile.micro_batches_per_step)
    if profile.tokens_per_step and b0 and bs:
        sim.tokens_per_step = int(profile.tokens_per_step * bs / b0)
    else:
        sim.tokens_per_step = profile.tokens_per_step

    if calibrate and profile.peak.measured and profile.peak.allocated_bytes > 0:
        loss_extra, residual, gap = _calibrate(profile)
        if fit and "residual" in fit and bs:
            la, ls = fit["loss_extra"]
            ra, rs = fit["residual"]
            sim.loss_transient_bytes += max(0.0, la + ls * bs)  # both fitted through two measured peaks
            sim.calib_bytes = ra + rs * bs
        else:
            sim.loss_transient_bytes += loss_extra * (bs / b0 if b0 and bs else 1.0)  # logit-sized
            if CALIBRATION == "proportional" and residual:
                base_sim = build_sim(profile, calibrate=False)
                base_sim.loss_transient_bytes += loss_extra
                base = simulate(base_sim).peak_bytes  # = measured - residual
                now = simulate(copy.deepcopy(sim)).peak_bytes
                sim.calib_bytes = residual / base * now if base > 0 else 0.0
            else:
                sim.calib_bytes = residual
        if gap is not None:
            sim.loss_fwd_gap_bytes = gap * (bs / b0 if b0 and bs else 1.0)  # logit-sized, like the loss's
    if not profile.peak.measured:
        sim.notes.append("CPU profile: the peak is the sum of the modelled parts, not an allocator reading")
    return sim


# --- the timeline -----------------------------------------------------------------------------------

_COMPONENTS = ("parameters", "master weights", "buffers", "gradients", "optimizer state",
               "activations kept", "autocast weight copies", "model output", "recompute working set",
               "transient", "gathered parameters", "inputs and fixed", "allocator overhead")


def _memory(sim: SimStep) -> tuple[list[tuple[str, str, str | None, dict[str, float]]], float]:
    """Walk one optimizer step; return events (name, phase, block, live bytes by component)."""
    events: list[tuple[str, str, str | None, dict[str, float]]] = []
    base = {
        "parameters": sim.param_bytes, "master weights": sim.master_bytes, "buffers": sim.buffer_bytes,
        "optimizer state": sim.opt_state_bytes, "inputs and fixed": sim.fixed_bytes,
        "allocator overhead": sim.calib_bytes,
    }
    block_grads = sum(b.grad_bytes for b in sim.blocks)
    grads = sim.grad_bytes if sim.grads_persist else 0.0

    def rec(name, phase, where, kept, grads_now, transient=0.0, recompute=0.0, gathered=0.0, output=0.0,
            copies=0.0):
        c = dict(base)
        c.update({"gradients": grads_now, "activations kept": kept, "model output": output,
                  "recompute working set": recompute, "transient": transient, "gathered parameters": gathered,
                  "autocast weight copies": copies})
        events.append((name, phase, where, c))

    for m in range(sim.micro_batches):
        pre = f"mb{m}/" if sim.micro_batches > 1 else ""
        # After the first micro-batch the accumulated gradients stay allocated [alloc].
        grads_exist = sim.grads_persist or m > 0
        kept = 0.0
        rec(f"{pre}start", "forward", None, kept, grads)
        for b in sim.blocks:
            # while a block runs its own saved tensors are on device (even when offloaded or recomputed
            # later), plus its largest working allocation
            rec(f"{pre}fwd:{b.name}", "forward", b.name, kept, grads,
                transient=max(b.fwd_transient, b.act_bytes if b.mode != "recompute" else 0.0),
                gathered=b.gather_bytes)
            kept += b.kept
        kept += sim.other_act_bytes
        if sim.loss_fwd_gap_bytes is not None:
            # the loss's forward: autocast's cache keeps the 16-bit weight copies of every block until the
            # autocast region ends (before backward), also of blocks whose saved tensors are gone [amp]
            _loss_forward(rec, f"{pre}loss forward", sim, kept, grads)
        # the model's output (logits) is live until the loss's backward has used it [alloc]
        rec(f"{pre}loss", "loss", None, kept, grads, transient=sim.loss_transient_bytes, output=sim.output_bytes)
        kept -= sim.other_act_bytes  # the loss's saved tensors go with its backward
        for b in reversed(sim.blocks):
            new = 0.0 if grads_exist else b.grad_bytes
            # re-materialized activations [ckpt][offl] + working set + the gradients it creates
            rec(f"{pre}bwd:{b.name}", "backward", b.name, kept, grads,
                transient=max(b.bwd_transient, new), recompute=b.bwd_extra_bytes, gathered=b.gather_bytes)
            kept -= b.kept
            if not sim.grads_freed_in_backward:
                grads += new
        if not grads_exist and not sim.grads_freed_in_backward:
            grads += max(0.0, sim.grad_bytes - block_grads)  # gradients of parameters outside the blocks
    rec("optimizer", "optimizer", None, 0.0, grads, transient=sim.opt_transient_bytes)
    return events, block_grads


def _loss_forward(rec, name: str, sim: SimStep, kept: float, grads: float) -> None:
    """The loss event less the measured forward-to-loss gap, plus the weight copies only the cache holds."""
    copies = sum(min(b.autocast_copy_bytes, max(0.0, b.act_bytes - b.kept)) for b in sim.blocks)
    gap = sim.loss_fwd_gap_bytes or 0.0
    transient = sim.loss_transient_bytes - gap
    output = sim.output_bytes + min(0.0, transient)  # a gap wider than the transient comes off the output,
    kept_now = kept + min(0.0, output)  # then off the activations
    rec(name, "loss", None, kept_now, grads, transient=max(0.0, transient), output=max(0.0, output),
        copies=copies)


def _step_time(sim: SimStep) -> dict[str, float]:
    """Seconds by part. Transfers run on their own copy engines (one per direction on H100) and only the
    part the compute cannot cover shows up [offl]."""
    h2d_bw = max(sim.h2d_gbps, 1e-3) * 1e9
    d2h_bw = max(sim.d2h_gbps, 1e-3) * 1e9
    # forward: block i's saved tensors leave once it ends; the copies queue on the d2h engine and
    # overlap the forwards of the blocks after i
    t = 0.0
    d2h_free = 0.0
    d2h_done: dict[str, float] = {}
    for b in sim.blocks:
        t += b.fwd_s + b.extra_fwd_s
        if b.d2h_bytes > 0:
            d2h_free = max(t, d2h_free) + b.d2h_bytes / d2h_bw
            d2h_done[b.name] = d2h_free
    fwd = t
    # backward: when the backward reaches a repeated block, the newest offloaded block before it whose
    # copy back has not started is fetched (strategies/offload.py: a prefetch queue that runs at least
    # one block ahead); a block whose tensors were not asked for yet fetches them itself. Copies queue
    # on the h2d engine and start once their d2h copy has finished; a block waits for its own.
    h2d_free = t
    compute_bwd = 0.0
    offloaded = [i for i, b in enumerate(sim.blocks) if b.h2d_bytes > 0]
    h2d_done: dict[int, float] = {}

    def fetch(i: int, at: float) -> None:
        nonlocal h2d_free
        b = sim.blocks[i]
        h2d_free = max(at, h2d_free, d2h_done.get(b.name, 0.0)) + b.h2d_bytes / h2d_bw
        h2d_done[i] = h2d_free

    for i in reversed(range(len(sim.blocks))):
        b = sim.blocks[i]
        if b.kind == "repeated":
            waiting = [j for j in offloaded if j < i and j not in h2d_done]
            if waiting:
                fetch(max(waiting), t)
        start = t
        if b.h2d_bytes > 0:
            if i not in h2d_done:
                fetch(i, t)
            start = max(t, h2d_done[i])
        work = b.bwd_s + b.recompute_s + b.extra_bwd_s
        compute_bwd += work
        t = start + work
    bwd_wall = t - fwd
    m = sim.micro_batches
    exposed = m * max(0.0, bwd_wall - compute_bwd)
    # An offloaded optimizer's gradient copies and CPU work overlap the backward; whatever is longer
    # than the backward shows, and the parameters coming back before the next forward do too [offl].
    bwd_total = m * compute_bwd
    overlap = sim.opt_overlap_s + sim.opt_d2h_bytes / d2h_bw
    opt = sim.opt_s + max(0.0, overlap - bwd_total) + sim.opt_h2d_bytes / h2d_bw
    return {
        "forward": m * sum(b.fwd_s for b in sim.blocks),
        "backward": m * sum(b.bwd_s for b in sim.blocks),
        "recompute": m * sum(b.recompute_s for b in sim.blocks),
        "kernels added": m * sum(b.extra_fwd_s + b.extra_bwd_s for b in sim.blocks),
        "exposed transfer": exposed,
        "optimizer": opt,
        "communication": sim.comm_s,
        "other": sim.other_s,
        "strategy extra": sim.extra_s,
    }


def simulate(sim: SimStep) -> Estimate:
    """Peak memory = the maximum of the live-bytes timeline [alloc], not a sum of per-phase maxima."""
    events, _ = _memory(sim)
    timeline = [(name, sum(c.values())) for name, _, _, c in events]
    i = max(range(len(events)), key=lambda j: timeline[j][1])
    name, phase, where, comp = events[i]
    times = _step_time(sim)
    step_s = sum(times.values())
    if sim.batch_size:
        samples = sim.batch_size * sim.micro_batches * sim.world_size
        throughput, unit = (samples / step_s if step_s > 0 else 0.0), "samples/s"
    else:
        throughput, unit = (1.0 / step_s if step_s > 0 else 0.0), "steps/s"
    host = sim.opt_state_host_bytes + sum(b.d2h_bytes for b in sim.blocks)
    return Estimate(
        peak_bytes=timeline[i][1], peak_phase=phase, peak_where=where, step_s=step_s,
        throughput=throughput, throughput_unit=unit,
        breakdown={k: comp.get(k, 0.0) for k in _COMPONENTS},
        time_breakdown=times, timeline=timeline, host_bytes=host,
        lossy=list(dict.fromkeys(sim.lossy)), notes=list(sim.notes),
    )


def drop_autocast_copies(sim: SimStep, fraction: float = 1.0) -> None:
    """Weights that became 16-bit are not cast by autocast, so their copies are not saved [amp]: for a
    strategy that casts `fraction` of every block's fp32 weights (precision `params: bf16`)."""
    for b in sim.blocks:
        gone = b.autocast_copy_bytes * fraction
        b.act_bytes = max(0.0, b.act_bytes - gone)
        if b.kept_bytes is not None:
            b.kept_bytes = max(0.0, b.kept_bytes - gone)
        b.autocast_copy_bytes -= gone


def use_bf16_params_probe(profile: Profile, sim: SimStep) -> set[str]:
    """Blocks whose saved bytes with bf16 weights were measured [probe] take that measurement, scaled to the
    simulated batch as their fp32 activations were (the probe ran at the profile's batch; it holds no autocast
    weight copies, the weights being bf16 already, so those are dropped here and not subtracted again).
    Returns the names of the blocks changed; the others are left to `drop_autocast_copies`."""
    by_name = {b.name: b for b in profile.blocks}
    done: set[str] = set()
    for b in sim.blocks:
        pb = by_name.get(b.name)
        probe = getattr(pb, "activation_bytes_bf16_params", None) if pb is not None else None
        if probe is None:
            continue
        base = float(pb.activation_bytes) - _autocast_fixed_bytes(profile, pb)  # batch-scaled part, profiled
        now = max(0.0, b.act_bytes - b.autocast_copy_bytes)  # the same part at the simulated batch
        new = float(probe) * (now / base) if base > 0 else float(probe)
        if b.kept_bytes is not None:
            b.kept_bytes = max(0.0, b.kept_bytes - (b.act_bytes - new))
        b.act_bytes = new
        b.autocast_copy_bytes = 0.0
        done.add(b.name)
    return done


def plan_batch_size(plan: Plan | None) -> int | None:
    """A batch size the plan's run knobs set (`knobs: {--batch-size: 16}`), if any."""
    if plan is None:
        return None
    knobs = (plan.run or {}).get("knobs") or {}
    for k, v in knobs.items():
        if str(k).lstrip("-").replace("_", "-") in ("batch-size", "batch", "bs", "per-device-train-batch-size"):
            try:
                return int(v)
            except (TypeError, ValueError):
                raise InputError(f"plan knob {k}: {v!r} is not an integer batch size") from None
    return None


def apply_plan_effects(profile: Profile, plan: Plan | None, sim: SimStep) -> SimStep:
    """Each section's strategy changes the simulated step, in strategy order (strategies/__init__)."""
    if plan is None:
        return sim
    from memtune.strategies import get_strategy, strategy_names

    order = {n: i for i, n in enumerate(strategy_names())}
    for name in sorted(plan.sections, key=lambda n: order.get(n, len(order))):
        strategy = get_strategy(name)
        section = plan.sections[name]
        strategy.effect(profile, section, sim)
        if strategy.lossy(section) and name not in sim.lossy:
            sim.lossy.append(name)
    return sim


def estimate(profile: Profile, plan: Plan | None = None, batch_size: int | None = None) -> Estimate:
    """Predicted peak bytes, phase, step seconds and throughput of `plan` on the profiled run."""
    if batch_size is None:
        batch_size = plan_batch_size(plan)
    sim = apply_plan_effects(profile, plan, build_sim(profile, batch_size))
    return simulate(sim)


def max_batch_size(profile: Profile, plan: Plan | None, budget: float, limit: int = 1 << 16) -> int:
    """The largest batch size whose predicted peak fits `budget` bytes (0 when none does).

    The peak grows monotonically with the batch (every batch-dependent term has a slope >= 0), so an
    exponential then binary search finds it in O(log B) simulations."""
    if not profile.batch_size:
        raise InputError("the profile does not know its batch size, so memtune cannot scale it")

    def fits(b: int) -> bool:
        return estimate(profile, plan, b).peak_bytes <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


@dataclass
class EstimateReport:
    """What `memtune estimate` shows: the estimate, against a budget when given."""

    estimate: Estimate
    plan_sections: dict[str, str]  # section -> one-line description ("" for none: the baseline)
    batch_size: int | None
    profile_batch_size: int | None
    measured_peak: float | None  # the profile's own allocator peak (baseline, its batch size)
    budget: float | None = None
    fits: bool | None = None
    margin: float | None = None  # budget - peak (negative: over by that much)
    max_batch: int | None = None  # the largest batch that fits the budget with this plan
    calibration: tuple[float, float] = (0.0, 0.0)  # (loss working set, constant) taken from the measured peak

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "estimate"}
        d["estimate"] = self.estimate.to_dict()
        return d


def estimate_files(profile_path: str, plan_path: str | None = None, budget: str | int | None = None,
                   batch_size: int | None = None, profile2_path: str | None = None) -> EstimateReport:
    """Load a profile (and optionally a plan and a second profile for the batch fit) and estimate."""
    from memtune.plan import Plan
    from memtune.profile import Profile
    from memtune.units import parse_size

    budget_bytes = parse_size(budget) if budget is not None else None
    profile = Profile.load(profile_path)
    if profile2_path:
        profile = fit_batch(profile, Profile.load(profile2_path))
    plan = Plan.load(plan_path) if plan_path else None
    from memtune.strategies import get_strategy

    sections = {n: get_strategy(n).describe(s) for n, s in plan.sections.items()} if plan else {}
    bs = batch_size if batch_size is not None else plan_batch_size(plan)
    est = estimate(profile, plan, bs)
    rep = EstimateReport(
        estimate=est, plan_sections=sections, batch_size=bs if bs is not None else profile.batch_size,
        profile_batch_size=profile.batch_size,
        measured_peak=float(profile.peak.allocated_bytes) if profile.peak.measured else None,
        calibration=_calibration(profile),
    )
    if budget_bytes is not None:
        rep.budget = float(budget_bytes)
        rep.margin = rep.budget - est.peak_bytes
        rep.fits = rep.margin >= 0
        if profile.batch_size:
            rep.max_batch = max_batch_size(profile, plan, rep.budget)
    return rep


def render_report(rep: EstimateReport, console: Any) -> None:
    """Rich tables for `memtune estimate`: memory at the peak by part, time by part, verdict."""
    from rich.table import Table

    from memtune.units import format_bytes, format_seconds

    est = rep.estimate
    title = "baseline (no plan): the run as profiled" if not rep.plan_sections else "plan"
    if rep.plan_sections:
        t = Table(title="plan", title_justify="left")
        t.add_column("section", style="bold")
        t.add_column("what it does")
        for name, what in rep.plan_sections.items():
            label = f"{name} [yellow](LOSSY)[/]" if name in est.lossy else name
            t.add_row(label, what)
        console.print(t)
    where = f" in {est.peak_where}" if est.peak_where else ""
    bs = f", batch size {rep.batch_size}" if rep.batch_size else ""
    console.print(f"[bold]{title}[/]: peak [bold]{format_bytes(est.peak_bytes)}[/] during {est.peak_phase}"
                  f"{where}{bs}", highlight=False)
    t = Table()
    t.add_column("at the peak", style="bold")
    t.add_column("bytes", justify="right")
    t.add_column("share", justify="right")
    for k, v in est.breakdown.items():
        if abs(v) >= 1:
            t.add_row(k, format_bytes(v), f"{100 * v / est.peak_bytes:.1f}%" if est.peak_bytes else "")
    t.add_row("peak", format_bytes(est.peak_bytes), "100%", style="bold")
    console.print(t)
    console.print(f"step [bold]{format_seconds(est.step_s)}[/], {est.throughput:.4g} {est.throughput_unit}",
                  highlight=False)
    t = Table()
    t.add_column("time", style="bold")
    t.add_column("seconds", justify="right")
    for k, v in est.time_breakdown.items():
        if v > 0:
            t.add_row(k, format_seconds(v))
    console.print(t)
    if rep.measured_peak:
        loss_extra, residual = rep.calibration
        how = []
        if loss_extra:
            how.append(f"{format_bytes(loss_extra)} of loss working memory no block owns (in 'transient' at the "
                       "loss; it grows with the batch)")
        if residual:
            how.append(f"{format_bytes(residual)} of 'allocator overhead' (constant)")
        console.print(f"calibrated once on the measured baseline peak {format_bytes(rep.measured_peak)} at batch "
                      f"size {rep.profile_batch_size}: " + ("; ".join(how) if how else "the parts explain it all"),
                      highlight=False)
    if est.host_bytes:
        console.print(f"pinned host memory needed: {format_bytes(est.host_bytes)}")
    if rep.budget is not None:
        if rep.fits:
            console.print(f"[green]fits[/] the {format_bytes(rep.budget)} budget with "
                          f"{format_bytes(rep.margin)} to spare")
        else:
            console.print(f"[red]does not fit[/] the {format_bytes(rep.budget)} budget: over by "
                          f"{format_bytes(-rep.margin)}")
        if rep.max_batch is not None:
            console.print(f"largest batch size that fits: {rep.max_batch}" if rep.max_batch
                          else "no batch size fits this budget with this plan")
    if est.lossy:
        console.print(f"[yellow]LOSSY[/] sections (they change the numbers): {', '.join(est.lossy)}")
    for n in est.notes:
        console.print(f"note: {n}")
