"""The study's records: one schema for what a trial holds, written by the tuner and read by the report, and
the two choices made over them (the Pareto front, the chosen plan), computed one way for both.

A search trial's user attrs carry its prediction; a verification is a trial of its own (kind "verify",
`of_trial`, `measured` = {status, peak_bytes, step_s, throughput, ...}). The study's own user attrs carry
budget_bytes, limit_bytes and profile_digest.
"""

from __future__ import annotations

import json
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
    # the cost model's own prediction; peak_bytes/step_s/throughput above may be corrected by measurements
    raw_peak_bytes: float = -1.0
    raw_step_s: float = -1.0
    raw_throughput: float = -1.0

    def __post_init__(self) -> None:
        if self.raw_peak_bytes < 0:
            self.raw_peak_bytes = self.peak_bytes
        if self.raw_step_s < 0:
            self.raw_step_s = self.step_s
        if self.raw_throughput < 0:
            self.raw_throughput = self.throughput

    @property
    def verified_ok(self) -> bool:
        return bool(self.measured) and self.measured.get("status") == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "trial": self.number, "plan": self.describe, "predicted_peak_bytes": self.peak_bytes,
            "predicted_step_s": self.step_s, "predicted_throughput": self.throughput, "unit": self.unit,
            "fits": self.feasible, "lossy": self.lossy, "batch_size": self.batch_size, "measured": self.measured,
        }


def mechanisms(family: str | None) -> set[str]:
    """What a plan family (`space.plan_family`'s JSON) switches on: `section.key` for each set option."""
    try:
        d = json.loads(family or "{}")
    except ValueError:
        return {family or ""}
    if not isinstance(d, dict):
        return {str(d)}
    out = set()
    for sec, v in d.items():
        if isinstance(v, dict):
            out |= {f"{sec}.{k}" for k, x in v.items() if x not in (None, False, 0, "", "none")}
        elif v not in (None, False, 0, "", "none"):
            out.add(str(sec))
    return out


def _timed(mechs: set[str]) -> set[str]:
    """The mechanisms that change a step's time: where the script's model is built (placement) does not. A
    streamed-gradients plan measured 1.42x its prediction with the model's placement deferred did not pass
    that to the same plan without it, and tune verified three of the family (H200 zoo fused_adamw,
    2026-12-02: 0.90 of the sweep's best)."""
    return {m for m in mechs if not m.startswith("placement.")}


@dataclass
class Correction:
    """What verified runs of one plan family measured against their raw predictions."""

    peak: float = 1.0  # measured / predicted peak (a lower bound for a run that ran out of memory)
    step: float = 1.0  # measured / predicted step time
    n: int = 0


@dataclass
class Corrections:
    """The cost model corrected by measurements, per plan family (plans alike but for their block lists and
    batch share the model's error: docs/accuracy.md). A family not measured yet takes the mean correction of
    those measured (the peak's never below 1), so one systematic miss is not repeated on the next family."""

    by_family: dict[str, Correction] = field(default_factory=dict)

    def add(self, cand: Candidate, m: dict[str, Any], budget: int) -> None:
        fam = cand.family or ""
        c = self.by_family.setdefault(fam, Correction())
        status = m.get("status")
        peak = m.get("peak_bytes")
        if status == "oom" and peak is None:
            peak = budget  # it needed more than the budget (at least)
        if peak is not None and cand.raw_peak_bytes > 0:
            c.peak = max(c.peak if c.n else 0.0, float(peak) / cand.raw_peak_bytes)
        if m.get("step_s") and cand.raw_step_s > 0:
            r = float(m["step_s"]) / cand.raw_step_s
            c.step = (c.step * c.n + r) / (c.n + 1) if c.n else r
        c.n += 1

    def peak_ratio(self, family: str | None) -> float:
        c = self.by_family.get(family or "")
        if c is not None and c.n:
            return c.peak
        known = [x.peak for x in self.by_family.values() if x.n]
        return max(1.0, sum(known) / len(known)) if known else 1.0

    def step_ratio(self, family: str | None) -> float:
        """A measured family's own step correction; an unmeasured family takes the mean of the measured ones
        whose mechanisms it has all of (their time error is in it too), else none. Not every measured one:
        on the 7B LoRA (H200, 2026-12-02) two offload + compression plans measured 1.8x their predicted step,
        and that passed to the NF4 + checkpoint plan (measured within 6%) ranked it below them."""
        c = self.by_family.get(family or "")
        if c is not None and c.n:
            return c.step
        mine = _timed(mechanisms(family))
        known = [x.step for f, x in self.by_family.items() if x.n and _timed(mechanisms(f)) <= mine]
        return sum(known) / len(known) if known else 1.0

    def apply(self, cands: list[Candidate], limit: float) -> None:
        """Each candidate's prediction, corrected; `feasible` against the search's limit."""
        for c in cands:
            r, rs = self.peak_ratio(c.family), self.step_ratio(c.family)
            c.peak_bytes = c.raw_peak_bytes * r
            c.step_s = c.raw_step_s * rs
            c.throughput = c.raw_throughput / rs if rs > 0 else c.raw_throughput
            c.feasible = c.peak_bytes <= limit


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


# Among plans within this share of each other the lossless one wins: a lossy choice must buy more than that.
LOSSLESS_WINS_WITHIN = 0.02


def _lossy_handicap(c: Candidate) -> float:
    """Each lossy section counts: of two plans within the share of each other, the one changing fewer parts of
    the numbers wins (NF4 weights alone over NF4 weights + 4-bit states + fp8 activations)."""
    return (1.0 + LOSSLESS_WINS_WITHIN) ** len(c.lossy)


def rank(cands: list[Candidate], objective: str) -> list[Candidate]:
    """Best predicted first: throughput (then the smaller peak), or peak for --objective memory; a lossy plan
    counts as LOSSLESS_WINS_WITHIN worse per lossy section, so a lossless one within that of it ranks first."""
    if objective == "memory":
        return sorted(cands, key=lambda c: (c.peak_bytes * _lossy_handicap(c), -c.throughput, c.number))
    return sorted(cands, key=lambda c: (-c.throughput / _lossy_handicap(c), c.peak_bytes, c.number))


def best_measured(cands: list[Candidate], objective: str) -> Candidate | None:
    """The winner among verified plans that ran within the budget: measured throughput first (then the smaller
    predicted peak), or the smaller measured peak for --objective memory."""
    ok = [c for c in cands if c.verified_ok]
    if not ok:
        return None
    if objective == "memory":
        return min(ok, key=lambda c: ((c.measured.get("peak_bytes") or c.peak_bytes) * _lossy_handicap(c),
                                      -c.measured["throughput"], c.number))
    return max(ok, key=lambda c: (c.measured["throughput"] / _lossy_handicap(c), -c.peak_bytes, -c.number))


def chosen(cands: list[Candidate], objective: str) -> Candidate | None:
    """The plan `memtune tune` picks: the best measured among verified plans that ran, else (nothing verified)
    the best feasible prediction; None when every verified plan failed or none fits."""
    if any(c.measured for c in cands):
        return best_measured(cands, objective)
    feasible = [c for c in cands if c.feasible]
    return rank(feasible, objective)[0] if feasible else None
