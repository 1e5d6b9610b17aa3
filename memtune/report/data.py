"""The report's inputs and tables: a profile, a plan or a tuning study read, run through the cost model, and
shaped into the tables the figures draw and `--csv` writes (columns: docs/report.md)."""

from __future__ import annotations

import copy
import os
import pickle
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memtune.errors import InputError
from memtune.tune.records import SEARCH, VERIFY, Candidate, TrialRecord, chosen, pareto_front
from memtune.units import parse_budget, parse_size

if TYPE_CHECKING:
    import pandas as pd

    from memtune.costmodel import Estimate, SimStep
    from memtune.plan import Plan
    from memtune.profile import Profile

# --- the documented CSV columns (docs/report.md; tests check the files against these) ----------------------
CSV_COLUMNS: dict[str, list[str]] = {
    "memory": ["component", "baseline_bytes", "plan_bytes"],
    "blocks": ["block", "cls", "kind", "activation_bytes", "input_bytes", "fwd_s", "bwd_s", "plan_choice",
               "plan_kept_bytes"],
    "timeline": ["series", "index", "event", "t_s", "live_bytes"],
    "trials": ["trial", "state", "predicted_peak_bytes", "predicted_step_s", "predicted_throughput",
               "throughput_unit", "batch_size", "feasible", "pareto", "chosen", "lossy", "verify_status",
               "measured_peak_bytes", "measured_step_s", "measured_throughput", "plan"],
}

# Unknown components still draw (in matplotlib's default colours) after these.
# Breakdown keys as the cost model (memtune/costmodel `COMPONENTS`) or the profile-only fallback spell
# them -> the label a person reads, in stacking order (bottom first).
_COMPONENTS = [
    ("parameters", ("parameters", "params", "param")),
    ("master weights", ("master weights", "master")),
    ("buffers", ("buffers",)),
    ("other models", ("other models",)),
    ("gradients", ("gradients", "grads")),
    ("optimizer state", ("optimizer state", "optimizer_state")),
    ("inputs and fixed", ("inputs and fixed", "fixed")),
    ("activations", ("activations kept", "activations")),
    ("autocast weight copies", ("autocast weight copies",)),
    ("model output", ("model output", "logits")),
    ("recompute working set", ("recompute working set", "recompute")),
    ("gathered parameters", ("gathered parameters",)),
    ("transients", ("transient", "transients")),
    ("allocator overhead", ("allocator overhead", "allocator")),
]
_COLORS = {  # colour-blind-safe (Okabe-Ito) and fixed, so two reports compare at a glance
    "parameters": "#0072B2", "master weights": "#56B4E9", "buffers": "#8c8c8c", "other models": "#b0a890", "gradients": "#E69F00",
    "optimizer state": "#D55E00", "inputs and fixed": "#6b4c9a", "activations": "#009E73",
    "autocast weight copies": "#7fc9b0", "model output": "#999933",
    "recompute working set": "#F0E442", "gathered parameters": "#66c2a5", "transients": "#CC79A7",
    "allocator overhead": "#c8c8c8",
}
_MODE_COLORS = {"keep": "#0072B2", "recompute": "#E69F00", "selective": "#F0E442", "offload": "#56B4E9",
                "compress": "#009E73", "compress+offload": "#CC79A7"}
_SQLITE_MAGIC = b"SQLite format 3\x00"


# --- inputs ------------------------------------------------------------------------------------------------
@dataclass
class ReportData:
    kind: str  # "profile", "plan" or "study"
    source: str
    profile: Profile | None = None
    profile_source: str | None = None
    plan: Plan | None = None
    budget: float | None = None
    budget_label: str = "budget"
    baseline: Estimate | None = None
    planned: Estimate | None = None
    baseline_sim: SimStep | None = None
    planned_sim: SimStep | None = None
    block_modes: dict[str, str] = field(default_factory=dict)
    block_kept: dict[str, float] = field(default_factory=dict)
    allocator_timeline: list[tuple[float, float]] | None = None  # (seconds from start, live bytes)
    trials: pd.DataFrame | None = None
    study_name: str | None = None
    study_digest: str | None = None
    limit: float | None = None  # the budget less the safety margin the search kept free
    notes: list[str] = field(default_factory=list)


def detect_kind(path: str | os.PathLike) -> str:
    """What a report input is: 'profile' (JSON), 'plan' (YAML) or 'study' (Optuna SQLite)."""
    s = str(path)
    if s.startswith(("sqlite://", "postgresql://", "mysql://")):
        return "study"
    p = Path(s)
    if not p.exists():
        raise InputError(f"{p} not found: give a profile.json, a plan.yaml or a study's SQLite file")
    if p.is_dir():
        raise InputError(f"{p} is a directory: give a profile.json, a plan.yaml or a study's SQLite file")
    with open(p, "rb") as f:
        head = f.read(512)
    if head.startswith(_SQLITE_MAGIC):
        return "study"
    if p.suffix.lower() == ".json" or head.lstrip()[:1] == b"{":
        return "profile"
    if p.suffix.lower() in (".yaml", ".yml"):
        return "plan"
    text = head.decode("utf-8", "replace")
    if "memtune_plan" in text or ":" in text.split("\n", 1)[0]:
        return "plan"
    raise InputError(f"{p} is neither a memtune profile (JSON), a plan (YAML) nor a study (SQLite): "
                     "give one of those")


def load_report_data(source: str | os.PathLike, *, profile: str | os.PathLike | None = None,
                     budget: str | int | None = None, study_name: str | None = None) -> ReportData:
    """Read the input (and the profile a plan or study refers to) and run the cost model on it."""
    from memtune.strategies import load_plan

    kind = detect_kind(source)
    data = ReportData(kind=kind, source=str(source))
    if kind == "profile":
        data.profile = _load_profile(source)
        data.profile_source = str(source)
    elif kind == "plan":
        data.plan = load_plan(source)
        prof_path = profile or _profile_from_provenance(data.plan.provenance, Path(source).parent)
        if prof_path is None:
            raise InputError(f"{source} does not say which profile it was tuned on: pass --profile profile.json")
        data.profile = _load_profile(prof_path)
        data.profile_source = str(prof_path)
        want = data.plan.provenance.get("profile_digest")
        if want and data.profile.digest() != str(want):
            if profile is None:
                raise InputError(f"{prof_path} is not the profile {source} was tuned on (digest "
                                 f"{data.profile.digest()}, the plan's provenance says {want}): pass --profile "
                                 "PROFILE to draw the plan against another profile anyway")
            data.notes.append(f"{prof_path} is not the profile this plan was tuned on (digest "
                              f"{data.profile.digest()}, the plan says {want}): the plan is drawn against it as asked.")
        _study_of_plan(data, Path(source).parent, study_name)
    else:
        _load_study(data, str(source), study_name)
        prof_path = profile or data.profile_source
        if prof_path is not None:
            data.profile = _load_profile(prof_path)
            data.profile_source = str(prof_path)
            if data.study_digest and data.profile.digest() != data.study_digest:
                data.notes.append(f"{prof_path} is not the profile this study was tuned on (digest differs).")
            data.notes.append("Memory and block sections show the baseline; report the tuned plan.yaml to see the "
                              "chosen plan against it.")
        else:
            data.notes.append("The study does not name its profile file: pass --profile profile.json to add the "
                              "memory and block sections.")
    if budget is not None:
        data.budget, data.budget_label = float(parse_budget(budget)), "budget"
    elif data.budget is None and data.plan is not None:
        b = _first(data.plan.provenance, ("budget_bytes", "budget"))
        if b is not None:
            data.budget = float(parse_size(b))
    if data.profile is not None:
        _estimate(data)
        if data.budget is None and data.profile.hardware.gpu_total_bytes:
            data.budget, data.budget_label = float(data.profile.hardware.gpu_total_bytes), "GPU memory"
        data.allocator_timeline = _allocator_timeline(data)
    return data


def _study_of_plan(data: ReportData, base: Path, study_name: str | None) -> None:
    """A tuned plan names its study (provenance.study): draw it too, with the plan's trial as the chosen one."""
    st = (data.plan.provenance if data.plan else {}).get("study")
    if not isinstance(st, dict) or not st.get("storage"):
        return
    storage = str(st["storage"])
    if "://" not in storage or storage.startswith("sqlite:///"):
        path = Path(storage.removeprefix("sqlite:///"))
        path = base / path if (base / path).is_file() else path  # beside the plan first, then as written
        if not path.is_file():
            data.notes.append(f"The plan's study {storage} is not found here: the study section is left out.")
            return
        storage = str(path)
    _load_study(data, storage, study_name or st.get("name"), st.get("trial"))


def _load_profile(path: str | os.PathLike) -> Profile:
    from memtune.profile import Profile

    p = Path(path)
    if p.is_file() and detect_kind(p) != "profile":
        raise InputError(f"{p} is not a memtune profile (JSON): write one with `memtune profile SCRIPT`")
    return Profile.load(p)


def _profile_from_provenance(prov: dict[str, Any], base: Path) -> str | None:
    v = _first(prov, ("profile", "profile_path"))
    if isinstance(v, dict):
        v = _first(v, ("path", "file"))
    if not isinstance(v, str):
        return None
    for cand in (base / v, Path(v)):  # beside the plan first: never a same-named file of the current folder
        if cand.is_file():
            return str(cand)
    raise InputError(f"the plan was tuned on profile {v}, which is not found: pass --profile profile.json")


def _first(d: dict[str, Any] | None, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if d and d.get(k) is not None:
            return d[k]
    return None


def _estimate(data: ReportData) -> None:
    """Baseline and plan through the cost model; keep the simulated steps for per-block choices and times."""
    from memtune.costmodel import build_sim, simulate
    from memtune.estimate import apply_plan_effects, plan_batch_size

    prof = data.profile
    assert prof is not None
    data.baseline_sim = build_sim(prof)
    data.baseline = simulate(copy.deepcopy(data.baseline_sim))
    if data.plan is not None and data.plan.sections:
        data.planned_sim = apply_plan_effects(prof, data.plan, build_sim(prof, plan_batch_size(data.plan)))
        data.planned = simulate(copy.deepcopy(data.planned_sim))
        data.block_modes = {b.name: b.mode for b in data.planned_sim.blocks}
        data.block_kept = {b.name: float(b.kept) for b in data.planned_sim.blocks}


def sim_times(sim: SimStep, timeline: list[tuple[str, float]]) -> list[float]:
    """Start second of each timeline event (`start`, `fwd:B`, `loss`, `bwd:B`, `optimizer`, with an `mbN/`
    prefix under accumulation), from the simulated step's own durations; the last entry is the step's end."""
    blocks = {b.name: b for b in sim.blocks}
    t, out = 0.0, []
    for name, _ in timeline:
        out.append(t)
        ev = name.split("/", 1)[-1]
        kind, _, block = ev.partition(":")
        b = blocks.get(block)
        if kind == "fwd" and b is not None:
            t += b.fwd_s + b.extra_fwd_s
        elif kind == "bwd" and b is not None:
            t += b.bwd_s + b.recompute_s + b.extra_bwd_s
        elif ev == "loss":
            t += sim.other_s / max(1, sim.micro_batches)  # glue outside blocks: loss, data, logging
        elif ev == "optimizer":
            t += sim.opt_s
    out.append(t)
    return out


class _SafeUnpickler(pickle.Unpickler):
    """A memory snapshot is plain dicts and lists: refuse anything that would run code."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def _allocator_timeline(data: ReportData) -> list[tuple[float, float]] | None:
    """The allocator's live bytes over time, from a torch memory snapshot the profile points at.

    `profile.extra["memory_timeline"]` is either a path to `torch.cuda.memory._dump_snapshot()`'s pickle
    (relative paths are taken from the profile's folder), a dict with a "path", or a list of
    [seconds, live_bytes] pairs already reduced.
    """
    prof = data.profile
    ref = prof.extra.get("memory_timeline") if prof is not None else None
    if not ref:
        return None
    if isinstance(ref, list):
        return [(float(t), float(b)) for t, b in ref]
    if isinstance(ref, dict):
        if isinstance(ref.get("points"), list):
            return [(float(t), float(b)) for t, b in ref["points"]]
        ref = ref.get("path")
    p = Path(str(ref))
    if not p.is_absolute() and data.profile_source and not p.is_file():
        p = Path(data.profile_source).parent / p
    if not p.is_file():
        data.notes.append(f"The allocator's memory timeline {ref} was not found: only the simulated one is drawn.")
        return None
    try:
        with open(p, "rb") as f:
            snap = _SafeUnpickler(f).load()
        return snapshot_timeline(snap)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as e:
        data.notes.append(f"The allocator's memory timeline {p} could not be read ({e}): only the simulated "
                          "one is drawn.")
        return None


def snapshot_timeline(snap: dict[str, Any]) -> list[tuple[float, float]]:
    """Live allocated bytes over time from a `torch.cuda.memory._snapshot()` dict.

    The trace holds allocations and frees since recording started; the segments hold what is allocated at
    snapshot time. Live bytes at the start = allocated at the end - the trace's net change.
    """
    traces = snap.get("device_traces") or []
    if not traces or not any(traces):
        return []
    dev = max(range(len(traces)), key=lambda i: len(traces[i]))
    events = [e for e in traces[dev] if e.get("action") in ("alloc", "free_completed")]
    end = sum(b["size"] for s in snap.get("segments", []) if s.get("device", dev) == dev
              for b in s.get("blocks", []) if b.get("state") == "active_allocated")
    net = sum(e["size"] if e["action"] == "alloc" else -e["size"] for e in events)
    live = float(end - net)
    if not events:
        return []
    t0 = events[0].get("time_us", 0)
    out = [(0.0, live)]
    for e in events:
        live += e["size"] if e["action"] == "alloc" else -e["size"]
        out.append(((e.get("time_us", 0) - t0) / 1e6, live))
    return out


# --- studies -----------------------------------------------------------------------------------------------
# Read through the tuner's own record schema (memtune/tune/records.py), and chosen and Pareto by its rules.


def _study_url(source: str) -> str:
    if "://" in source:
        return source
    p = Path(source)
    try:
        con = sqlite3.connect(f"file:{p.resolve()}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise InputError(f"{p} is not a readable SQLite file ({e}): give a study written by `memtune tune`") from None
    if not {"studies", "trials"} <= tables:
        raise InputError(f"{p} is an SQLite file but not an Optuna study: give a study written by `memtune tune`")
    return f"sqlite:///{p.resolve()}"


def _load_study(data: ReportData, source: str, study_name: str | None, chosen_trial: int | None = None) -> None:
    import optuna
    import pandas as pd

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = _study_url(source)
    try:
        names = optuna.study.get_all_study_names(storage=url)
    except Exception as e:  # storage errors come from SQLAlchemy/optuna in many classes
        raise InputError(f"cannot open study storage {source} ({type(e).__name__}): check the path") from None
    if study_name is None:
        if len(names) != 1:
            raise InputError(f"{source} holds {len(names)} studies ({', '.join(names) or 'none'}): "
                             "choose one with --study NAME")
        study_name = names[0]
    elif study_name not in names:
        raise InputError(f"no study {study_name!r} in {source}; it holds: {', '.join(names) or 'none'}")
    study = optuna.load_study(study_name=study_name, storage=url)
    data.study_name = study_name
    sattrs = study.user_attrs
    b = _first(sattrs, ("budget_bytes", "budget"))
    if b is not None and data.budget is None:
        data.budget = float(parse_size(b))
    data.study_digest = sattrs.get("profile_digest")
    if sattrs.get("limit_bytes") is not None:
        data.limit = float(sattrs["limit_bytes"])
    prof = _first(sattrs, ("profile_path", "profile"))
    if isinstance(prof, str) and data.profile_source is None:
        cands = ([Path(source).parent / prof] if "://" not in source else []) + [Path(prof)]
        found = next((c for c in cands if c.is_file()), None)
        if found is not None:
            data.profile_source = str(found)

    rows: dict[int, dict[str, Any]] = {}
    cands: dict[int, Candidate] = {}
    keys: set[str] = set()
    verifies = []
    for t in study.trials:
        r = TrialRecord.from_attrs(t.user_attrs, t.system_attrs)
        if r.kind == VERIFY:
            verifies.append(r)
            continue
        if r.kind != SEARCH or (r.plan_key is not None and r.plan_key in keys):
            continue  # seeds and repeats of a plan already evaluated
        if r.plan_key is not None:
            keys.add(r.plan_key)
        peak = r.predicted_peak_bytes
        ok = t.state.name == "COMPLETE" and peak is not None and r.predicted_throughput is not None
        feasible = bool(ok and r.constraint <= 0)
        rows[t.number] = {
            "trial": t.number, "state": t.state.name, "predicted_peak_bytes": peak,
            "predicted_step_s": r.predicted_step_s, "predicted_throughput": r.predicted_throughput,
            "throughput_unit": r.unit or None, "batch_size": r.batch_size, "feasible": feasible, "pareto": False,
            "chosen": False, "lossy": ",".join(r.lossy), "verify_status": None, "measured_peak_bytes": None,
            "measured_step_s": None, "measured_throughput": None, "plan": r.plan,
        }
        if ok:
            cands[t.number] = Candidate(number=t.number, params={}, key=r.plan_key or str(t.number),
                                        describe=r.plan, peak_bytes=float(peak),
                                        step_s=float(r.predicted_step_s or 0.0),
                                        throughput=float(r.predicted_throughput), unit=r.unit, objective=0.0,
                                        feasible=feasible, lossy=r.lossy, batch_size=r.batch_size)
    for r in verifies:
        row = rows.get(r.of_trial)
        m = r.measured or {}
        if row is not None:
            row.update(verify_status=m.get("status"), measured_peak_bytes=m.get("peak_bytes"),
                       measured_step_s=m.get("step_s"), measured_throughput=m.get("throughput"))
            if r.of_trial in cands:
                cands[r.of_trial].measured = m
    df = pd.DataFrame(list(rows.values()), columns=CSV_COLUMNS["trials"])
    for col in ("predicted_peak_bytes", "predicted_step_s", "predicted_throughput", "measured_peak_bytes",
                "measured_step_s", "measured_throughput"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["batch_size"] = df["batch_size"].astype("Int64")
    front = {c.number for c in pareto_front(list(cands.values()))}
    df["pareto"] = [t in front for t in df["trial"]]
    objective = "memory" if study.direction.name.lower() == "minimize" else "throughput"
    if chosen_trial is None:
        pick = chosen(list(cands.values()), objective)
        chosen_trial_now = pick.number if pick is not None else None
    else:
        chosen_trial_now = chosen_trial
    df["chosen"] = [t == chosen_trial_now for t in df["trial"]]
    if chosen_trial is None and not df["chosen"].any() and df["verify_status"].notna().any():
        data.notes.append("No verified plan ran within the budget, so the study has no chosen plan: see "
                          "verify_status in trials.csv.")
    if chosen_trial is not None and not df["chosen"].any():
        data.notes.append(f"The plan's trial {chosen_trial} is not in study {study_name!r}.")
    data.trials = df


# --- tables ------------------------------------------------------------------------------------------------
def _canon(breakdown: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in breakdown.items():
        label = next((lab for lab, keys in _COMPONENTS if k.lower() in keys), k.replace("_", " "))
        out[label] = out.get(label, 0.0) + float(v)
    return out


def build_tables(data: ReportData) -> dict[str, pd.DataFrame]:
    import pandas as pd

    tables: dict[str, pd.DataFrame] = {}
    if data.baseline is not None and data.baseline.peak_bytes <= 0:
        data.notes.append("The profile holds no memory measurements (did the script run an optimizer step?): "
                          "profile it again; memory sections are left out.")
    elif data.baseline is not None:
        base = _canon(data.baseline.breakdown)
        plan = _canon(data.planned.breakdown) if data.planned is not None else {}
        order = [lab for lab, _ in _COMPONENTS]
        comps = [c for c in order if base.get(c) or plan.get(c)]  # components with bytes somewhere
        comps += sorted(c for c in (set(base) | set(plan)) - set(order) if base.get(c) or plan.get(c))
        mem = pd.DataFrame({"component": comps, "baseline_bytes": [round(base.get(c, 0.0)) for c in comps],
                            "plan_bytes": [round(plan.get(c, 0.0)) if data.planned is not None else None
                                           for c in comps]}, columns=CSV_COLUMNS["memory"])
        tables["memory"] = mem.astype({"baseline_bytes": "int64", "plan_bytes": "Int64"})
    if data.profile is not None and data.profile.blocks:
        rows = []
        for b in sorted(data.profile.blocks, key=lambda b: b.index):
            rows.append({"block": b.name, "cls": b.cls, "kind": b.kind, "activation_bytes": b.activation_bytes,
                         "input_bytes": b.input_bytes, "fwd_s": b.fwd_s, "bwd_s": b.bwd_s,
                         "plan_choice": data.block_modes.get(b.name, "keep") if data.plan is not None else "",
                         "plan_kept_bytes": data.block_kept.get(b.name, float("nan"))})
        tables["blocks"] = pd.DataFrame(rows, columns=CSV_COLUMNS["blocks"])
    tl_rows = []
    for series, est, sim in (("simulated baseline", data.baseline, data.baseline_sim),
                             ("simulated plan", data.planned, data.planned_sim)):
        if est is not None and sim is not None and est.timeline and est.peak_bytes > 0:
            times = sim_times(sim, est.timeline)
            events = [*est.timeline, ("end", est.timeline[-1][1])]  # hold the last level to the step's end
            for i, ((ev, b), t) in enumerate(zip(events, times, strict=True)):
                tl_rows.append({"series": series, "index": i, "event": ev, "t_s": t, "live_bytes": float(b)})
    if data.allocator_timeline:
        for i, (t, b) in enumerate(data.allocator_timeline):
            tl_rows.append({"series": "allocator (measured)", "index": i, "event": "", "t_s": t,
                            "live_bytes": b})
    if tl_rows:
        tables["timeline"] = pd.DataFrame(tl_rows, columns=CSV_COLUMNS["timeline"])
    if data.trials is not None:
        tables["trials"] = data.trials
    return tables
