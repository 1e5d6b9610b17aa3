"""Optuna plumbing: the working study in memory, its persistent copy in storage, and the trials memtune adds
(search trials carry a `TrialRecord`; a verification is a trial of its own)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memtune.errors import InputError
from memtune.tune.records import SEARCH, VERIFY, Candidate, TrialRecord

if TYPE_CHECKING:
    from memtune.profile import Profile
    from memtune.tune import TuneOptions
    from memtune.tune.evaluate import Eval, Tuner


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


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")


def _has_set_constraint() -> bool:
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def make_study(tuner: Tuner, opts: TuneOptions, name: str):
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


def flush(work, store, start: int) -> None:
    """Write the working study's finished trials from index `start` on to the persistent study."""
    if store is None:
        return
    new = [t for t in work.get_trials(deepcopy=False)[start:] if t.state.is_finished()]
    if new:
        store.add_trials(new)


def record(trial: Any, e: Eval, limit: float, corrections: Any = None) -> float:
    """Store the prediction in the trial's user attrs (a TrialRecord) and its constraint (GiB over the limit,
    with the peak corrected by what verification measured so far, `tuner.corrections`)."""
    peak = e.peak_bytes * corrections.peak_ratio(e.family) if corrections is not None else e.peak_bytes
    c = (peak - limit) / 2**30 if e.valid else 1e3
    if e.valid:
        rec = TrialRecord(SEARCH, c, plan=e.describe, plan_key=e.key, predicted_peak_bytes=e.peak_bytes,
                          predicted_step_s=e.step_s, predicted_throughput=e.throughput, unit=e.unit, lossy=e.lossy,
                          batch_size=e.batch_size, family=e.family)
    else:
        rec = TrialRecord(SEARCH, c, error=e.error[:500])
    for k, v in rec.to_attrs().items():
        trial.set_user_attr(k, v)
    if _has_set_constraint() and hasattr(trial, "set_constraint"):
        trial.set_constraint("peak_over_budget_gib", c)
    return c


def candidates(study, tuner: Tuner) -> tuple[list[Candidate], dict[str, dict[str, Any]]]:
    """Evaluated search trials (valid, deduplicated by plan, first trial kept) and measurements by plan key."""
    from optuna.trial import TrialState

    seen: dict[str, Candidate] = {}
    measured: dict[str, dict[str, Any]] = {}
    for ft in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        r = TrialRecord.from_attrs(ft.user_attrs)
        if r.kind == VERIFY and r.plan_key:
            measured[r.plan_key] = r.measured or {}
            continue
        if r.kind != SEARCH or not r.evaluated or r.plan_key in seen:
            continue
        peak = float(r.predicted_peak_bytes)
        seen[r.plan_key] = Candidate(
            number=ft.number, params=dict(ft.params), key=r.plan_key, describe=r.plan, peak_bytes=peak,
            step_s=float(r.predicted_step_s), throughput=float(r.predicted_throughput), unit=r.unit,
            objective=float(ft.value), feasible=peak <= tuner.limit, lossy=list(r.lossy), batch_size=r.batch_size,
            family=r.family,
        )
    return list(seen.values()), measured


def add_verify_trial(study, cand: Candidate, ft_params: dict, ft_dists: dict, m: dict[str, Any], tuner: Tuner) -> None:
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
    attrs = TrialRecord(VERIFY, c, plan=cand.describe, plan_key=cand.key, predicted_peak_bytes=cand.peak_bytes,
                        predicted_step_s=cand.step_s, predicted_throughput=cand.throughput, unit=cand.unit,
                        lossy=cand.lossy, batch_size=cand.batch_size, of_trial=cand.number, measured=m,
                        family=cand.family).to_attrs()
    kwargs: dict[str, Any] = dict(value=value, params=ft_params, distributions=ft_dists, user_attrs=attrs)
    if _has_set_constraint():
        kwargs["constraints"] = {"peak_over_budget_gib": c}
    else:
        kwargs["system_attrs"] = {"constraints": (c,)}
    study.add_trial(optuna.trial.create_trial(**kwargs))
