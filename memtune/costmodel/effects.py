"""Helpers strategies' effects share: what a block's bytes become when its weights change dtype, and the
profiler's measurements of a block mode on the user's own blocks, converted to a simulated block.

[whatif] profilers/probes.py `probe_modes`: one block of each repeated class run alone in each mode after
the measured steps (CUDA allocator readings and CUDA events), at the profile's batch size; scaled here like
the block's activations and times are.
"""

from __future__ import annotations

from dataclasses import dataclass

from memtune.costmodel.build import _autocast_fixed_bytes
from memtune.costmodel.sim import BlockSim, SimStep
from memtune.profile import BlockProfile, Profile, WhatIf


def drop_autocast_copies(sim: SimStep, fraction: float = 1.0) -> None:
    """Weights that became 16-bit are not cast by autocast, so their copies are not saved [amp]: for a
    strategy that casts `fraction` of every block's fp32 weights (precision `params: bf16`)."""
    for b in sim.blocks:
        gone = b.autocast_copy_bytes * fraction
        b.act_bytes = max(0.0, b.act_bytes - gone)
        b.fwd_transient = max(0.0, b.fwd_transient - gone)  # the forward's peak held them too
        if b.kept_bytes is not None:
            b.kept_bytes = max(0.0, b.kept_bytes - gone)
        b.autocast_copy_bytes -= gone


def use_bf16_params_probe(profile: Profile, sim: SimStep) -> set[str]:
    """Blocks whose saved bytes with bf16 weights were measured [probe] take that measurement, scaled to the
    simulated batch as their fp32 activations were (the probe ran at the profile's batch; it holds no autocast
    weight copies, the weights being bf16 already, so those are dropped here and not subtracted again).
    Returns the names of the blocks changed; the others are left to `drop_autocast_copies`."""
    by_name = {b.name: b for b in profile.blocks}
    # The probe ran on the first block of its class. Another block of the class can save more or less (zoo
    # lora_handwritten, frozen base: layers.0's input needs no gradient, it saves 866 MB and the others 933):
    # the difference is converted by dtype, fp32 tensors becoming bf16 and the rest staying, not taken as the
    # probe's (H200 2026-12-02: the probe's 790 MB as is for every block was 3.5% under, a share of it 3.0% over).
    probed: dict[str, BlockProfile] = {}
    for pb in profile.blocks:
        if pb.kind == "repeated" and pb.activation_bytes_bf16_params is not None:
            probed.setdefault(pb.cls, pb)
    done: set[str] = set()
    for b in sim.blocks:
        pb = by_name.get(b.name)
        probe = getattr(pb, "activation_bytes_bf16_params", None) if pb is not None else None
        if probe is None:
            continue
        base = float(pb.activation_bytes) - _autocast_fixed_bytes(profile, pb)  # batch-scaled part, profiled
        now = max(0.0, b.act_bytes - b.autocast_copy_bytes)  # the same part at the simulated batch
        first = probed.get(pb.cls, pb)
        extra = 0.0
        if first is not pb:
            mine, theirs = pb.activation_bytes_by_dtype or {}, first.activation_bytes_by_dtype or {}
            for dt in set(mine) | set(theirs):
                d = float(mine.get(dt, 0) - theirs.get(dt, 0))
                extra += d / 2 if dt == "float32" else d
        at_profile = max(0.0, float(probe) + extra)
        new = at_profile * (now / base) if base > 0 else at_profile
        if b.kept_bytes is not None:
            b.kept_bytes = max(0.0, b.kept_bytes - (b.act_bytes - new))
        b.fwd_transient = max(0.0, b.fwd_transient - max(0.0, b.act_bytes - new))  # what it saves, it holds
        b.act_bytes = new
        b.autocast_copy_bytes = 0.0
        done.add(b.name)
    return done


# --- measured block modes ---------------------------------------------------------------------------------


@dataclass
class ModeMeasurement:
    """A block mode measured on one block of this block's class [whatif], with what converts its numbers to
    the simulated block: `scale` (bytes at the simulated batch per byte at the profile's) and the block's
    own time per probe second, forward and backward."""

    mode: WhatIf
    keep: WhatIf
    block: BlockProfile
    scale: float
    fwd_ratio: float
    bwd_ratio: float
    probe_base: float = 0.0  # what the probed block saved in keep mode, its inputs included

    def extra_bwd_peak(self) -> float:
        """What the mode adds to the block's backward working set (re-materialized or decoded tensors)."""
        return max(0.0, self.mode.bwd_peak_bytes - self.keep.bwd_peak_bytes) * self.scale

    # Shares of the probe's own keep-mode bytes, applied to the simulated block's saved bytes: the probe runs
    # one block alone, and its keep twin can read less than the profiled steps attribute to the block (7B peft
    # LoRA: 416 vs 469 MiB); an absolute difference or a share of the profiled bytes then leaves the gap
    # on the device although the mode moves or encodes it too (H200, 2026-12-02: the tuned 7B LoRA plan was
    # over-predicted by 8.5%, -2.1% with shares; zoo peft_lora / lora_handwritten offload +7.4% / +4.0% -> 0.0%).
    def _base(self) -> float:
        return self.probe_base if self.probe_base > 0 else float(self.keep.kept_bytes)

    def kept_share(self) -> float:
        """The share of what the block saves in keep mode that it keeps in this mode."""
        return min(1.0, self.mode.kept_bytes / self._base()) if self._base() > 0 else 1.0

    def moved_share(self, cap: bool = True) -> float:
        """What this mode sends to the host per byte the block saves in keep mode (more than 1 where saved
        tensors that shared a storage go down separately; `cap=False` keeps that)."""
        if self._base() <= 0:
            return 1.0
        share = self.mode.moved_bytes / self._base()
        return min(1.0, share) if cap else share

    def extra_fwd_s(self) -> float:
        return max(0.0, self.mode.fwd_s - self.keep.fwd_s) * self.fwd_ratio

    def extra_bwd_s(self, minus_s: float = 0.0) -> float:
        return max(0.0, self.mode.bwd_s - self.keep.bwd_s - minus_s) * self.bwd_ratio

    def extra_host_s(self) -> float | None:
        """Host seconds the mode's hooks add to the block's forward and backward (per call, whatever the
        batch: the cost is per saved tensor); None when the profile did not time the host."""
        if min(self.mode.fwd_host_s, self.mode.bwd_host_s, self.keep.fwd_host_s, self.keep.bwd_host_s) <= 0:
            return None
        return max(0.0, self.mode.fwd_host_s + self.mode.bwd_host_s - self.keep.fwd_host_s - self.keep.bwd_host_s)

    # A recompute is the block's forward run again inside its backward, so the probe's extra backward time
    # converts to this block by the forward's ratio (in-situ forward per probe forward), not the backward's
    # (H200 zoo, 12 scripts, checkpoint-all overhead: summed |error| 198 -> 115 ms; peft_lora 171 -> 117 ms
    # predicted against 112 measured, its frozen base making its backward unlike its forward).
    def recompute_s(self) -> float:
        return max(0.0, self.mode.bwd_s - self.keep.bwd_s) * self.fwd_ratio


def measured_mode(profile: Profile, b: BlockSim, mode: str) -> ModeMeasurement | None:
    """The profiler's what-if of `mode` for the simulated block `b`, with its keep-mode twin, or None."""
    pb = next((x for x in profile.blocks if x.name == b.name), None)
    if pb is None or mode not in pb.what_ifs or "keep" not in pb.what_ifs:
        return None
    keep = pb.what_ifs["keep"]
    # the probe ran the first block of the class on its first call's inputs, which it holds itself: its keep
    # mode's kept bytes leave them out, while a mode saves, moves or encodes them too
    probed = next((x for x in profile.blocks if x.kind == "repeated" and x.cls == pb.cls), pb)
    probe_base = float(keep.kept_bytes + probed.input_bytes)
    base = float(pb.activation_bytes) - _autocast_fixed_bytes(profile, pb)  # batch-scaled part, profiled
    now = max(0.0, b.act_bytes - b.autocast_copy_bytes)  # the same part at the simulated batch
    scale = now / base if base > 0 else 1.0
    fwd_ratio = b.fwd_s / keep.fwd_s if keep.fwd_s > 0 else 0.0
    bwd_ratio = b.bwd_s / keep.bwd_s if keep.bwd_s > 0 else 0.0
    return ModeMeasurement(pb.what_ifs[mode], keep, pb, scale, fwd_ratio, bwd_ratio, probe_base)


def note_sources(sim: SimStep, what: str, measured: list[str], formula: list[str], formula_text: str) -> None:
    """Say which blocks' effect came from a measurement of the user's own block and which from a formula."""
    parts = []
    if measured:
        parts.append(f"measured on the profile's own {len(measured)} block(s) [whatif]")
    if formula:
        parts.append(f"{formula_text} for {len(formula)} block(s)")
    if parts:
        sim.source(what, "; ".join(parts))
