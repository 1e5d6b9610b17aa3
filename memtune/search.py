"""`memtune tune`: search the joint plan space on the cost model with Optuna, then verify the best plans.

The space is the union of what the registered strategies declare in `space(trial, profile, opts)`, plus the
batch size when the script takes it as a flag (`--batch-knob`). Per-block choices are shared: one joint
assignment of every repeated block to keep / recompute / offload / compress (`block_modes`), parameterised
as "the first k blocks" per mode plus per-block exceptions for the few large non-repeated blocks, so a few
hundred trials cover it and strategies never pick the same block twice. Strategies call:

    from memtune.search import blocks_in_mode
    blocks = blocks_in_mode(trial, profile, opts, "recompute")   # [0, 1, 2] or module paths; [] = none

The study maximizes predicted throughput (samples/s with a batch knob) under the constraint
predicted_peak <= budget * (1 - margin), where the margin is the cost model's largest measured
under-prediction of the peak (docs/accuracy.md) rounded up to the next whole percent (`PEAK_MARGIN`).
It is seeded with the obvious plans (baseline, checkpoint everything, the cheapest-memory plan and a
greedy best plan, both found by coordinate search on the cost model), stored in SQLite next to the output
so it resumes and opens in optuna-dashboard, and reproducible for one seed. `verify=k` runs the k best
predicted plans for real (`memtune apply` in subprocesses), records measured against predicted in the
study and picks the winner on measurements.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memtune.errors import InputError, MemtuneError
from memtune.strategies.base import SearchOptions
from memtune.units import format_bytes

if TYPE_CHECKING:
    from memtune.plan import Plan
    from memtune.profile import Profile

# --- the shared per-block choice ---------------------------------------------------------------------------

# Forward-order layout of the repeated blocks: offloaded blocks first (their copies have the most compute to
# hide behind before their backward comes), then compressed, then recomputed, the last blocks kept.
BLOCK_MODES = ("offload", "compress", "recompute")
_MODE_STRATEGY = {"recompute": "checkpoint", "offload": "offload", "compress": "compress"}
_LOSSY_MODES = {"compress"}


def available_block_modes(profile: Profile, opts: SearchOptions) -> list[str]:
    """The per-block modes the registered strategies can apply here (offload needs CUDA; compress is lossy)."""
    from memtune.strategies import strategy_names

    names = set(strategy_names())
    modes = []
    for mode in BLOCK_MODES:
        if _MODE_STRATEGY[mode] not in names:
            continue
        if mode == "offload" and opts.device != "cuda":
            continue
        if mode in _LOSSY_MODES and opts.lossless_only:
            continue
        modes.append(mode)
    return modes


def _exception_blocks(profile: Profile) -> list[str]:
    """Non-repeated blocks worth a choice of their own: those saving at least a median repeated block."""
    acts = sorted(b.activation_bytes for b in profile.repeated_blocks)
    if not acts:
        return []
    median = acts[len(acts) // 2]
    return [b.name for b in profile.blocks if b.kind != "repeated" and b.activation_bytes >= max(1, median)]


def block_modes(trial: Any, profile: Profile, opts: SearchOptions) -> dict[int | str, str]:
    """One joint per-block assignment for this trial: {repeated index or module path: mode}; kept blocks absent.

    Idempotent within a trial (Optuna returns the same value for a name suggested twice), so each of
    checkpoint/offload/compress can call it and take its own blocks. Parameters: `blocks.<mode>` = how many
    blocks get that mode (clipped to what is left, in the layout order of BLOCK_MODES), and
    `blocks.other.<path>` = the mode of each large non-repeated block (e.g. an LM head).
    """
    modes = available_block_modes(profile, opts)
    n = len(profile.repeated_blocks)
    out: dict[int | str, str] = {}
    if not modes:
        return out
    start = 0
    for mode in modes:
        k = trial.suggest_int(f"blocks.{mode}", 0, n) if n else 0
        k = min(k, n - start)
        for i in range(start, start + k):
            out[i] = mode
        start += k
    for name in _exception_blocks(profile):
        choice = trial.suggest_categorical(f"blocks.other.{name}", ["keep", *modes])
        if choice != "keep":
            out[name] = choice
    return out


def blocks_in_mode(trial: Any, profile: Profile, opts: SearchOptions, mode: str) -> list[int | str]:
    """The blocks `block_modes` gives `mode` ("recompute", "offload" or "compress"), as plan block references."""
    if mode not in BLOCK_MODES:
        raise ValueError(f"mode {mode!r}: one of {BLOCK_MODES}")
    return [ref for ref, m in block_modes(trial, profile, opts).items() if m == mode]


# --- options and results -------------------------------------------------------------------------------

DEFAULT_MARGIN = 0.03  # when an accuracy table has no measured peaks (see safety_margin)
# What `safety_margin` computes from docs/accuracy.md (H100, torch 2.11, 2026-11-25, 46 plans: worst peak
# under-prediction -0.9%, GPT-125M compress int8 half; -3.9% before the cost model counted autocast's weight
# copies at the loss's forward); tests/test_search.py keeps the two in step.
PEAK_MARGIN = 0.01
KNOB_PARAM = "run.batch_size"
OBJECTIVES = ("throughput", "memory")


class BudgetTooSmall(MemtuneError):
    """No plan in the space is predicted to fit the budget."""


class VerificationFailed(MemtuneError):
    """Every verified plan failed for real (out of memory, over budget, or crashed)."""


@dataclass
class TuneOptions:
    budget_bytes: int
    objective: str = "throughput"
    trials: int = 300
    timeout_s: float | None = 60.0
    verify: int = 0
    verify_steps: int = 8
    verify_timeout_s: float = 300.0
    lossless_only: bool = False
    batch_flag: str | None = None
    batch_values: list[int] = field(default_factory=list)
    storage: str | None = None  # optuna storage URL; None = in memory
    study_name: str | None = None
    seed: int = 0
    margin: float | None = None  # None = from the cost model's measured error
    profile_path: str | None = None
    progress: bool = False


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

    @property
    def verified_ok(self) -> bool:
        return bool(self.measured) and self.measured.get("status") == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "trial": self.number, "plan": self.describe, "predicted_peak_bytes": self.peak_bytes,
            "predicted_step_s": self.step_s, "predicted_throughput": self.throughput, "unit": self.unit,
            "fits": self.feasible, "lossy": self.lossy, "batch_size": self.batch_size, "measured": self.measured,
        }


@dataclass
class TuneResult:
    plan: Plan
    chosen: Candidate
    pareto: list[Candidate]
    smallest: Candidate
    verified: list[Candidate]
    budget_bytes: int
    limit_bytes: float
    margin: float
    margin_source: str
    objective: str
    study_name: str
    storage: str | None
    n_trials: int  # search trials in the study, this run and earlier ones
    new_trials: int
    elapsed_s: float
    warnings: list[str] = field(default_factory=list)
    output: str | None = None  # where plan.yaml was written

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output, "chosen": self.chosen.to_dict(), "pareto": [c.to_dict() for c in self.pareto],
            "smallest": self.smallest.to_dict(), "verified": [c.to_dict() for c in self.verified],
            "budget_bytes": self.budget_bytes, "limit_bytes": self.limit_bytes, "margin": self.margin,
            "margin_source": self.margin_source, "objective": self.objective, "study_name": self.study_name,
            "storage": self.storage, "n_trials": self.n_trials, "new_trials": self.new_trials,
            "elapsed_s": self.elapsed_s, "warnings": self.warnings, "plan": self.plan.to_dict(),
        }


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


_ROW = re.compile(r"^\|\s*(?P<plan>[^|]+?)\s*\|\s*(?P<meas>[0-9]+(?:\.[0-9]+)?)\s*\|\s*(?P<pred>[0-9]+(?:\.[0-9]+)?)\s*\|", re.M)
MAX_MARGIN = 0.15


def measured_peak_pairs(text: str) -> list[tuple[str, float, float]]:
    """(plan, measured, predicted) peaks from docs/accuracy.md's per-model tables (rows `| plan | measured GiB |
    predicted GiB | ...`; rows that failed or were not run have no number there and are skipped)."""
    return [(m["plan"], float(m["meas"]), float(m["pred"])) for m in _ROW.finditer(text) if float(m["meas"]) > 0]


def safety_margin(accuracy_md: str | Path | None = None) -> tuple[float, str]:
    """The fraction of the budget kept free, from the cost model's measured peak errors in docs/accuracy.md.

    What breaks a budget is an under-prediction (measured > predicted): a plan predicted at P with relative
    under-prediction u = (measured - P) / measured uses P / (1 - u), which stays within the budget B when
    P <= B * (1 - u). So the margin is the largest measured u, rounded up to the next whole percent (a little
    room for plans not measured), and at least 1%:

        margin = clamp(floor(100 * max_u) / 100 + 0.01, 0.01, 0.15)

    Over-predictions (predicted > measured, e.g. bf16 params +16.8% on an H100) only waste memory and do not
    count. On the H100 data of 2026-11-25 (46 plans) the worst is -0.9% (GPT-125M, compress int8 half: 8.66 GiB
    measured, 8.59 predicted): margin 1% (4% before the loss-forward fix, when the worst was -3.9%); 34 points
    of the tune benchmark's Llama sweep, re-predicted, are at worst -0.6%. Without the tables: the
    `median absolute peak error` line, at
    least DEFAULT_MARGIN; without the file: DEFAULT_MARGIN. Verification (`--verify`) measures the real peak
    and rejects plans over the budget whatever the margin.
    """
    if accuracy_md is None:
        # the number, not the doc: an installed memtune has no docs/ to read
        return PEAK_MARGIN, "largest measured peak under-prediction (docs/accuracy.md, H100)"
    path = Path(accuracy_md)
    try:
        text = path.read_text()
    except OSError:
        return DEFAULT_MARGIN, "default"
    pairs = measured_peak_pairs(text)
    if pairs:
        worst = max((meas - pred) / meas for _, meas, pred in pairs)
        frac = math.floor(100 * max(0.0, worst) + 1e-9) / 100 + 0.01
        frac = min(MAX_MARGIN, max(0.01, frac))
        return frac, f"largest peak under-prediction in {path.name} ({max(0.0, worst):.1%} over {len(pairs)} plans)"
    m = re.search(r"median absolute peak error[^0-9\n]{0,40}?([0-9]+(?:\.[0-9]+)?)\s*%", text, re.I)
    if m:
        return min(MAX_MARGIN, max(DEFAULT_MARGIN, float(m.group(1)) / 100)), f"median peak error in {path.name}"
    return DEFAULT_MARGIN, "default"


def default_storage(output: str | Path) -> str:
    """SQLite next to the plan: plan.yaml -> plan.study.db."""
    p = Path(output).resolve()
    return f"sqlite:///{p.with_name(p.stem + '.study.db')}"


def default_study_name(profile: Profile, opts: TuneOptions) -> str:
    parts = ["memtune", profile.digest(), f"{opts.budget_bytes}B", opts.objective]
    if opts.lossless_only:
        parts.append("lossless")
    if opts.batch_flag:
        parts.append(f"{opts.batch_flag.lstrip('-')}={','.join(map(str, opts.batch_values))}")
    return "-".join(parts)


# --- a stand-in trial: run strategies' space() with chosen values ------------------------------------------


class _ProbeTrial:
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
        for v in _ProbeTrial._NOOP:
            if any(c is v or (type(c) is type(v) and c == v) for c in dist.choices):
                return v
        return dist.choices[0]
    return dist.low


def _candidate_values(dist: Any) -> list[Any]:
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


# --- the search ---------------------------------------------------------------------------------------------


@dataclass
class _Eval:
    valid: bool
    error: str = ""
    plan: Plan | None = None
    key: str = ""
    describe: str = ""
    peak_bytes: float = math.inf
    step_s: float = math.inf
    throughput: float = 0.0
    unit: str = ""
    lossy: list[str] = field(default_factory=list)
    batch_size: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    distributions: dict[str, Any] = field(default_factory=dict)


def _canon(obj: Any) -> Any:
    """A JSON-able form with a stable order, for dicts with mixed keys (block indices and module paths)."""
    if isinstance(obj, dict):
        return [[repr(k), _canon(v)] for k, v in sorted(obj.items(), key=lambda kv: repr(kv[0]))]
    if isinstance(obj, (list, tuple)):
        return [_canon(v) for v in obj]
    return obj


def describe_plan(plan: Plan, knob: str | None = None) -> str:
    """One line for tables: each section's description, lossy ones labelled."""
    from memtune.strategies import get_strategy

    lossy = set(plan.lossy)
    parts = []
    for name, section in plan.sections.items():
        text = get_strategy(name).describe(section)
        parts.append(f"{name}: {text}" + (" [LOSSY]" if name in lossy else ""))
    if knob and plan.run.get("knobs", {}).get(knob) is not None:
        parts.append(f"{knob} {plan.run['knobs'][knob]}")
    return "; ".join(parts) or "unchanged (baseline)"


class _Tuner:
    def __init__(self, profile: Profile, opts: TuneOptions):
        from memtune.strategies import all_strategies

        if opts.objective not in OBJECTIVES:
            raise InputError(f"--objective {opts.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if opts.budget_bytes <= 0:
            raise InputError("--budget must be positive, e.g. 16GiB")
        self.profile = profile
        self.opts = opts
        device = profile.hardware.device or profile.device or "cpu"
        self.sopts = SearchOptions(lossless_only=opts.lossless_only, world_size=max(1, profile.world_size), device=device)
        self.strategies = all_strategies()
        if opts.margin is None:
            self.margin, self.margin_source = safety_margin()
        else:
            if not 0 <= opts.margin < 0.5:
                raise InputError(f"--margin {opts.margin:.0%}: give a fraction of the budget between 0% and 50%")
            self.margin, self.margin_source = opts.margin, "--margin"
        self.limit = opts.budget_bytes * (1 - self.margin)
        run: dict[str, Any] = {}
        if profile.module:
            run["module"] = profile.module
        elif profile.script:
            run["script"] = profile.script
        run["argv"] = list(profile.argv)
        self.run = run
        self.knob = opts.batch_flag
        self.knob_values = list(opts.batch_values)
        self.defaults: dict[str, Any] = {}
        if self.knob:
            bs = profile.batch_size if profile.batch_size in self.knob_values else self.knob_values[0]
            self.defaults[KNOB_PARAM] = bs
        self.evals = 0
        self.errors: list[str] = []

    # plan for a trial (real or probe)
    def propose(self, trial: Any) -> tuple[Plan, int | None]:
        from memtune.plan import Plan

        sections: dict[str, Any] = {}
        for s in self.strategies:
            section = s.space(trial, self.profile, self.sopts)
            if section is not None:
                sections[s.name] = section
        bs = None
        run = dict(self.run)
        if self.knob:
            bs = trial.suggest_categorical(KNOB_PARAM, self.knob_values)
            run["knobs"] = {self.knob: bs}
        plan = Plan.from_dict({**sections, "run": run}, source="search")
        return plan, bs

    def evaluate(self, trial: Any) -> _Eval:
        e = self._evaluate(trial)
        e.params, e.distributions = dict(trial.params), dict(trial.distributions)
        return e

    def _evaluate(self, trial: Any) -> _Eval:
        from memtune import costmodel

        self.evals += 1
        try:
            plan, bs = self.propose(trial)
        except MemtuneError as e:  # e.g. strategies proposed sections that contradict each other (PlanError)
            return _Eval(False, f"invalid plan: {e}")
        except Exception as e:  # a bug in some strategy's space(): keep searching, report it at the end
            msg = f"a strategy's space() failed: {type(e).__name__}: {e}"
            self.errors.append(msg)
            return _Eval(False, msg)
        lossy = list(plan.lossy)
        if self.opts.lossless_only and lossy:
            return _Eval(False, f"lossy sections {lossy} excluded by --lossless-only")
        try:
            est = costmodel.estimate(self.profile, plan, batch_size=bs)
        except MemtuneError as e:
            return _Eval(False, f"cost model: {e}")
        except Exception as e:  # a bug in some strategy's effect(): keep searching, report it at the end
            msg = f"cost model failed: {type(e).__name__}: {e}"
            self.errors.append(msg)
            return _Eval(False, msg)
        lossy = sorted(set(lossy) | set(est.lossy))
        if self.opts.lossless_only and lossy:
            return _Eval(False, f"lossy {lossy} excluded by --lossless-only")
        throughput = float(est.throughput)
        unit = est.throughput_unit
        if bs is not None and est.step_s > 0:
            throughput, unit = bs / est.step_s, "samples/s"
        key = json.dumps(_canon({"sections": plan.sections, "knobs": plan.run.get("knobs", {})}), default=str)
        return _Eval(True, plan=plan, key=key, describe=describe_plan(plan, self.knob), peak_bytes=float(est.peak_bytes),
                     step_s=float(est.step_s), throughput=throughput, unit=unit, lossy=lossy, batch_size=bs)

    def probe(self, fixed: dict[str, Any]) -> _Eval:
        return self.evaluate(_ProbeTrial(fixed, self.defaults))

    def plan_for(self, params: dict[str, Any]) -> Plan:
        e = self.probe(params)
        if not e.valid or e.plan is None:
            raise MemtuneError(f"cannot rebuild the plan of trial params {params}: {e.error}")
        return e.plan

    def objective_value(self, e: _Eval) -> float:
        if self.opts.objective == "memory":
            return e.peak_bytes / 2**30 if e.valid else 1e9
        return e.throughput if e.valid else 0.0

    def sort_key(self, e: _Eval) -> tuple:
        """Lower is better: valid, fits, then the objective, then the other quantity."""
        if not e.valid:
            return (2, 0.0, 0.0)
        over = e.peak_bytes > self.limit
        if over:
            return (1, e.peak_bytes, -e.throughput)
        if self.opts.objective == "memory":
            return (0, e.peak_bytes, -e.throughput)
        return (0, -e.throughput, e.peak_bytes)

    # coordinate search on the cost model: the cheapest-memory plan, and a greedy best plan
    def coordinate(self, start: dict[str, Any], key: Callable[[_Eval], tuple], max_evals: int = 250) -> _Eval:
        """Change one parameter at a time while `key` improves (deterministic; a few hundred estimates at most)."""
        best = self.probe(start)
        used = 1
        for _ in range(3):
            improved = False
            for name, dist in list(best.distributions.items()):
                for v in _candidate_values(dist):
                    if used >= max_evals:
                        return best
                    if v == best.params.get(name):
                        continue
                    e = self.probe({**best.params, name: v})
                    used += 1
                    if key(e) < key(best):
                        best, improved = e, True
            if not improved:
                break
        return best

    def memory_key(self, e: _Eval) -> tuple:
        return (0, e.peak_bytes, -e.throughput) if e.valid else (1, 0.0, 0.0)


# --- study plumbing ---------------------------------------------------------------------------------------


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")


def _has_set_constraint() -> bool:
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def _make_study(tuner: _Tuner, opts: TuneOptions, name: str):
    """(working study in memory, persistent study or None). The search runs in memory (a SQLite commit per
    suggested value would cost ~50 ms a trial) and its finished trials are written to storage afterwards."""
    import optuna

    _quiet_optuna()
    kwargs: dict[str, Any] = dict(seed=opts.seed, multivariate=True, group=True, n_startup_trials=10)
    if not _has_set_constraint():  # optuna < 5: constraints come from a function of the finished trial
        kwargs["constraints_func"] = lambda ft: ft.user_attrs.get("memtune_constraint", [0.0])
    direction = "minimize" if opts.objective == "memory" else "maximize"
    store = None
    if opts.storage:
        try:
            store = optuna.create_study(storage=opts.storage, study_name=name, direction=direction, load_if_exists=True)
        except ValueError as e:  # e.g. an existing study of the other direction
            raise InputError(f"study {name!r} in {opts.storage} cannot be reused ({e}): pass another --study-name") from None
        except Exception as e:  # bad storage URL, unreadable database
            if type(e).__module__.startswith(("sqlalchemy", "optuna")):
                raise InputError(f"cannot open the study storage {opts.storage!r}: {e}; give --storage sqlite:///path.db") from None
            raise
        if store.direction.name.lower() != direction:
            raise InputError(f"study {name!r} was created for the other objective: pass another --study-name")
    work = optuna.create_study(sampler=optuna.samplers.TPESampler(**kwargs), study_name=name, direction=direction)
    if store is not None:
        from optuna.trial import TrialState

        work.add_trials([t for t in store.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.FAIL)])
    return work, store


def _flush(work, store, start: int) -> None:
    """Write the working study's finished trials from index `start` on to the persistent study."""
    if store is None:
        return
    new = [t for t in work.get_trials(deepcopy=False)[start:] if t.state.is_finished()]
    if new:
        store.add_trials(new)


def _record(trial: Any, e: _Eval, limit: float, kind: str = "search") -> float:
    """Store the prediction in the trial's user attrs and its constraint (GiB over the limit)."""
    c = (e.peak_bytes - limit) / 2**30 if e.valid else 1e3
    trial.set_user_attr("memtune_kind", kind)
    trial.set_user_attr("memtune_constraint", [c])
    if e.valid:
        trial.set_user_attr("predicted_peak_bytes", e.peak_bytes)
        trial.set_user_attr("predicted_step_s", e.step_s)
        trial.set_user_attr("predicted_throughput", e.throughput)
        trial.set_user_attr("unit", e.unit)
        trial.set_user_attr("lossy", e.lossy)
        trial.set_user_attr("plan", e.describe)
        trial.set_user_attr("plan_key", e.key)
        trial.set_user_attr("batch_size", e.batch_size)
    else:
        trial.set_user_attr("error", e.error[:500])
    if _has_set_constraint() and hasattr(trial, "set_constraint"):
        trial.set_constraint("peak_over_budget_gib", c)
    return c


def _candidates(study, tuner: _Tuner) -> tuple[list[Candidate], dict[str, dict[str, Any]]]:
    """Evaluated search trials (valid, deduplicated by plan, first trial kept) and measurements by plan key."""
    from optuna.trial import TrialState

    seen: dict[str, Candidate] = {}
    measured: dict[str, dict[str, Any]] = {}
    for ft in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        ua = ft.user_attrs
        if ua.get("memtune_kind") == "verify" and ua.get("plan_key"):
            measured[ua["plan_key"]] = ua.get("measured", {})
            continue
        if ua.get("memtune_kind") != "search" or "predicted_peak_bytes" not in ua or ua["plan_key"] in seen:
            continue
        peak = float(ua["predicted_peak_bytes"])
        seen[ua["plan_key"]] = Candidate(
            number=ft.number, params=dict(ft.params), key=ua["plan_key"], describe=ua.get("plan", ""), peak_bytes=peak,
            step_s=float(ua["predicted_step_s"]), throughput=float(ua["predicted_throughput"]), unit=ua.get("unit", ""),
            objective=float(ft.value), feasible=peak <= tuner.limit, lossy=list(ua.get("lossy", [])),
            batch_size=ua.get("batch_size"),
        )
    return list(seen.values()), measured


def pareto_front(cands: list[Candidate]) -> list[Candidate]:
    """Plans no other plan beats on both peak (lower) and throughput (higher), by increasing peak."""
    front: list[Candidate] = []
    best_thr = -math.inf
    for c in sorted(cands, key=lambda c: (c.peak_bytes, -c.throughput)):
        if c.throughput > best_thr:
            front.append(c)
            best_thr = c.throughput
    return front


def _rank(cands: list[Candidate], objective: str) -> list[Candidate]:
    if objective == "memory":
        return sorted(cands, key=lambda c: (c.peak_bytes, -c.throughput, c.number))
    return sorted(cands, key=lambda c: (-c.throughput, c.peak_bytes, c.number))


# --- verification -----------------------------------------------------------------------------------------

_OOM = re.compile(r"out of memory|OutOfMemoryError", re.I)


def _read_apply_report(path: Path) -> dict[str, Any]:
    """Measured peak and step time from `memtune apply --report` (tolerant of the report's layout)."""
    data = json.loads(path.read_text())

    def pick(*paths: str) -> Any:
        for p in paths:
            cur: Any = data
            for part in p.split("."):
                cur = cur.get(part) if isinstance(cur, dict) else None
            if cur is not None:
                return cur
        return None

    return {
        "peak_bytes": pick("peak_allocated_bytes", "measured.peak_bytes", "peak_bytes", "peak.allocated_bytes"),
        "step_s": pick("measured.step_s", "step_s", "step_time_s", "median_step_s"),
        "failure": pick("failure", "error"),
        "raw": data,
    }


def verify_plan(plan: Plan, cand: Candidate, tuner: _Tuner, workdir: Path, budget: int) -> dict[str, Any]:
    """Run `memtune apply` on one plan in a subprocess for a few steps; an OOM is a failed verification."""
    idx = cand.number
    plan_path = workdir / f"plan-{idx}.yaml"
    report = workdir / f"apply-{idx}.json"
    plan.save(plan_path)
    cmd = [sys.executable, "-m", "memtune", "apply", str(plan_path), "--steps", str(tuner.opts.verify_steps),
           "--report", str(report)]
    cwd = tuner.profile.cwd if tuner.profile.cwd and Path(tuner.profile.cwd).is_dir() else None
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=tuner.opts.verify_timeout_s)
        out, rc = (proc.stdout or "") + (proc.stderr or ""), proc.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"status": "timeout", "detail": f"no result within {tuner.opts.verify_timeout_s:.0f} s",
                "wall_s": time.perf_counter() - t0}
    res: dict[str, Any] = {"wall_s": round(time.perf_counter() - t0, 2)}
    rep: dict[str, Any] = {}
    if report.is_file():
        with contextlib.suppress(ValueError, OSError):
            rep = _read_apply_report(report)
    failure = rep.get("failure")
    fail_text = json.dumps(failure) if failure else ""
    if _OOM.search(fail_text) or (rc != 0 and _OOM.search(out)):
        res.update(status="oom", detail="out of memory")
        return res
    if rc != 0 or failure or rep.get("step_s") is None:
        tail = " ".join(out.strip().splitlines()[-3:])[-400:]
        res.update(status="failed", detail=f"exit {rc}: {tail or fail_text or 'no report written'}")
        return res
    step_s = float(rep["step_s"])
    peak = rep.get("peak_bytes")
    # the allocator's peak (max_memory_allocated) on a GPU; none on a CPU run, where only time is checked
    res.update(step_s=step_s, peak_bytes=float(peak) if peak is not None else None)
    # measured throughput in the prediction's unit: predicted work per step over the measured step time
    res["throughput"] = cand.throughput * cand.step_s / step_s if step_s > 0 else 0.0
    if peak is not None and float(peak) > budget:
        res.update(status="over budget", detail=f"measured peak {format_bytes(float(peak))} > budget {format_bytes(budget)}")
        return res
    res["status"] = "ok"
    return res


def _add_verify_trial(study, cand: Candidate, ft_params: dict, ft_dists: dict, m: dict[str, Any], tuner: _Tuner) -> None:
    """Measured against predicted, as a trial of its own (finished trials are read-only in Optuna)."""
    import optuna

    ok = m.get("status") == "ok"
    if tuner.opts.objective == "memory":
        peak = m.get("peak_bytes") or cand.peak_bytes
        value = peak / 2**30 if ok else 1e9
    else:
        value = float(m.get("throughput", 0.0)) if ok else 0.0
    peak_m = m.get("peak_bytes")
    c = ((peak_m if peak_m is not None else cand.peak_bytes) - tuner.opts.budget_bytes) / 2**30 if ok else 1e3
    attrs = {"memtune_kind": "verify", "of_trial": cand.number, "plan_key": cand.key, "plan": cand.describe,
             "predicted_peak_bytes": cand.peak_bytes, "predicted_step_s": cand.step_s,
             "predicted_throughput": cand.throughput, "unit": cand.unit, "measured": m, "memtune_constraint": [c]}
    kwargs: dict[str, Any] = dict(value=value, params=ft_params, distributions=ft_dists, user_attrs=attrs)
    if _has_set_constraint():
        kwargs["constraints"] = {"peak_over_budget_gib": c}
    else:
        kwargs["system_attrs"] = {"constraints": (c,)}
    study.add_trial(optuna.trial.create_trial(**kwargs))


# --- the entry point -----------------------------------------------------------------------------------------


def _reserved_ratio(profile: Profile) -> float | None:
    """Reserved / allocated bytes at the profiled peak (the caching allocator's slack), when measured."""
    pk = profile.peak
    if not pk.measured or pk.allocated_bytes <= 0 or pk.reserved_bytes <= pk.allocated_bytes:
        return None
    return pk.reserved_bytes / pk.allocated_bytes


def tune(profile: Profile, opts: TuneOptions, console: Any = None) -> TuneResult:
    """Search plans on the cost model, optionally verify the best for real; returns the chosen plan and the front."""
    import optuna

    t0 = time.perf_counter()
    tuner = _Tuner(profile, opts)
    warn: list[str] = []
    gpu = profile.hardware.gpu_total_bytes
    if gpu and opts.budget_bytes > gpu:
        warn.append(f"budget {format_bytes(opts.budget_bytes)} is above the GPU's memory "
                    f"({format_bytes(gpu)}, {profile.hardware.gpu_name or 'GPU'}): plans that need more cannot run on it")
    elif gpu and (slack := _reserved_ratio(profile)) and opts.budget_bytes * slack > gpu:
        # the budget counts allocations; the caching allocator reserves more than it hands out
        warn.append(f"budget {format_bytes(opts.budget_bytes)} counts PyTorch's allocations; the profiled run "
                    f"reserved {slack:.2f}x what it allocated at its peak, so a plan at the budget may need "
                    f"{format_bytes(opts.budget_bytes * slack)} of the GPU's {format_bytes(gpu)} (plus the CUDA "
                    f"context): --budget {format_bytes(gpu / slack)} or less leaves that room")

    # the obvious plans, found on the cost model before the study starts
    baseline = tuner.probe({})
    if not baseline.valid and tuner.errors:
        raise MemtuneError(f"the cost model cannot evaluate the unchanged run: {tuner.errors[0]}")
    smallest = tuner.coordinate({}, tuner.memory_key)
    greedy = tuner.coordinate(smallest.params if smallest.valid else {}, tuner.sort_key)
    seeds = [baseline.params]
    n_rep = len(profile.repeated_blocks)
    if n_rep:  # checkpoint everything, under the shared helper's name or checkpoint's own
        every = tuner.probe({"blocks.recompute": n_rep, "checkpoint.k": n_rep, "checkpoint.mode": "full"})
        if every.valid:
            seeds.append(every.params)
    seeds += [smallest.params, greedy.params]

    name = opts.study_name or default_study_name(profile, opts)
    study, store = _make_study(tuner, opts, name)
    n_before = len(study.get_trials(deepcopy=False))
    if not any(ft.user_attrs.get("memtune_kind") == "search" for ft in study.get_trials(deepcopy=False)):
        done: list[str] = []
        for p in seeds:
            k = json.dumps(_canon(p), default=str)
            if k not in done:
                done.append(k)
                study.enqueue_trial(p, user_attrs={"memtune_seed": True})
    for s in (study, store):
        if s is not None:
            s.set_user_attr("budget_bytes", opts.budget_bytes)
            s.set_user_attr("limit_bytes", tuner.limit)
            s.set_user_attr("profile_digest", profile.digest())

    def objective(trial: optuna.Trial) -> float:
        e = tuner.evaluate(trial)
        _record(trial, e, tuner.limit)
        return tuner.objective_value(e)

    try:
        with _progress(console, opts) as prog:
            task = prog.add_task("searching plans on the cost model", total=opts.trials) if prog else None

            def cb(study, ft):
                if prog:
                    prog.advance(task)

            study.optimize(objective, n_trials=opts.trials, timeout=opts.timeout_s, callbacks=[cb],
                           gc_after_trial=False, show_progress_bar=False)
    finally:  # an interrupted search still keeps what it found
        _flush(study, store, n_before)
    new_trials = len(study.get_trials(deepcopy=False)) - n_before

    cands, measured = _candidates(study, tuner)
    for c in cands:
        c.measured = measured.get(c.key)
    valid_smallest = min([c for c in cands], key=lambda c: (c.peak_bytes, -c.throughput), default=None)
    if valid_smallest is None:
        first = tuner.errors[0] if tuner.errors else "every proposed plan was invalid"
        raise MemtuneError(f"no plan could be evaluated: {first}")
    smallest_c = valid_smallest
    feasible = [c for c in cands if c.feasible]
    if not feasible:
        need = smallest_c.peak_bytes / (1 - tuner.margin)
        hint = "; --lossless-only leaves out lossy plans that may go lower" if opts.lossless_only else ""
        raise BudgetTooSmall(
            f"budget {format_bytes(opts.budget_bytes)} is below the smallest peak memtune can reach for this run: "
            f"{format_bytes(smallest_c.peak_bytes)} predicted with [{smallest_c.describe}] (trial {smallest_c.number}); "
            f"with the {tuner.margin:.0%} safety margin it needs a budget of at least {format_bytes(need)}: raise "
            f"--budget, or make the run smaller (batch size, sequence length){hint}"
        )
    ranked = _rank(feasible, opts.objective)
    verified: list[Candidate] = []
    chosen = ranked[0]
    if opts.verify > 0:
        chosen = _verify((study, store), tuner, ranked, console, opts, verified)

    plan = tuner.plan_for(chosen.params)
    import torch

    from memtune import __version__

    plan.provenance = {
        "tool": f"memtune tune {__version__}",
        "memtune_version": __version__,
        "torch_version": str(torch.__version__),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "profile": opts.profile_path,
        "profile_digest": profile.digest(),
        "budget_bytes": opts.budget_bytes,
        "budget": format_bytes(opts.budget_bytes),
        "safety_margin": round(tuner.margin, 4),
        "margin_source": tuner.margin_source,
        "objective": opts.objective,
        "lossless_only": opts.lossless_only,
        "lossy": chosen.lossy,
        "predicted": {"peak_bytes": int(chosen.peak_bytes), "peak": format_bytes(chosen.peak_bytes),
                      "step_s": chosen.step_s, "throughput": chosen.throughput, "unit": chosen.unit},
        "measured": _measured_summary(chosen.measured),
        "study": {"name": name, "storage": opts.storage, "trial": chosen.number, "seed": opts.seed,
                  "trials": len(cands)},
    }
    return TuneResult(
        plan=plan, chosen=chosen, pareto=pareto_front(cands), smallest=smallest_c, verified=verified,
        budget_bytes=opts.budget_bytes, limit_bytes=tuner.limit, margin=tuner.margin, margin_source=tuner.margin_source,
        objective=opts.objective, study_name=name, storage=opts.storage,
        n_trials=sum(1 for ft in study.get_trials(deepcopy=False) if ft.user_attrs.get("memtune_kind") == "search"),
        new_trials=new_trials, elapsed_s=time.perf_counter() - t0, warnings=warn + _error_summary(tuner),
    )


def _error_summary(tuner: _Tuner) -> list[str]:
    if not tuner.errors:
        return []
    return [f"{len(tuner.errors)} plan evaluations failed inside the cost model (first: {tuner.errors[0]})"]


def _measured_summary(m: dict[str, Any] | None) -> dict[str, Any] | None:
    if not m:
        return None
    keep = ("status", "peak_bytes", "step_s", "throughput", "detail", "wall_s")
    out = {k: m[k] for k in keep if m.get(k) is not None}
    if m.get("peak_bytes") is not None:
        out["peak"] = format_bytes(m["peak_bytes"])
    return out


def _items(plan: Plan) -> set[str]:
    return {json.dumps([name, _canon(sec)], default=str) for name, sec in plan.sections.items()}


def _likely_fails(cand: Candidate, plan: Plan, failed: list[tuple[Candidate, Plan]]) -> bool:
    """After the first k all failed: skip plans predicted to use more memory than one that ran out of it, and
    plans holding a section that every crashed plan held (e.g. an optimizer the script cannot use)."""
    oom = [c.peak_bytes for c, _ in failed if c.measured and c.measured["status"] in ("oom", "over budget")]
    if oom and cand.peak_bytes >= min(oom):
        return True
    crashed = [_items(p) for c, p in failed if c.measured and c.measured["status"] in ("failed", "timeout")]
    common = set.intersection(*crashed) if crashed else set()
    return bool(common & _items(plan))


def _signature(plan: Plan) -> str:
    """A plan's kind, without its block lists and batch: the cost model's errors are shared within a kind
    (e.g. selective checkpointing measured 35% slower than predicted on an H100, docs/benchmarks.md)."""

    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): strip(x) for k, x in v.items() if not isinstance(x, (list, dict)) or x}
        if isinstance(v, list) or v == "all":
            return "*"
        return v

    return json.dumps({n: strip(sec) for n, sec in plan.sections.items()}, sort_keys=True, default=str)


def _diverse(ranked: list[Candidate], tuner: _Tuner, k: int) -> list[Candidate]:
    """The k plans to verify: the best predicted plan of each kind first, in predicted order, then the next best."""
    firsts: list[Candidate] = []
    seen: set[str] = set()
    for c in ranked[: max(50, 10 * k)]:
        sig = _signature(tuner.plan_for(c.params))
        if sig not in seen:
            seen.add(sig)
            firsts.append(c)
        if len(firsts) == k:
            break
    rest = [c for c in ranked if all(c.key != f.key for f in firsts)]
    return firsts + rest


def _verify(studies, tuner: _Tuner, ranked: list[Candidate], console: Any, opts: TuneOptions,
            verified: list[Candidate]) -> Candidate:
    """Run k plans for real (the best predicted of each kind); when all k fail, try up to k more that avoid
    the failures; pick the winner on measurements."""
    ranked = _diverse(ranked, tuner, opts.verify)
    study = studies[0]
    trials = {ft.number: ft for ft in study.get_trials(deepcopy=False)}
    k = opts.verify
    failed: list[tuple[Candidate, Plan]] = []
    with tempfile.TemporaryDirectory(prefix="memtune-verify-") as tmp, _progress(console, opts) as prog:
        task = prog.add_task("verifying the best plans for real", total=k) if prog else None
        for cand in ranked:
            n_ok = sum(c.verified_ok for c in verified)
            if len(verified) >= k and (n_ok or len(verified) >= 2 * k):
                break
            plan = tuner.plan_for(cand.params)
            if len(verified) >= k and _likely_fails(cand, plan, failed):
                continue
            if cand.measured is None:  # a resumed study keeps earlier measurements
                m = verify_plan(plan, cand, tuner, Path(tmp), opts.budget_bytes)
                cand.measured = m
                ft = trials[cand.number]
                for st in studies:
                    if st is not None:
                        _add_verify_trial(st, cand, ft.params, ft.distributions, m, tuner)
            verified.append(cand)
            if not cand.verified_ok:
                failed.append((cand, plan))
            if prog:
                prog.update(task, total=max(k, len(verified)), completed=len(verified))
    ok = [c for c in verified if c.verified_ok]
    if not ok:
        what = "; ".join(f"trial {c.number}: {c.measured.get('status')} ({c.measured.get('detail', '')})" for c in verified)
        if all(c.measured.get("status") in ("oom", "over budget") for c in verified):
            todo = "lower the predicted peak with a larger --margin (e.g. --margin 10%)"
        else:
            todo = "run one with `memtune apply PLAN` to see the script's error, or tune with --lossless-only"
        raise VerificationFailed(f"none of the {len(verified)} verified plans ran within the budget ({what}): {todo}")
    if opts.objective == "memory":
        return min(ok, key=lambda c: (c.measured.get("peak_bytes") or c.peak_bytes, -c.measured["throughput"]))
    return max(ok, key=lambda c: (c.measured["throughput"], -c.peak_bytes))


@contextlib.contextmanager
def _progress(console: Any, opts: TuneOptions):
    if not opts.progress:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as prog:
        yield prog


def parse_margin(text: str | float | None) -> float | None:
    """`5%` or `0.05` -> 0.05; None keeps the cost model's measured error."""
    if text is None or text == "":
        return None
    t = str(text).strip()
    try:
        return float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise InputError(f"bad --margin {text!r}: write a share of the budget, e.g. 5% or 0.05") from None


def tune_files(profile_path: str, budget: str, output: str = "plan.yaml", *, trials: int = 300,
               timeout: str | None = "60s", verify: int = 0, verify_steps: int = 8, objective: str = "throughput",
               lossless_only: bool = False, batch_knob: str | None = None, storage: str | None = None,
               study_name: str | None = None, seed: int = 0, margin: str | None = None, force: bool = False,
               progress: bool = False, console: Any = None) -> TuneResult:
    """What `memtune tune` does: parse, search (and verify), write plan.yaml with its provenance."""
    from memtune.io import check_writable
    from memtune.profile import Profile
    from memtune.units import parse_duration, parse_size

    out = check_writable(output, force)
    if trials < 1:
        raise InputError("--trials must be at least 1")
    if verify < 0 or verify_steps < 1:
        raise InputError("--verify takes a number of plans >= 0 and --verify-steps a number of steps >= 1")
    flag, values = parse_batch_knob(batch_knob)
    prof = Profile.load(profile_path)
    if flag and not prof.batch_size:
        raise InputError(f"--batch-knob {flag}: the profile does not know its batch size, so its memory cannot be "
                         "scaled; profile a script whose inputs show the batch")
    opts = TuneOptions(
        budget_bytes=parse_size(budget), objective=objective, trials=trials,
        timeout_s=parse_duration(timeout) if timeout else None, verify=verify, verify_steps=verify_steps,
        lossless_only=lossless_only, batch_flag=flag, batch_values=values,
        storage=storage or default_storage(out), study_name=study_name, seed=seed, margin=parse_margin(margin),
        profile_path=str(profile_path), progress=progress,
    )
    result = tune(prof, opts, console=console)
    result.plan.save(out)
    result.output = str(out)
    return result


# --- rendering ----------------------------------------------------------------------------------------------


def pareto_table(result: TuneResult):
    """The Pareto front of the plans that fit (predicted peak against throughput), the chosen plan marked and
    lossy sections labelled; verified plans show their measured peak and throughput."""
    from rich.table import Table

    unit = result.chosen.unit or "throughput"
    t = Table(title=f"Pareto front of plans that fit {format_bytes(result.budget_bytes)} (limit "
              f"{format_bytes(result.limit_bytes)} after the {result.margin:.0%} margin; predicted unless measured; "
              "★ chosen)",
              title_justify="left")
    t.add_column("", no_wrap=True)
    t.add_column("trial", justify="right", no_wrap=True)
    t.add_column("peak", justify="right", no_wrap=True)
    t.add_column(unit, justify="right", no_wrap=True)
    t.add_column("measured", justify="right", no_wrap=True)
    t.add_column("plan", ratio=1, min_width=20, overflow="fold")
    rows = [c for c in result.pareto if c.feasible]
    for c in [result.chosen, *result.verified]:
        if all(c.key != r.key for r in rows):
            rows.append(c)
    for c in sorted(rows, key=lambda c: c.peak_bytes):
        mark = "[bold green]★[/]" if c.key == result.chosen.key else ""
        meas = ""
        if c.measured:
            m = c.measured
            if m.get("status") == "ok":
                peak = format_bytes(m["peak_bytes"]) if m.get("peak_bytes") is not None else "-"
                meas = f"{peak}, {m['throughput']:.4g}"
            else:
                meas = f"[red]{m.get('status')}[/]"
        plan = c.describe.replace("[LOSSY]", "[bold yellow]\\[LOSSY][/]")
        t.add_row(mark, str(c.number), format_bytes(c.peak_bytes), f"{c.throughput:.4g}", meas, plan)
    return t
