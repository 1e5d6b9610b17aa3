"""The plan space: what a trial proposes. One layout per trial (strategies/layout.py `propose`), then each
strategy's `space` (block strategies take their blocks from that layout), then the batch size when the
script takes it as a flag (`--batch-knob`). `ProbeTrial` runs the same code with chosen values, so the
tuner can evaluate fixed plans (seeds, coordinate search) without Optuna.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from memtune.errors import InputError
from memtune.plan import Plan
from memtune.strategies import all_strategies, plan_from_dict
from memtune.strategies.base import SearchOptions
from memtune.strategies.layout import propose

if TYPE_CHECKING:
    from memtune.profile import Profile

KNOB_PARAM = "run.batch_size"


def propose_plan(trial: Any, profile: Profile, opts: SearchOptions, run: dict[str, Any], knob: str | None,
                 knob_values: list[int]) -> tuple[Plan, int | None]:
    """This trial's plan (validated: a PlanError means the proposal contradicts itself) and batch size."""
    layout = propose(trial, profile, opts)
    sections: dict[str, Any] = {}
    for s in all_strategies():
        section = s.space(trial, profile, layout, opts)
        if section is not None:
            sections[s.name] = section
    bs = None
    run = dict(run)
    if knob:
        bs = trial.suggest_categorical(KNOB_PARAM, knob_values)
        run["knobs"] = {knob: bs}
    return plan_from_dict({**sections, "run": run}, source="search"), bs


def plan_key(plan: Plan) -> str:
    """A canonical form of a plan's sections and knobs, to tell plans apart."""
    return json.dumps(canon({"sections": plan.section_dicts(), "knobs": plan.run.get("knobs", {})}), default=str)


def plan_family(plan: Plan) -> str:
    """A plan's kind, without its block lists and batch: the cost model's errors are shared within a kind
    (e.g. selective checkpointing measured 35% slower than predicted on an H100, docs/benchmarks.md)."""

    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): strip(x) for k, x in v.items() if not isinstance(x, (list, dict)) or x}
        if isinstance(v, list) or v == "all":
            return "*"
        return v

    return json.dumps({n: strip(sec) for n, sec in plan.section_dicts().items()}, sort_keys=True, default=str)


def parse_batch_knob(text: str | None) -> tuple[str | None, list[int]]:
    """`--batch-size=8,16,32` -> ("--batch-size", [8, 16, 32])."""
    if not text:
        return None, []
    flag, sep, values = text.partition("=")
    flag = flag.strip()
    try:
        vals = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not sep or not flag.startswith("-") or not vals or any(v <= 0 for v in vals):
        raise InputError(f"bad --batch-knob {text!r}: write the script's flag and the sizes to try, e.g. --batch-size=8,16,32")
    return flag, sorted(set(vals))


class ProbeTrial:
    """Quacks like optuna.Trial for `space()`: fixed values where given and valid, else the do-nothing value."""

    _NOOP = (None, False, "none", "keep", "off", "no", 0)

    def __init__(self, fixed: dict[str, Any], defaults: dict[str, Any] | None = None):
        self.fixed = fixed
        self.defaults = defaults or {}
        self.params: dict[str, Any] = {}
        self.distributions: dict[str, Any] = {}
        self.user_attrs: dict[str, Any] = {}
        self.number = -1

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value

    def _pick(self, name: str, dist: Any) -> Any:
        if name in self.params:
            return self.params[name]
        value = self.fixed.get(name, self.defaults.get(name, _MISSING))
        if value is _MISSING or not _contains(dist, value):
            value = _noop_value(dist)
        self.params[name] = value
        self.distributions[name] = dist
        return value

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        from optuna.distributions import CategoricalDistribution

        return self._pick(name, CategoricalDistribution(list(choices)))

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        from optuna.distributions import IntDistribution

        return self._pick(name, IntDistribution(low, high, step=step, log=log))

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> float:
        from optuna.distributions import FloatDistribution

        return self._pick(name, FloatDistribution(low, high, step=step, log=log))


_MISSING = object()


def _contains(dist: Any, value: Any) -> bool:
    try:
        return bool(dist._contains(dist.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


def _noop_value(dist: Any) -> Any:
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        for v in ProbeTrial._NOOP:
            if any(c is v or (type(c) is type(v) and c == v) for c in dist.choices):
                return v
        return dist.choices[0]
    return dist.low


def candidate_values(dist: Any) -> list[Any]:
    """Values coordinate search tries for one parameter: every choice, or the ends and a few points between."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution):
        span = range(dist.low, dist.high + 1, dist.step)
        if len(span) <= 9:
            return list(span)
        idx = sorted({round(f * (len(span) - 1)) for f in (0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1)})
        return [span[i] for i in idx]
    return [dist.low, (dist.low + dist.high) / 2, dist.high]


def canon(obj: Any) -> Any:
    """A JSON-able form with a stable order, for dicts with mixed keys (block indices and module paths)."""
    if isinstance(obj, dict):
        return [[repr(k), canon(v)] for k, v in sorted(obj.items(), key=lambda kv: repr(kv[0]))]
    if isinstance(obj, (list, tuple)):
        return [canon(v) for v in obj]
    return obj
