"""Helpers strategies' effects share: what a block's bytes become when its weights change dtype."""

from __future__ import annotations

from memtune.costmodel.build import _autocast_fixed_bytes
from memtune.costmodel.sim import SimStep
from memtune.profile import Profile


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
