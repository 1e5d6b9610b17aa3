"""Evaluating plans on the cost model: one trial -> its plan -> Estimate, and coordinate search over fixed
plans (the seeds: the cheapest-memory plan and a greedy best plan)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memtune.errors import InputError, MemtuneError
from memtune.estimate import estimate
from memtune.plan import Plan
from memtune.strategies import describe_plan
from memtune.strategies.base import SearchOptions
from memtune.tune.margin import safety_margin
from memtune.tune.records import Corrections
from memtune.tune.space import KNOB_PARAM, ProbeTrial, candidate_values, plan_family, plan_key, propose_plan

if TYPE_CHECKING:
    from memtune.profile import Profile
    from memtune.tune import TuneOptions

OBJECTIVES = ("throughput", "memory")
# A lossy section must shorten the predicted step by more than this, or be what makes the plan fit (lower its
# peak by more than this for --objective memory), to be proposed at all.
LOSSY_MIN_GAIN = 0.02
# Host memory a plan may hold (optimizer state, masters, gradient buffers, offloaded tensors): this share of
# the profiled host's RAM; the rest is the OS, the CUDA driver, the Python process, the script's data.
HOST_RAM_SHARE = 0.85


@dataclass
class Eval:
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
    family: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    distributions: dict[str, Any] = field(default_factory=dict)


class Tuner:
    def __init__(self, profile: Profile, opts: TuneOptions):
        if opts.objective not in OBJECTIVES:
            raise InputError(f"--objective {opts.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if opts.budget_bytes <= 0:
            raise InputError("--budget must be positive, e.g. 16GiB")
        self.profile = profile
        self.opts = opts
        device = profile.hardware.device or profile.device or "cpu"
        self.sopts = SearchOptions(lossless_only=opts.lossless_only, world_size=max(1, profile.world_size), device=device)
        if opts.margin is None:
            self.margin, self.margin_source = safety_margin()
        else:
            if not 0 <= opts.margin < 0.5:
                raise InputError(f"--margin {opts.margin:.0%}: give a fraction of the budget between 0% and 50%")
            self.margin, self.margin_source = opts.margin, "--margin"
        self.limit = opts.budget_bytes * (1 - self.margin)
        ram = profile.hardware.host_ram_bytes
        self.host_limit = ram * HOST_RAM_SHARE if ram else None  # None: the profile did not say
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
        # measured against predicted, by plan family, from verified runs: the search's constraint uses the
        # corrected peak once there are some (records hold the raw predictions)
        self.corrections = Corrections()

    def propose(self, trial: Any) -> tuple[Plan, int | None]:
        """The plan for a trial (an Optuna trial or a ProbeTrial)."""
        return propose_plan(trial, self.profile, self.sopts, self.run, self.knob, self.knob_values)

    def evaluate(self, trial: Any) -> Eval:
        e = self._evaluate(trial)
        e.params, e.distributions = dict(trial.params), dict(trial.distributions)
        return e

    def _evaluate(self, trial: Any) -> Eval:
        self.evals += 1
        try:
            plan, bs = self.propose(trial)
        except MemtuneError as e:  # e.g. strategies proposed sections that contradict each other (PlanError)
            return Eval(False, f"invalid plan: {e}")
        except Exception as e:  # a bug in some strategy's space(): keep searching, report it at the end
            msg = f"a strategy's space() failed: {type(e).__name__}: {e}"
            self.errors.append(msg)
            return Eval(False, msg)
        lossy = list(plan.lossy)
        if self.opts.lossless_only and lossy:
            return Eval(False, f"lossy sections {lossy} excluded by --lossless-only")
        try:
            est = estimate(self.profile, plan, batch_size=bs)
        except MemtuneError as e:
            return Eval(False, f"cost model: {e}")
        except Exception as e:  # a bug in some strategy's effect(): keep searching, report it at the end
            msg = f"cost model failed: {type(e).__name__}: {e}"
            self.errors.append(msg)
            return Eval(False, msg)
        if self.host_limit is not None and est.host_bytes > self.host_limit:
            from memtune.units import format_bytes

            return Eval(False, f"host RAM: the plan needs {format_bytes(est.host_bytes)} of host memory, over "
                               f"{HOST_RAM_SHARE:.0%} of the profiled host's {format_bytes(self.profile.hardware.host_ram_bytes)}")
        lossy = sorted(set(lossy) | set(est.lossy))
        if self.opts.lossless_only and lossy:
            return Eval(False, f"lossy {lossy} excluded by --lossless-only")
        idle = self._lossy_buying_nothing(plan, bs, est)
        if idle:
            return Eval(False, f"lossy section {idle!r} buys nothing here: the plan without it is within "
                               f"{LOSSY_MIN_GAIN:.0%} on both peak and step time")
        throughput = float(est.throughput)
        unit = est.throughput_unit
        if bs is not None and est.step_s > 0:
            throughput, unit = bs / est.step_s, "samples/s"
        return Eval(True, plan=plan, key=plan_key(plan), describe=describe_plan(plan, self.knob),
                    family=plan_family(plan), peak_bytes=float(est.peak_bytes), step_s=float(est.step_s),
                    throughput=throughput, unit=unit, lossy=lossy, batch_size=bs)

    def _lossy_buying_nothing(self, plan: Plan, bs: int | None, est: Any) -> str | None:
        """The first lossy section that buys nothing here (4-bit states for 49 MiB of adapters): such a plan
        is not proposed. Without it the step is within LOSSY_MIN_GAIN and the plan still fits (objective
        throughput: a lower peak under a budget with room to spare buys nothing), or the peak is within
        LOSSY_MIN_GAIN too (objective memory)."""
        for name, cfg in plan.sections.items():
            if not cfg.lossy:
                continue
            rest = Plan(sections={n: c for n, c in plan.sections.items() if n != name}, run=plan.run)
            try:
                without = estimate(self.profile, rest, batch_size=bs)
            except MemtuneError:
                continue
            if without.step_s > est.step_s * (1 + LOSSY_MIN_GAIN):
                continue
            if self.opts.objective == "memory":
                if without.peak_bytes <= est.peak_bytes * (1 + LOSSY_MIN_GAIN):
                    return name
            elif without.peak_bytes <= max(self.limit, est.peak_bytes * (1 + LOSSY_MIN_GAIN)):
                return name
        return None

    def probe(self, fixed: dict[str, Any]) -> Eval:
        return self.evaluate(ProbeTrial(fixed, self.defaults))

    def plan_for(self, params: dict[str, Any]) -> Plan:
        e = self.probe(params)
        if not e.valid or e.plan is None:
            raise MemtuneError(f"cannot rebuild the plan of trial params {params}: {e.error}")
        return e.plan

    def objective_value(self, e: Eval) -> float:
        if self.opts.objective == "memory":
            return e.peak_bytes / 2**30 if e.valid else 1e9
        return e.throughput if e.valid else 0.0

    def sort_key(self, e: Eval) -> tuple:
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
    def coordinate(self, start: dict[str, Any], key: Callable[[Eval], tuple], max_evals: int = 250) -> Eval:
        """Change one parameter at a time while `key` improves (deterministic; a few hundred estimates at most)."""
        best = self.probe(start)
        used = 1
        for _ in range(3):
            improved = False
            for name, dist in list(best.distributions.items()):
                for v in candidate_values(dist):
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

    def memory_key(self, e: Eval) -> tuple:
        return (0, e.peak_bytes, -e.throughput) if e.valid else (1, 0.0, 0.0)
