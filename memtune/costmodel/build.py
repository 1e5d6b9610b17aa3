"""Building the simulated step from a profile: per-block values at any batch size (a line through one
profile, or through two at different batch sizes), calibrated once on the measured peak.
"""

from __future__ import annotations

import copy

from memtune.costmodel.sim import BlockSim, SimStep
from memtune.costmodel.timeline import simulate
from memtune.errors import InputError
from memtune.profile import BlockProfile, Profile

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
#   [probe]  the profiler's what-if run (profilers/probes.py `saved_bytes_bf16_params`): one block of each
#            repeated class re-run with bf16 weights and bf16 inputs under the script's autocast, saved bytes
#            counted like the memory step's (`BlockProfile.activation_bytes_bf16_params`).

# Host<->device bandwidth when the profile measured none (CPU profile): PCIe 4.0 x16 moves ~25 GB/s
# pinned in practice (NVIDIA bandwidthTest on A100/H100 hosts); only used to rank plans on a CPU profile.
DEFAULT_PCIE_GBPS = 25.0

# How the unexplained remainder of the measured baseline peak carries to other plans and batch sizes:
# "additive" (a constant: allocator rounding, cuBLAS/cuDNN workspaces) or "proportional" (a fraction of
# the simulated peak). On the H100 data [data] the whole shortfall sat in the loss region (GPT-125m
# 0.006 GiB, GPT-350m 0.002 GiB, Llama-1.1B 1.47 GiB), where it is logit-sized and scales with the batch
# (`calibration`); the remainder after it was 0 for all three, so the choice made no measurable
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
    """Per-block (fwd_s, bwd_s) per micro-batch, from CUDA events around each block (profilers/recorder.py).

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
    return (profile.param_bytes + profile.buffer_bytes + profile.other_module_bytes + profile.optimizer_state_bytes
            + ((profile.grad_bytes or profile.trainable_param_bytes) if profile.grads_persist else 0))


def _values(profile: Profile) -> dict[str, float]:
    """Quantities that change with the batch size, flat: 'block:<name>:<field>' or '<field>'."""
    v: dict[str, float] = {}
    times = _block_times(profile)
    for b in profile.blocks:
        k = f"block:{b.name}:"
        v[k + "act"] = float(b.activation_bytes)
        # what a checkpointed block keeps: its inputs, less those an earlier block took too (live once)
        v[k + "input"] = float(b.input_bytes - min(b.shared_input_bytes, b.input_bytes))
        v[k + "fwd_transient"] = float(b.transient_bytes)
        v[k + "bwd_transient"] = float(b.bwd_transient_bytes)
        v[k + "fwd_s"], v[k + "bwd_s"] = times[b.name]
    v["other_act"] = float(profile.other_activation_bytes)
    v["other_act_before"] = float(min(profile.other_activation_before_bytes, profile.other_activation_bytes))
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


def time_fixed_share(b: BlockProfile) -> tuple[float, float]:
    """(forward, backward) share of a block's time that does not scale with the batch: measured when the
    profiler ran this block's class at half the batch [whatif] (t_half = f t + (1 - f) t / 2), else
    BLOCK_TIME_FIXED_SHARE."""
    keep, half, double = b.what_ifs.get("keep"), b.what_ifs.get("half"), b.what_ifs.get("double")
    if keep is None or keep.fwd_s <= 0 or keep.bwd_s <= 0:
        return BLOCK_TIME_FIXED_SHARE, BLOCK_TIME_FIXED_SHARE
    if half is not None:
        return tuple(min(0.9, max(0.0, 2 * h / k - 1)) for h, k in ((half.fwd_s, keep.fwd_s), (half.bwd_s, keep.bwd_s)))
    if double is not None:  # t_double = f t + (1 - f) 2 t
        return tuple(min(0.9, max(0.0, 2 - d / k)) for d, k in ((double.fwd_s, keep.fwd_s), (double.bwd_s, keep.bwd_s)))
    return BLOCK_TIME_FIXED_SHARE, BLOCK_TIME_FIXED_SHARE


# A block's time in the run above this multiple of its time run alone [whatif] holds a stall.
STALL_RATIO = 1.5


def block_stalls(profile: Profile) -> dict[str, float]:
    """Seconds of each block's time in the run that its probe, run alone on the same inputs, did not need
    [whatif]: the GPU waiting on the host inside the block (a kernel plan built for each new padded length,
    a host sync). Such a wait does not grow with the batch: scaled as compute, encoder.layer.0 of the zoo's
    accelerate_loop (69 ms in the run, 2 ms alone) made batch 64 predicted 36% slow (H200, 2026-12-02)."""
    times = _block_times(profile)
    out = {}
    for b in profile.blocks:
        keep = b.what_ifs.get("keep")
        if keep is None:
            continue
        for i, (k, alone) in enumerate((("fwd_s", keep.fwd_s), ("bwd_s", keep.bwd_s))):
            t = times[b.name][i]
            if alone > 0 and t > STALL_RATIO * alone:
                out[f"block:{b.name}:{k}"] = t - alone
    return out


def _fixed_parts(profile: Profile, stalls: dict[str, float]) -> dict[str, float]:
    """The part of each value that a single profile says does not scale with the batch (`stalls`: the
    profile's `block_stalls`)."""
    fixed = {f"block:{b.name}:act": _autocast_fixed_bytes(profile, b) for b in profile.blocks}
    # the copies are made inside the block's forward, so its working peak holds them too; scaled with the
    # batch they made the 7B full fine-tune at batch 10 read 20.1 GiB for 16.7 measured (H200, 2026-12-04)
    fixed |= {f"block:{b.name}:fwd_transient": _autocast_fixed_bytes(profile, b) for b in profile.blocks}
    times = _block_times(profile)
    for b in profile.blocks:
        shares = time_fixed_share(b)
        for i, k in enumerate(("fwd_s", "bwd_s")):
            key = f"block:{b.name}:{k}"
            stall = stalls.get(key, 0.0)
            fixed[key] = stall + shares[i] * (times[b.name][i] - stall)
    fixed["outside_s"] = (1 - OUTSIDE_BATCH_SHARE) * _split_time(profile)[1]
    return fixed


def _fit_one(profile: Profile) -> dict[str, list[float]]:
    """value(B) = fixed + (value - fixed) * B / B0: proportional through the profile's point [kaplan]; for
    block times measured at half the batch too, a third number: the slope above B0 (`_slope_up`); measured at
    twice a batch of one, the line is the secant through that point (the fixed share `time_fixed_share` read)."""
    b0 = profile.batch_size or 1
    stalls = block_stalls(profile)
    fixed = _fixed_parts(profile, stalls)
    probed = {b.name for b in profile.blocks if "half" in b.what_ifs and "keep" in b.what_ifs}
    out = {}
    for k, v in _values(profile).items():
        f = min(fixed.get(k, 0.0), v)
        out[k] = [f, (v - f) / b0]
        if k.endswith("_s") and k.startswith("block:") and k.split(":")[1] in probed and v > 0:
            stall = stalls.get(k, 0.0)  # the kernels' own time per sample leaves the stall out
            out[k].append(_slope_up(v - stall, f - stall, b0))
    return out


def _line(c: list[float], bs: float, b0: float) -> float:
    """A value at batch `bs` from its coefficients [intercept, slope] or [intercept, slope, slope above b0]."""
    y = c[0] + c[1] * bs
    return y + (c[2] - c[1]) * max(0.0, bs - b0) if len(c) > 2 else y


def _slope_up(v: float, fixed: float, b0: float) -> float:
    """A block's time per sample above the profiled batch, when its half-batch time is measured [whatif].

    A block's time is about the sum over its kernels of max(launch interval, kernel time), convex in the
    batch: above B0 its slope lies between the secant through the half-batch point, (v - fixed) / B0, and
    v / B0 (its kernels' whole time per sample, which the time at B0 already includes). The half-batch
    secant alone under-predicted the larger batches of the zoo by 8-24% (H200, 2026-12-02: peft_lora and
    lora_handwritten at 8 against 4, lightning_module at 16 against 8, fused_adamw at 8 against 4), the
    through-origin line over-predicted lightning_module's by 21%: the middle of the two."""
    return 0.5 * ((v - fixed) / b0 + v / b0)


# Phases of the measured peak that the block timeline does not resolve: the loss's forward and backward
# (inside the "loss" interval when the script computes the loss, in the glue after the last block and
# before the first block's backward when the model computes it, as transformers models do).
_LOSS_REGION = {("loss", None), ("forward", None), ("backward", None)}


def calibration(profile: Profile) -> tuple[float, float]:
    """(loss_extra, residual) at the profile's own batch size: how far the modelled baseline falls short of
    the measured allocator peak [alloc].

    When the measured peak happened in the loss region, the shortfall is working memory of the loss
    (logit-sized: it grows with the batch) and is added to the loss's transient; whatever is left is a
    constant (allocator rounding, library workspaces) [data]."""
    return _calibrate(profile)[:2]


def _calibrate(profile: Profile) -> tuple[float, float, float | None]:
    """`calibration`'s two numbers, and the loss-forward gap: the calibrated (first) loss event of the
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
    for k, c in one.items():
        slope = (v2[k] - v1[k]) / (b2 - b1)
        if slope < 0 and not k.endswith("_s"):
            coef[k] = c[:2]  # a negative bytes slope is measurement noise: keep the single-profile line
            continue
        coef[k] = [v1[k] - slope * b1, slope]
    (l1, r1), (l2, r2) = calibration(profile), calibration(other)

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
        val = {k: max(0.0, _line(c, bs, b0)) for k, c in coef.items()}  # [kaplan]
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
            autocast_cached_bytes=min(val[k + "act"], _autocast_fixed_bytes(profile, b),
                                      float(b.trainable_param_bytes) / 2.0) if profile.autocast_cache else 0.0,
        ))
    sim.param_bytes = float(profile.param_bytes)
    sim.buffer_bytes = float(profile.buffer_bytes)
    sim.other_model_bytes = float(profile.other_module_bytes)
    # the whole run's peak counts the model as the script placed it on the device before the plan could
    # change it (strategies/placement.py defers that move)
    # (on a GPU: a CPU profile's "peak" is the sum of the step's parts, and nothing is loaded onto a device)
    sim.load_bytes = float(profile.param_bytes + profile.buffer_bytes) if profile.device == "cuda" else 0.0
    sim.grad_bytes = float(profile.grad_bytes or profile.trainable_param_bytes)
    sim.grads_persist = bool(profile.grads_persist)
    sim.opt_state_bytes = float(profile.optimizer_state_bytes)
    sim.opt_transient_bytes = _optimizer_transient(profile)
    sim.opt_s = _opt_s(profile)
    sim.other_act_bytes = val["other_act"]
    sim.other_act_before_bytes = val["other_act_before"]
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
    if calibrate:
        _compiled_factors(profile, sim)
    lag = profile.extra.get("backward_lag_s")
    if lag is not None and profile.extra.get("compiled") is None:  # a compiled backward is one graph
        sim.cpu_ahead_s = max(0.0, float(lag))
    if not profile.peak.measured:
        sim.notes.append("CPU profile: the peak is the sum of the modelled parts, not an allocator reading")
    return sim


def _compiled_factors(profile: Profile, sim: SimStep) -> None:
    """A torch.compile'd model: its blocks were profiled eagerly, its steps also measured compiled
    (`extra.compiled`). What the compiled steps' peak lacks against the eager one comes off the blocks'
    saved activations, what their time lacks off the blocks' time, each as a share (so it carries to other
    batch sizes and to the blocks a plan leaves compiled)."""
    c = profile.extra.get("compiled") or {}
    acts = float(sum(b.activation_bytes for b in profile.blocks))
    peak_c = c.get("peak_bytes")
    if peak_c and profile.peak.measured and acts > 0:
        less = float(profile.peak.allocated_bytes) - float(peak_c)
        sim.compiled_act_k = min(1.0, max(0.25, 1.0 - less / acts))
        if less < 0:  # the compiled run holds more (CUDA graphs' pools, workspaces): a constant
            sim.calib_bytes += -less
    times = _block_times(profile)
    block_s = sum(f + b for f, b in times.values())
    step_c = c.get("step_s")
    if step_c and profile.step_s and block_s > 0:
        sim.compiled_time_k = min(2.0, max(0.2, 1.0 - (profile.step_s - float(step_c)) / block_s))
    if c:
        sim.source("torch.compile", f"measured: {c.get('steps', 0)} compiled steps, "
                   + (f"peak {float(peak_c) / 2**30:.2f} GiB, " if peak_c else "")
                   + f"{float(step_c or 0) * 1e3:.0f} ms a step; blocks that stay compiled save "
                     f"x{sim.compiled_act_k:.2f} and take x{sim.compiled_time_k:.2f} their eager bytes and time")
