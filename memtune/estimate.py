"""Estimate a plan: plan -> each section's effect on the simulated step -> the cost model -> Estimate.

This sits above the strategies (which hold the effects) and the cost model (which never sees a Plan).
`memtune estimate` is `estimate_files`; its tables are drawn by memtune/render.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memtune.costmodel import Estimate, SimStep, build_sim, calibration, fit_batch, simulate
from memtune.errors import InputError
from memtune.plan import Plan
from memtune.profile import Profile
from memtune.strategies import get_strategy, load_plan, ordered_sections

BATCH_FLAGS = ("batch-size", "batch", "bs", "per-device-train-batch-size", "train-batch-size")


def plan_batch_size(plan: Plan | None) -> int | None:
    """A batch size the plan's run knobs set (`knobs: {--batch-size: 16}`), if any."""
    if plan is None:
        return None
    knobs = (plan.run or {}).get("knobs") or {}
    for k, v in knobs.items():
        if str(k).lstrip("-").replace("_", "-") in BATCH_FLAGS:
            try:
                return int(v)
            except (TypeError, ValueError):
                raise InputError(f"plan knob {k}: {v!r} is not an integer batch size") from None
    return None


def apply_plan_effects(profile: Profile, plan: Plan | None, sim: SimStep) -> SimStep:
    """Each section's strategy changes the simulated step, in strategy order."""
    if plan is None:
        return sim
    for name, cfg in ordered_sections(plan):
        get_strategy(name).effect(profile, cfg, sim)
        if cfg.lossy and name not in sim.lossy:
            sim.lossy.append(name)
    return sim


def estimate(profile: Profile, plan: Plan | dict | None = None, batch_size: int | None = None) -> Estimate:
    """Predicted peak bytes, phase, step seconds and throughput of `plan` on the profiled run."""
    plan = load_plan(plan) if plan is not None else None
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


def estimate_files(profile_path: str | Path, plan_path: str | Path | None = None, budget: str | int | None = None,
                   batch_size: int | None = None, profile2_path: str | Path | None = None) -> EstimateReport:
    """Load a profile (and optionally a plan and a second profile for the batch fit) and estimate. `budget` is a
    size with its unit (an int: bytes)."""
    from memtune.units import parse_budget

    budget_bytes = parse_budget(budget) if budget is not None else None
    profile = Profile.load(profile_path)
    if profile2_path:
        profile = fit_batch(profile, Profile.load(profile2_path))
    plan = load_plan(plan_path) if plan_path else None
    sections = {n: s.describe() for n, s in plan.sections.items()} if plan else {}
    bs = batch_size if batch_size is not None else plan_batch_size(plan)
    est = estimate(profile, plan, bs)
    rep = EstimateReport(
        estimate=est, plan_sections=sections, batch_size=bs if bs is not None else profile.batch_size,
        profile_batch_size=profile.batch_size,
        measured_peak=float(profile.peak.allocated_bytes) if profile.peak.measured else None,
        calibration=calibration(profile),
    )
    if budget_bytes is not None:
        rep.budget = float(budget_bytes)
        rep.margin = rep.budget - est.peak_bytes
        rep.fits = rep.margin >= 0
        if profile.batch_size:
            rep.max_batch = max_batch_size(profile, plan, rep.budget)
    return rep
