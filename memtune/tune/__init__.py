"""`memtune tune`: search the joint plan space on the cost model with Optuna, then verify the best plans.

- `space.py`: what a trial proposes (one block layout, each strategy's choices, the batch knob).
- `evaluate.py`: a proposal -> its Estimate; coordinate search for the seed plans.
- `records.py`: the one schema of a trial's records (read by the report too), the Pareto front, the choice.
- `study.py`: Optuna plumbing (in-memory search, persistent SQLite copy, verification trials).
- `margin.py`: the safety margin from the cost model's measured error.
- `verify.py`: the best plans run for real in subprocesses; the winner picked on measurements.

The study maximizes predicted throughput (samples/s with a batch knob) under the constraint
predicted_peak <= budget * (1 - margin). It is seeded with the obvious plans (baseline, checkpoint
everything, the cheapest-memory plan and a greedy best plan, both found by coordinate search on the cost
model), stored in SQLite next to the output so it resumes and opens in optuna-dashboard, and reproducible
for one seed. `verify=k` runs the k best predicted plans for real and picks the winner on measurements.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memtune.errors import BudgetTooSmall, InputError, Interrupted, MemtuneError, VerificationFailed
from memtune.tune.evaluate import OBJECTIVES, Tuner
from memtune.tune.margin import parse_margin
from memtune.tune.records import Candidate, pareto_front, rank
from memtune.tune.space import KNOB_PARAM, canon, parse_batch_knob
from memtune.tune.study import (
    Writer,
    candidates,
    check_storage,
    default_storage,
    default_study_name,
    flush,
    kept_trials,
    make_study,
    record,
    shown_url,
    sigint_stops,
)
from memtune.tune.verify import verify_best
from memtune.units import format_bytes

if TYPE_CHECKING:
    from memtune.plan import Plan
    from memtune.profile import Profile

__all__ = ["OBJECTIVES", "BudgetTooSmall", "Candidate", "TuneOptions", "TuneResult", "VerificationFailed", "tune",
           "tune_files"]

# seconds the search runs again under the corrected model when no verified plan fit
RESEARCH_S = 20.0
# progress(description, done, total): called as work advances; the CLI draws it (memtune/render.py)
ProgressFn = Callable[[str, int, "int | None"], None]
# notify(line): something the user should know as it happens (a resumed study); the CLI prints it on stderr
NotifyFn = Callable[[str], None]


@dataclass
class TuneOptions:
    budget_bytes: int
    objective: str = "throughput"
    trials: int = 300
    timeout_s: float | None = 60.0  # the whole search: seed plans, trials and writing them; not verification
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
    progress: ProgressFn | None = None
    notify: NotifyFn | None = None


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
    resumed_trials: int = 0  # trials the study held before this run
    search_s: float = 0.0  # seconds of search (what --timeout bounds); verification comes on top
    world_size: int = 1  # the profile's ranks: the plan runs under torchrun on as many

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output, "chosen": self.chosen.to_dict(), "pareto": [c.to_dict() for c in self.pareto],
            "smallest": self.smallest.to_dict(), "verified": [c.to_dict() for c in self.verified],
            "budget_bytes": self.budget_bytes, "limit_bytes": self.limit_bytes, "margin": self.margin,
            "margin_source": self.margin_source, "objective": self.objective, "study_name": self.study_name,
            "storage": self.storage, "n_trials": self.n_trials, "new_trials": self.new_trials,
            "elapsed_s": self.elapsed_s, "search_s": self.search_s, "resumed_trials": self.resumed_trials,
            "warnings": self.warnings, "plan": self.plan.to_dict(), "world_size": self.world_size,
        }


def _reserved_ratio(profile: Profile) -> float | None:
    """Reserved / allocated bytes at the profiled peak (the caching allocator's slack), when measured."""
    pk = profile.peak
    if not pk.measured or pk.allocated_bytes <= 0 or pk.reserved_bytes <= pk.allocated_bytes:
        return None
    return pk.reserved_bytes / pk.allocated_bytes


def tune(profile: Profile, opts: TuneOptions) -> TuneResult:
    """Search plans on the cost model, optionally verify the best for real; returns the chosen plan and the front.

    `opts.timeout_s` bounds the search from this call on (seed plans, trials and writing them to storage, for a
    new study or a resumed one); verification is not counted. A Ctrl-C keeps the trials written so far and
    raises `Interrupted`."""
    t0 = time.perf_counter()
    state: dict[str, Any] = {"store": None, "name": opts.study_name}
    try:
        return _tune(profile, opts, t0, state)
    except KeyboardInterrupt:
        raise _interrupted(opts, state) from None


def _interrupted(opts: TuneOptions, state: dict[str, Any]) -> Interrupted:
    store, name = state["store"], state["name"]
    if store is None:
        return Interrupted("interrupted before the study was opened: nothing kept")
    where = " during verification" if state.get("verifying") else ""
    return Interrupted(f"interrupted{where}: {kept_trials(store)} trials kept in study {name!r} "
                       f"({shown_url(opts.storage or '')}); the same command resumes it")


def _tune(profile: Profile, opts: TuneOptions, t0: float, state: dict[str, Any]) -> TuneResult:
    import optuna

    deadline = t0 + opts.timeout_s if opts.timeout_s is not None else None
    tuner = Tuner(profile, opts)
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
    n_rep = len(profile.repeated_blocks)
    # every strategy's most memory-saving lossless choices at once, every block recomputed: plans for models
    # that do not fit need several sections together, which one change at a time from the baseline misses
    floor = tuner.probe(memory_seed(profile, tuner.sopts, n_rep))
    smallest = min([tuner.coordinate(start, tuner.memory_key) for start in
                    ([{}, floor.params] if floor.valid else [{}])], key=tuner.memory_key)
    greedy = tuner.coordinate(smallest.params if smallest.valid else {}, tuner.sort_key)
    if floor.valid and opts.batch_flag:
        # from the floor at each batch size that fits: one change at a time from batch 1 relaxes the plan
        # for that batch first and never reaches the large batches the floor makes room for
        for b in opts.batch_values:
            start = tuner.probe({**floor.params, KNOB_PARAM: b})
            if start.valid and start.peak_bytes <= tuner.limit:
                greedy = min(greedy, tuner.coordinate(start.params, tuner.sort_key), key=tuner.sort_key)
    seeds = [baseline.params]
    every = None
    if n_rep:  # checkpoint everything
        every = tuner.probe({"blocks.recompute": n_rep, "blocks.recompute.mode": "full"})
        if every.valid:
            seeds.append(every.params)
    lossy = lossy_seed(profile, tuner.sopts)
    if lossy:  # a frozen base quantized: the lossless floor cannot reach it one change at a time
        starts = [tuner.probe({**(every.params if every is not None and every.valid else {}), **lossy}),
                  tuner.probe(lossy)]
        for start in (e for e in starts if e.valid):
            seeds.append(start.params)
            greedy = min(greedy, tuner.coordinate(start.params, tuner.sort_key), key=tuner.sort_key)
    if floor.valid:
        seeds.append(floor.params)
    seeds += [smallest.params, greedy.params]

    name = opts.study_name or default_study_name(profile, opts)
    state["name"] = name
    study, store = make_study(tuner, opts, name)
    state["store"] = store
    n_before = len(study.get_trials(deepcopy=False))
    if n_before and opts.notify:
        opts.notify(f"resuming {n_before} trials of study {name!r} from {shown_url(opts.storage or '')}")
    done: list[str] = []
    if not any(ft.user_attrs.get("memtune_kind") == "search" for ft in study.get_trials(deepcopy=False)):
        for p in seeds:
            k = json.dumps(canon(p), default=str)
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
        record(trial, e, tuner.limit, tuner.corrections)
        return tuner.objective_value(e)

    done_trials = [0]
    writer = Writer(study, store, n_before, deadline)

    def cb(study, ft):
        done_trials[0] += 1
        if opts.progress:
            opts.progress("searching plans on the cost model", done_trials[0], opts.trials)
        # the seed plans (enqueued, so run first) run whatever the clock says: without them nothing to choose from
        if writer.after_trial() and done_trials[0] >= len(done):
            study.stop()

    with sigint_stops(study.stop) as sig:
        try:
            study.optimize(objective, n_trials=opts.trials, callbacks=[cb], gc_after_trial=False,
                           show_progress_bar=False)
        finally:  # an interrupted search still keeps what it found
            writer.write()
    if sig["interrupted"]:
        raise KeyboardInterrupt
    new_trials = len(study.get_trials(deepcopy=False)) - n_before
    search_s = time.perf_counter() - t0

    cands = _candidates(study, tuner)
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
    verified: list[Candidate] = []
    chosen = rank(feasible, opts.objective)[0]
    if opts.verify > 0:
        state["verifying"] = True

        def research() -> list[Candidate]:
            """More trials under the corrected model (its constraint uses the corrected peaks)."""
            n0 = len(study.get_trials(deepcopy=False))
            try:
                study.optimize(objective, n_trials=max(20, opts.trials // 3), timeout=RESEARCH_S,
                               gc_after_trial=False, show_progress_bar=False)
            finally:
                flush(study, store, n0)
            return _candidates(study, tuner)

        def neighbours(c: Candidate) -> list[Candidate]:
            """The verified plan at the knob's other batch sizes, evaluated (and recorded) under the model
            its measurement corrected: the search may never have tried them, and an over-predicted peak
            hid the larger ones (H200 7B, 2026-12-04: batch 10 verified, 12 and 14 never tried)."""
            n0 = len(study.get_trials(deepcopy=False))
            todo = [v for v in tuner.knob_values if v != c.batch_size]
            for v in todo:
                study.enqueue_trial({**c.params, KNOB_PARAM: v}, skip_if_exists=True)
            try:
                study.optimize(objective, n_trials=len(todo), gc_after_trial=False, show_progress_bar=False)
            finally:
                flush(study, store, n0)
            return _candidates(study, tuner)

        chosen = verify_best((study, store), tuner, cands, opts, verified, research=research,
                             neighbours=neighbours if tuner.knob else None)
        cands = _candidates(study, tuner)
        tuner.corrections.apply(cands, tuner.limit)

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
        # what the cost model said before any verified run corrected it (the number to judge it by)
        "model_predicted": {"peak_bytes": int(chosen.raw_peak_bytes), "peak": format_bytes(chosen.raw_peak_bytes),
                            "step_s": chosen.raw_step_s},
        "measured": _measured_summary(chosen.measured),
        "study": {"name": name, "storage": shown_url(opts.storage) if opts.storage else None,  # no password
                  "trial": chosen.number, "seed": opts.seed, "trials": len(cands)},
    }
    return TuneResult(
        plan=plan, chosen=chosen, pareto=pareto_front(cands), smallest=smallest_c, verified=verified,
        budget_bytes=opts.budget_bytes, limit_bytes=tuner.limit, margin=tuner.margin, margin_source=tuner.margin_source,
        objective=opts.objective, study_name=name, storage=opts.storage,
        n_trials=sum(1 for ft in study.get_trials(deepcopy=False) if ft.user_attrs.get("memtune_kind") == "search"),
        new_trials=new_trials, elapsed_s=time.perf_counter() - t0, warnings=warn + _error_summary(tuner),
        resumed_trials=n_before, search_s=search_s, world_size=max(1, profile.world_size),
    )


def _candidates(study: Any, tuner: Tuner) -> list[Candidate]:
    """The study's evaluated plans with their family and any measurement."""
    from memtune.tune.space import plan_family

    cands, measured = candidates(study, tuner)
    for c in cands:
        c.measured = measured.get(c.key)
        if c.family is None:  # a study written before families were recorded
            c.family = plan_family(tuner.plan_for(c.params))
    return cands


def memory_seed(profile: Profile, sopts: Any, n_rep: int) -> dict[str, Any]:
    """The registered strategies' `memory_seed` choices together, with every repeated block recomputed."""
    from memtune.strategies import all_strategies

    seed: dict[str, Any] = {"blocks.recompute": n_rep, "blocks.recompute.mode": "full"} if n_rep else {}
    for s in all_strategies():
        seed.update(s.memory_seed(profile, sopts))
    return seed


def lossy_seed(profile: Profile, sopts: Any) -> dict[str, Any]:
    """The registered strategies' `lossy_seed` choices together (empty under --lossless-only)."""
    from memtune.strategies import all_strategies

    seed: dict[str, Any] = {}
    for s in all_strategies():
        seed.update(s.lossy_seed(profile, sopts))
    return seed


def _error_summary(tuner: Tuner) -> list[str]:
    if not tuner.errors:
        return []
    return [f"{len(tuner.errors)} plan evaluations failed inside the cost model (first: {tuner.errors[0]})"]


def _measured_summary(m: dict[str, Any] | None) -> dict[str, Any] | None:
    if not m:
        return None
    keep = ("status", "peak_bytes", "step_s", "throughput", "detail", "wall_s", "ranks")
    out = {k: m[k] for k in keep if m.get(k) is not None}
    if m.get("peak_bytes") is not None:
        out["peak"] = format_bytes(m["peak_bytes"])
    return out


def _path_from(plan: Path, profile: str) -> str:
    """The profile's path as the plan records it: relative to the plan's folder when the profile is inside it
    (the pair moves together and reads the same from any current folder), else absolute."""
    import os

    prof = Path(profile).resolve()
    base = plan.resolve().parent
    return os.path.relpath(prof, base) if prof.is_relative_to(base) else str(prof)


def tune_files(profile_path: str, budget: str, output: str = "plan.yaml", *, trials: int = 300,
               timeout: str | None = "60s", verify: int = 0, verify_steps: int = 8, objective: str = "throughput",
               lossless_only: bool = False, batch_knob: str | None = None, storage: str | None = None,
               study_name: str | None = None, seed: int = 0, margin: str | None = None, force: bool = False,
               progress: ProgressFn | None = None, notify: NotifyFn | None = None) -> TuneResult:
    """What `memtune tune` does: check every argument and output, search (and verify), write plan.yaml with its
    provenance. `budget` is a size with its unit (an int: bytes)."""
    from memtune.io import check_writable
    from memtune.profile import Profile
    from memtune.units import parse_budget, parse_duration

    out = check_writable(output, force)
    if trials < 1:
        raise InputError("--trials must be at least 1")
    if verify < 0 or verify_steps < 1:
        raise InputError("--verify takes a number of plans >= 0 and --verify-steps a number of steps >= 1")
    budget_bytes = parse_budget(budget)
    timeout_s = parse_duration(timeout) if timeout is not None else None
    if timeout_s is not None and timeout_s <= 0:
        raise InputError(f"--timeout {timeout}: the search needs a positive time, e.g. 60s or 2m")
    if objective not in OBJECTIVES:
        raise InputError(f"--objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    flag, values = parse_batch_knob(batch_knob)
    mg = parse_margin(margin)
    if mg is not None and not 0 <= mg < 1:
        raise InputError(f"--margin {margin}: the share of the budget kept free must be at least 0% and below 100%")
    store_url = storage or default_storage(out)
    check_storage(store_url)
    prof = Profile.load(profile_path)
    if flag and not prof.batch_size:
        raise InputError(f"--batch-knob {flag}: the profile does not know its batch size, so its memory cannot be "
                         "scaled; profile a script whose inputs show the batch")
    opts = TuneOptions(
        budget_bytes=budget_bytes, objective=objective, trials=trials, timeout_s=timeout_s, verify=verify,
        verify_steps=verify_steps, lossless_only=lossless_only, batch_flag=flag, batch_values=values,
        storage=store_url, study_name=study_name, seed=seed, margin=mg, profile_path=_path_from(out, profile_path),
        progress=progress, notify=notify,
    )
    result = tune(prof, opts)
    result.plan.save(out)
    result.output = str(out)
    return result
