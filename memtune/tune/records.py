"""The study's records: one schema for what a trial holds, written by the tuner and read by the report, and
the two choices made over them (the Pareto front, the chosen plan), computed one way for both.

A search trial's user attrs carry its prediction; a verification is a trial of its own (kind "verify",
`of_trial`, `measured` = {status, peak_bytes, step_s, throughput, ...}). The study's own user attrs carry
budget_bytes, limit_bytes and profile_digest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SEARCH, VERIFY = "search", "verify"


@dataclass
class TrialRecord:
    """What memtune keeps in a trial's user attrs (`to_attrs` / `from_attrs` are the only readers and writers)."""

    kind: str = SEARCH  # "search" or "verify"
    constraint: float = 0.0  # GiB over the search's limit: feasible when <= 0
    plan: str = ""  # one line: each section described, lossy ones labelled
    plan_key: str | None = None  # canonical plan, to tell plans apart
    predicted_peak_bytes: float | None = None
    predicted_step_s: float | None = None
    predicted_throughput: float | None = None
    unit: str = ""
    lossy: list[str] = field(default_factory=list)
    batch_size: int | None = None
    error: str | None = None  # why the trial's plan could not be evaluated
    of_trial: int | None = None  # verify: the search trial it measured
    measured: dict[str, Any] | None = None  # verify: {status, peak_bytes, step_s, throughput, detail, wall_s}
    family: str | None = None  # the plan's kind (sections without their block lists): corrections apply per family

    def to_attrs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"memtune_kind": self.kind, "memtune_constraint": [self.constraint]}
        for k in ("plan", "plan_key", "predicted_peak_bytes", "predicted_step_s", "predicted_throughput", "unit",
                  "lossy", "batch_size", "error", "of_trial", "measured", "family"):
            v = getattr(self, k)
            if v is not None and not (k == "plan" and not v):
                out[k] = v
        return out

    @classmethod
    def from_attrs(cls, ua: dict[str, Any], system_attrs: dict[str, Any] | None = None) -> TrialRecord:
        cons = ua.get("memtune_constraint") or (system_attrs or {}).get("constraints") or [0.0]
        lossy = ua.get("lossy") or []
        plan = ua.get("plan", "")
        return cls(kind=ua.get("memtune_kind", SEARCH), constraint=float(max(cons)),
                   plan=plan if isinstance(plan, str) else str(plan), plan_key=ua.get("plan_key"),
                   predicted_peak_bytes=ua.get("predicted_peak_bytes"), predicted_step_s=ua.get("predicted_step_s"),
                   predicted_throughput=ua.get("predicted_throughput"), unit=ua.get("unit", ""),
                   lossy=list(lossy) if isinstance(lossy, list) else [str(lossy)], batch_size=ua.get("batch_size"),
                   error=ua.get("error"), of_trial=ua.get("of_trial"), measured=ua.get("measured"),
                   family=ua.get("family"))

    @property
    def evaluated(self) -> bool:
        return self.predicted_peak_bytes is not None and self.error is None


@dataclass
class Candidate:
    """One evaluated plan: what the cost model predicts, and what a real run measured, if verified."""

    number: int
    params: dict[str, Any]
    key: str  # canonical plan, to tell plans apart
    describe: str
    peak_bytes: float
    step_s: float
    throughput: float
    unit: str
    objective: float  # the study's value: throughput, or peak GiB for --objective memory
    feasible: bool
    lossy: list[str] = field(default_factory=list)
    batch_size: int | None = None
    measured: dict[str, Any] | None = None
    family: str | None = None

    @property
    def verified_ok(self) -> bool:
        return bool(self.measured) and self.measured.get("status") == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "trial": self.number, "plan": self.describe, "predicted_peak_bytes": self.peak_bytes,
            "predicted_step_s": self.step_s, "predicted_throughput": self.throughput, "unit": self.unit,
            "fits": self.feasible, "lossy": self.lossy, "batch_size": self.batch_size, "measured": self.measured,
        }


def pareto_mask(peaks: list[float], throughputs: list[float]) -> list[bool]:
    """Non-dominated points: no other point has lower-or-equal peak and higher-or-equal throughput (one
    strictly); points that tie on both are all kept.

    One sweep by increasing peak: a point survives when it has the best throughput among equal peaks and beats
    every smaller peak's throughput (O(n log n): studies can hold thousands of trials)."""
    order = sorted(range(len(peaks)), key=lambda i: peaks[i])
    out = [False] * len(peaks)
    best_before = -math.inf
    k = 0
    while k < len(order):
        j = k
        while j < len(order) and peaks[order[j]] == peaks[order[k]]:
            j += 1
        group = order[k:j]
        top = max(throughputs[i] for i in group)
        for i in group:
            out[i] = throughputs[i] == top and top > best_before
        best_before = max(best_before, top)
        k = j
    return out


def pareto_front(cands: list[Candidate]) -> list[Candidate]:
    """Plans no other plan beats on both peak (lower) and throughput (higher), by increasing peak."""
    mask = pareto_mask([c.peak_bytes for c in cands], [c.throughput for c in cands])
    return sorted((c for c, m in zip(cands, mask, strict=True) if m), key=lambda c: (c.peak_bytes, c.number))


def rank(cands: list[Candidate], objective: str) -> list[Candidate]:
    """Best predicted first: throughput (then the smaller peak), or peak for --objective memory."""
    if objective == "memory":
        return sorted(cands, key=lambda c: (c.peak_bytes, -c.throughput, c.number))
    return sorted(cands, key=lambda c: (-c.throughput, c.peak_bytes, c.number))


def best_measured(cands: list[Candidate], objective: str) -> Candidate | None:
    """The winner among verified plans that ran within the budget: measured throughput first (then the smaller
    predicted peak), or the smaller measured peak for --objective memory."""
    ok = [c for c in cands if c.verified_ok]
    if not ok:
        return None
    if objective == "memory":
        return min(ok, key=lambda c: (c.measured.get("peak_bytes") or c.peak_bytes, -c.measured["throughput"], c.number))
    return max(ok, key=lambda c: (c.measured["throughput"], -c.peak_bytes, -c.number))


def chosen(cands: list[Candidate], objective: str) -> Candidate | None:
    """The plan `memtune tune` picks: the best measured among verified plans that ran, else (nothing verified)
    the best feasible prediction; None when every verified plan failed or none fits."""
    if any(c.measured for c in cands):
        return best_measured(cands, objective)
    feasible = [c for c in cands if c.feasible]
    return rank(feasible, objective)[0] if feasible else None
