"""Optuna plumbing: the working study in memory, its persistent copy in storage, and the trials memtune adds
(search trials carry a `TrialRecord`; a verification is a trial of its own).

The search runs in memory and `Writer` copies its finished trials to storage as it goes (a trial costs
~80 ms to write through Optuna's RDB storage, more than evaluating it), so a `--timeout` bounds search and
writes together and a Ctrl-C (`sigint_stops`) loses at most the last few trials.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import warnings
from collections.abc import Iterator
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


# database drivers SQLAlchemy imports for a URL scheme -> the package that provides them
_DRIVER_PACKAGES = {"MySQLdb": "mysqlclient", "pymysql": "PyMySQL", "psycopg2": "psycopg2-binary",
                    "psycopg": "psycopg[binary]", "pg8000": "pg8000", "mysql": "mysql-connector-python",
                    "oracledb": "oracledb", "asyncpg": "asyncpg", "pyodbc": "pyodbc"}


def shown_url(url: str) -> str:
    """A storage URL as messages show it: the password masked."""
    from sqlalchemy.engine import make_url

    if url.startswith("sqlite:"):  # a file path, no password: exactly as given (the report reopens it)
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: show it as given
        return url


def check_storage(url: str) -> None:
    """Before the search: an SQLite file memtune can create or resume, or a database whose driver is installed."""
    from sqlalchemy.engine import make_url

    from memtune.io import check_dir

    try:
        u = make_url(url)
    except Exception:
        raise InputError(f"--storage {url!r} is not a database URL: write e.g. sqlite:///study.db") from None
    if u.get_backend_name() == "sqlite":
        db = u.database or ""
        if db in ("", ":memory:"):
            return
        p = Path(db)
        if p.exists():
            if not p.is_file():
                raise InputError(f"study storage {p} is not a regular file: give --storage sqlite:///another.db "
                                 "(or -o elsewhere)")
            with open(p, "rb") as f:
                head = f.read(16)
            if head and head != b"SQLite format 3\x00":
                raise InputError(f"study storage {p} is not an SQLite database: remove it or give --storage "
                                 "sqlite:///another.db (or -o elsewhere)")
        check_dir(p.parent, "--storage")
        return
    try:
        u.get_dialect().import_dbapi()
    except ModuleNotFoundError as e:
        mod = (e.name or "").split(".")[0]
        pkg = _DRIVER_PACKAGES.get(mod, mod)
        raise InputError(f"--storage {shown_url(url)} needs the database driver {mod!r}, which is not installed: "
                         f"pip install {pkg}, or use --storage sqlite:///study.db") from None
    except Exception as e:  # an unknown dialect or driver name
        raise InputError(f"--storage {shown_url(url)}: SQLAlchemy cannot use it ({e}): write e.g. "
                         "sqlite:///study.db or postgresql://host/db") from None


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
            raise InputError(f"study {name!r} in {shown_url(opts.storage)} cannot be reused ({e}): pass another "
                             "--study-name") from None
        except ModuleNotFoundError as e:  # a database driver (check_storage says it first, from tune_files)
            raise InputError(f"--storage {shown_url(opts.storage)} needs the module {e.name!r}: install it, or "
                             "use --storage sqlite:///study.db") from None
        except Exception as e:  # bad storage URL, unreadable database
            if type(e).__module__.startswith(("sqlalchemy", "optuna")):
                msg = " ".join(str(e).split())[:300]
                raise InputError(f"cannot open the study storage {shown_url(opts.storage)!r}: {msg}; give --storage "
                                 "sqlite:///path.db") from None
            raise
        if store.direction.name.lower() != direction:
            raise InputError(f"study {name!r} was created for the other objective: pass another --study-name")
    work = optuna.create_study(sampler=optuna.samplers.TPESampler(**kwargs), study_name=name, direction=direction)
    if store is not None:
        from optuna.trial import TrialState

        work.add_trials([t for t in store.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.FAIL)])
    return work, store


def flush(work, store, start: int) -> int:
    """Write the working study's finished trials from index `start` on to the persistent study, up to the first
    unfinished one (an enqueued seed not run yet); returns the index to start from next time."""
    trials = work.get_trials(deepcopy=False)
    end = start
    while end < len(trials) and trials[end].state.is_finished():
        end += 1
    if store is not None and end > start:
        store.add_trials(trials[start:end])
    return end


class Writer:
    """Copies the working study's finished trials to storage as the search goes, and says when to stop so
    that search and writes together end by `deadline` (perf_counter seconds; None: no deadline)."""

    def __init__(self, work, store, start: int, deadline: float | None, every_s: float = 2.0):
        self.work, self.store, self.next, self.deadline, self.every_s = work, store, start, deadline, every_s
        self.write_s = 0.0  # seconds spent writing
        self.written = 0
        self.last = time.perf_counter()

    def per_trial_s(self) -> float:
        # before the first write, Optuna's RDB storage on SQLite (~80 ms a trial on a 2-core CPU)
        return self.write_s / self.written if self.written else (0.08 if self.store is not None else 0.0)

    def pending(self) -> int:
        return len(self.work.get_trials(deepcopy=False)) - self.next

    def write(self) -> None:
        t = time.perf_counter()
        end = flush(self.work, self.store, self.next)
        if self.store is not None and end > self.next:
            self.written += end - self.next
            self.write_s += time.perf_counter() - t
        self.next = end
        self.last = time.perf_counter()

    def after_trial(self) -> bool:
        """Called after each trial: write when due; True when the search should stop for the deadline."""
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.write()
            now = time.perf_counter()
        if self.deadline is None:
            return False
        return now + self.pending() * self.per_trial_s() >= self.deadline


@contextlib.contextmanager
def sigint_stops(stop) -> Iterator[dict[str, bool]]:
    """While the search runs, a Ctrl-C asks it to stop after the trial in flight (`stop()`, and the returned
    flag set) instead of raising inside Optuna; a second Ctrl-C raises KeyboardInterrupt at once. Optuna's
    own log (which prints a traceback for a trial a KeyboardInterrupt ends) is quiet meanwhile."""
    import optuna

    state = {"interrupted": False}
    main = threading.current_thread() is threading.main_thread()
    old = signal.getsignal(signal.SIGINT) if main else None

    def handler(signum, frame):
        if state["interrupted"]:
            raise KeyboardInterrupt
        state["interrupted"] = True
        with contextlib.suppress(RuntimeError):
            stop()

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if main:
        signal.signal(signal.SIGINT, handler)
    try:
        yield state
    finally:
        if main:
            signal.signal(signal.SIGINT, old)
        optuna.logging.set_verbosity(verbosity)


def kept_trials(store) -> int:
    """How many trials the persistent study holds (0 without one)."""
    if store is None:
        return 0
    try:
        return len(store.get_trials(deepcopy=False))
    except Exception:  # the storage went away under an interrupt: say nothing rather than fail again
        return 0


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
