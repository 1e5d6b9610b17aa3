"""`memtune report`: tables and plots a person would rather look at than read.

One input (a profile, a plan or a tuning study) -> one self-contained HTML file (plots embedded as base64
PNG, no external resources: it opens offline), and on request the same plots as PNG files and the tables as
CSV files (columns documented in docs/report.md).

Matplotlib draws through its object API (`matplotlib.figure.Figure` + Agg), never pyplot, so nothing global
changes in the caller; it is an optional extra and imported only here, lazily. pandas shapes the tables.
"""

from __future__ import annotations

import base64
import copy
import html
import io
import json
import math
import os
import pickle
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memtune.errors import EnvironmentNotSupported, InputError, MemtuneError
from memtune.io import write_bytes_atomic
from memtune.units import format_bytes, format_seconds, parse_size

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
# Breakdown keys as the cost model (memtune/costmodel.py `_COMPONENTS`) or the profile-only fallback spell
# them -> the label a person reads, in stacking order (bottom first).
_COMPONENTS = [
    ("parameters", ("parameters", "params", "param")),
    ("master weights", ("master weights", "master")),
    ("buffers", ("buffers",)),
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
    "parameters": "#0072B2", "master weights": "#56B4E9", "buffers": "#8c8c8c", "gradients": "#E69F00",
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
    from memtune.plan import Plan

    kind = detect_kind(source)
    data = ReportData(kind=kind, source=str(source))
    if kind == "profile":
        data.profile = _load_profile(source)
        data.profile_source = str(source)
    elif kind == "plan":
        data.plan = Plan.load(source)
        prof_path = profile or _profile_from_provenance(data.plan.provenance, Path(source).parent)
        if prof_path is None:
            raise InputError(f"{source} does not say which profile it was tuned on: pass --profile profile.json")
        data.profile = _load_profile(prof_path)
        data.profile_source = str(prof_path)
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
        data.budget, data.budget_label = float(parse_size(budget)), "budget"
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
        path = path if path.is_file() else base / path
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
    for cand in (Path(v), base / v):
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
    from memtune.costmodel import apply_plan_effects, build_sim, plan_batch_size, simulate

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
# Read as memtune/search.py writes them: each search trial carries user_attrs predicted_peak_bytes,
# predicted_step_s, predicted_throughput, unit, lossy, plan (a one-line description), plan_key, batch_size and
# memtune_constraint ([GiB over the limit]: feasible when <= 0); a verification is a trial of its own
# (memtune_kind "verify", of_trial, measured {status, peak_bytes, step_s, throughput}); the study carries
# budget_bytes, limit_bytes and profile_digest.


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
        cands = [Path(prof)] + ([Path(source).parent / prof] if "://" not in source else [])
        found = next((c for c in cands if c.is_file()), None)
        if found is not None:
            data.profile_source = str(found)

    rows: dict[int, dict[str, Any]] = {}
    keys: set[str] = set()
    verifies = []
    for t in study.trials:
        ua = t.user_attrs
        kind = ua.get("memtune_kind", "search")
        if kind == "verify":
            verifies.append(ua)
            continue
        if kind != "search" or (ua.get("plan_key") is not None and ua["plan_key"] in keys):
            continue  # seeds and repeats of a plan already evaluated
        if ua.get("plan_key") is not None:
            keys.add(ua["plan_key"])
        cons = ua.get("memtune_constraint") or t.system_attrs.get("constraints")
        peak = ua.get("predicted_peak_bytes")
        if cons is not None:
            feasible = all(c <= 0 for c in cons)
        else:
            feasible = peak is not None and (data.budget is None or peak <= data.budget)
        lossy = ua.get("lossy")
        rows[t.number] = {
            "trial": t.number, "state": t.state.name, "predicted_peak_bytes": peak,
            "predicted_step_s": ua.get("predicted_step_s"), "predicted_throughput": ua.get("predicted_throughput"),
            "throughput_unit": ua.get("unit"), "batch_size": ua.get("batch_size"),
            "feasible": bool(feasible and t.state.name == "COMPLETE" and peak is not None), "pareto": False,
            "chosen": False, "lossy": ",".join(lossy) if isinstance(lossy, list) else (lossy or ""),
            "verify_status": None, "measured_peak_bytes": None, "measured_step_s": None,
            "measured_throughput": None,
            "plan": ua.get("plan") if isinstance(ua.get("plan"), str) else json.dumps(ua.get("plan"), sort_keys=True),
        }
    for ua in verifies:
        row = rows.get(ua.get("of_trial"))
        m = ua.get("measured") or {}
        if row is not None:
            row.update(verify_status=m.get("status"), measured_peak_bytes=m.get("peak_bytes"),
                       measured_step_s=m.get("step_s"), measured_throughput=m.get("throughput"))
    df = pd.DataFrame(list(rows.values()), columns=CSV_COLUMNS["trials"])
    for col in ("predicted_peak_bytes", "predicted_step_s", "predicted_throughput", "measured_peak_bytes",
                "measured_step_s", "measured_throughput"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["batch_size"] = df["batch_size"].astype("Int64")
    valid = (df["state"] == "COMPLETE") & df["predicted_peak_bytes"].notna() & df["predicted_throughput"].notna()
    if valid.any():
        df.loc[valid, "pareto"] = pareto_mask(df.loc[valid, "predicted_peak_bytes"].tolist(),
                                              df.loc[valid, "predicted_throughput"].tolist())
    df["chosen"] = _chosen(df, chosen_trial, study.direction.name.lower() == "minimize")
    if chosen_trial is None and not df["chosen"].any() and df["verify_status"].notna().any():
        data.notes.append("No verified plan ran within the budget, so the study has no chosen plan: see "
                          "verify_status in trials.csv.")
    if chosen_trial is not None and not df["chosen"].any():
        data.notes.append(f"The plan's trial {chosen_trial} is not in study {study_name!r}.")
    data.trials = df


def _chosen(df: pd.DataFrame, chosen_trial: int | None, minimize_memory: bool) -> list[bool]:
    """The plan `memtune tune` picks: the one a plan file names, else the best measured among verified plans
    that ran, else the best feasible prediction (throughput first, or peak first for --objective memory)."""
    if chosen_trial is not None:
        return [t == chosen_trial for t in df["trial"]]
    ok = df[(df["verify_status"] == "ok") & df["measured_throughput"].notna()]
    if df["verify_status"].notna().any() and not len(ok):
        return [False] * len(df)  # every verified plan failed: `memtune tune` chose none
    if len(ok):
        best = ok["measured_throughput"].idxmax()
        if minimize_memory:
            best = ok.assign(p=ok["measured_peak_bytes"].fillna(ok["predicted_peak_bytes"])).sort_values(
                ["p", "measured_throughput"], ascending=[True, False]).index[0]
    else:
        f = df[df["feasible"]]
        if not len(f):
            return [False] * len(df)
        order = (["predicted_peak_bytes", "predicted_throughput"] if minimize_memory
                 else ["predicted_throughput", "predicted_peak_bytes"])
        best = f.sort_values(order + ["trial"], ascending=[minimize_memory, not minimize_memory, True]).index[0]
    return [i == best for i in df.index]


def pareto_mask(peaks: list[float], throughputs: list[float]) -> list[bool]:
    """Non-dominated points: no other point has lower-or-equal peak and higher-or-equal throughput (one strictly).

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


# --- figures -----------------------------------------------------------------------------------------------
def _mpl():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError:
        raise EnvironmentNotSupported("reports need matplotlib: pip install 'memtune[report]'") from None
    return Figure


def _unit(max_bytes: float) -> tuple[float, str]:
    return (2**30, "GiB") if max_bytes >= 2**30 else (2**20, "MiB") if max_bytes >= 2**20 else (2**10, "KiB")


def _budget_shown(data: ReportData, data_max: float) -> bool:
    """Draw the budget line only where it does not squash the data (a far-off GPU size is named instead)."""
    return bool(data.budget) and data.budget <= 2.5 * data_max


def _budget_note(ax, data: ReportData) -> None:
    if data.budget:
        ax.text(0.99, 0.98, f"{data.budget_label} {format_bytes(data.budget)}: off the scale", color="#c0392b",
                transform=ax.transAxes, ha="right", va="top", fontsize=9)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _style(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)


@dataclass
class Plot:
    name: str  # file stem for --png
    title: str
    caption: str
    png: bytes


def build_figures(data: ReportData, tables: dict[str, pd.DataFrame]) -> list[Plot]:
    Figure = _mpl()
    figs: list[Plot] = []
    if "memory" in tables:
        figs.append(_fig_memory(Figure, data, tables["memory"]))
    if "blocks" in tables:
        figs.append(_fig_blocks(Figure, data, tables["blocks"]))
    if "timeline" in tables:
        figs.append(_fig_timeline(Figure, data, tables["timeline"]))
    if "trials" in tables and len(tables["trials"]):
        figs.append(_fig_pareto(Figure, data, tables["trials"]))
        if tables["trials"][["measured_peak_bytes", "measured_step_s"]].notna().any().any():
            figs.append(_fig_verified(Figure, tables["trials"]))
    return figs


def _fig_memory(Figure, data: ReportData, df: pd.DataFrame) -> Plot:
    has_plan = data.planned is not None
    cols = ["baseline_bytes"] + (["plan_bytes"] if has_plan else [])
    labels = ["baseline"] + (["plan"] if has_plan else [])
    totals = [float(df[c].sum()) for c in cols]
    show_budget = _budget_shown(data, max(totals))
    top = max(totals + [data.budget if show_budget else 0.0])
    div, unit = _unit(top)
    fig = Figure(figsize=(9.5, 4.2))
    ax = fig.subplots()
    _style(ax)
    x = list(range(len(cols)))
    bottom = [0.0] * len(cols)
    negative: dict[str, float] = {}
    for _, row in df.iterrows():
        vals = [float(row[c]) / div for c in cols]
        for c, v in zip(labels, vals, strict=True):
            if v < 0:  # calibration can take bytes away: say so instead of drawing below the stack
                negative[f"{row['component']} ({c})"] = v * div
        vals = [max(v, 0.0) for v in vals]
        if not any(v > 0 for v in vals):
            continue
        ax.bar(x, vals, bottom=bottom, width=0.5, label=row["component"],
               color=_COLORS.get(row["component"]), edgecolor="white", linewidth=0.6)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    for xi, t, h in zip(x, totals, bottom, strict=True):
        ax.annotate(f"peak {format_bytes(t)}", (xi, h), textcoords="offset points", xytext=(0, 4), ha="center",
                    va="bottom", fontsize=10, bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.5})
    top = max([top] + [b * div for b in bottom])
    if not show_budget:
        _budget_note(ax, data)
    elif data.budget:
        ax.axhline(data.budget / div, color="#c0392b", linestyle="--", linewidth=1.5,
                   label=f"{data.budget_label} {format_bytes(data.budget)}")
    ax.set_xticks(x, labels)
    ax.set_xlim(-0.6, len(cols) - 0.4)
    ax.set_ylim(0, top / div * 1.12)
    ax.set_ylabel(f"bytes at the peak ({unit})")
    handles, names = ax.get_legend_handles_labels()  # components top-down as stacked, the budget last
    bars = [(h, n) for h, n in zip(handles, names, strict=True) if n in set(df["component"])][::-1]
    rest = [(h, n) for h, n in zip(handles, names, strict=True) if n not in set(df["component"])]
    ax.legend(*zip(*(bars + rest), strict=True), loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title("Memory at the predicted peak, by component", loc="left")
    caption = ("Stacked bars: what is live at the predicted peak of one training step. "
               + ("Baseline = the script as profiled; plan = the same step with the plan applied. "
                  if has_plan else "Baseline = the script as profiled. ")
               + (f"Dashed line: {data.budget_label} ({format_bytes(data.budget)}). " if data.budget else "")
               + ("Negative, so left out of the bars and counted in the peak: "
                  + ", ".join(f"{k} {format_bytes(v)}" for k, v in negative.items())
                  + " (the cost model's calibration to the measured peak)." if negative else ""))
    return Plot("memory", "Memory by component", caption, _png(fig))


def _short(names: list[str], repeated: list[str]) -> list[str]:
    """Drop the module-path prefix the repeated blocks share ("model.layers.3" -> "layers.3", and
    "model.embed_tokens" -> "embed_tokens" with it), so the axis labels stay short."""
    parts = [n.split(".") for n in repeated] or [n.split(".") for n in names]
    k = 0
    while all(len(p) > k + 2 for p in parts) and len({p[k] for p in parts}) == 1 and k < 1:
        k += 1
    prefix = ".".join(parts[0][:k]) + "." if k else ""
    return [n.removeprefix(prefix) if prefix and n.startswith(prefix) and n != prefix[:-1] else n for n in names]


def _fig_blocks(Figure, data: ReportData, df: pd.DataFrame) -> Plot:
    n = len(df)
    names = _short(df["block"].tolist(), df.loc[df["kind"] == "repeated", "block"].tolist())
    div, unit = _unit(float(df["activation_bytes"].max() or 1))
    tmax = float(max(df["fwd_s"].max(), df["bwd_s"].max()))
    tdiv, tunit = (1.0, "s") if tmax >= 1 else (1e-3, "ms") if tmax >= 1e-3 else (1e-6, "µs")
    fig = Figure(figsize=(max(9.5, 0.32 * n + 3), 5.6))
    ax1, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1.1, 1], "hspace": 0.12})
    _style(ax1)
    _style(ax2)
    x = list(range(n))
    has_plan = data.plan is not None
    modes = df["plan_choice"].tolist() if has_plan else ["keep"] * n
    colors = [_MODE_COLORS.get(m, "#444444") for m in modes]
    ax1.bar(x, df["activation_bytes"] / div, color=colors, width=0.75)
    if has_plan and df["plan_kept_bytes"].notna().any():
        ax1.scatter(x, df["plan_kept_bytes"] / div, marker="_", s=160, color="black", zorder=3,
                    label="kept under the plan")
    ax1.set_ylabel(f"activations ({unit})")
    if has_plan:
        from matplotlib.patches import Patch

        seen = list(dict.fromkeys(modes))
        handles = [Patch(color=_MODE_COLORS.get(m, "#444444"), label=m) for m in seen]
        if df["plan_kept_bytes"].notna().any():
            from matplotlib.lines import Line2D

            handles.append(Line2D([], [], color="black", marker="_", linestyle="", markersize=12,
                                  label="kept under the plan"))
        ax1.legend(handles=handles, title="plan choice", loc="center left", bbox_to_anchor=(1.01, 0.5),
                   frameon=False)
    w = 0.38
    ax2.bar([i - w / 2 for i in x], df["fwd_s"] / tdiv, width=w, color="#0072B2", label="forward")
    ax2.bar([i + w / 2 for i in x], df["bwd_s"] / tdiv, width=w, color="#E69F00", label="backward")
    ax2.set_ylabel(f"time per call ({tunit})")
    ax2.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax2.set_xticks(x, names, rotation=45 if n > 8 else 0, ha="right" if n > 8 else "center",
                   rotation_mode="anchor", fontsize=8)
    ax1.set_title("Per block: activations saved for backward, and forward/backward time", loc="left")
    caption = ("Top: bytes each block saves for its backward (parameters excluded)"
               + ("; the colour is the plan's choice for the block, the black tick what it keeps on the device "
                  "between its forward and backward under the plan." if has_plan else ".")
               + " Bottom: measured forward and backward seconds per call.")
    return Plot("blocks", "Blocks", caption, _png(fig))


def _fig_timeline(Figure, data: ReportData, df: pd.DataFrame) -> Plot:
    show_budget = _budget_shown(data, float(df["live_bytes"].max()))
    top = max(float(df["live_bytes"].max()), data.budget if show_budget else 0.0)
    div, unit = _unit(top)
    tmax = float(df["t_s"].max()) or 1.0
    tdiv, tunit = (1.0, "s") if tmax >= 2 else (1e-3, "ms")
    fig = Figure(figsize=(9.5, 4.0))
    ax = fig.subplots()
    _style(ax)
    colors = {"simulated baseline": "#0072B2", "simulated plan": "#009E73", "allocator (measured)": "#D55E00"}
    for series, g in df.groupby("series", sort=False):
        color = colors.get(series, "#444444")
        sim = series.startswith("simulated")
        i = g["live_bytes"].idxmax()
        label = f"{series}\npeak {format_bytes(g.loc[i, 'live_bytes'])}" + (f" at {g.loc[i, 'event']}" if sim else "")
        ax.step(g["t_s"] / tdiv, g["live_bytes"] / div, where="post", color=color,
                linewidth=1.8 if sim else 1.0, alpha=1.0 if sim else 0.85, label=label)
        ax.plot([g.loc[i, "t_s"] / tdiv], [g.loc[i, "live_bytes"] / div], "o", color=color, markersize=5)
    if not show_budget:
        _budget_note(ax, data)
    elif data.budget:
        ax.axhline(data.budget / div, color="#c0392b", linestyle="--", linewidth=1.2,
                   label=f"{data.budget_label} {format_bytes(data.budget)}")
    ax.set_xlim(0, tmax / tdiv)
    ax.set_ylim(0, top / div * 1.1)
    ax.set_xlabel(f"time into the step ({tunit})")
    ax.set_ylabel(f"live bytes ({unit})")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title("Memory over one step", loc="left")
    caption = ("The cost model's simulated step: the forward keeps each block's activations, the backward frees "
               "them and creates gradients, then the optimizer step; times are the profile's per-block times")
    if data.allocator_timeline:
        caption += ". Orange: the allocator's live bytes as PyTorch's memory history recorded them."
    else:
        caption += ". The allocator's real timeline is drawn here too when the profile was taken with " \
                   "`memtune profile --memory-timeline` on a GPU."
    return Plot("timeline", "Memory over one step", caption, _png(fig))


def _fig_pareto(Figure, data: ReportData, df: pd.DataFrame) -> Plot:
    d = df.dropna(subset=["predicted_peak_bytes", "predicted_throughput"])
    d = d[d["state"] == "COMPLETE"]
    pmax = float(d["predicted_peak_bytes"].max()) if len(d) else 1.0
    show_budget = _budget_shown(data, pmax)
    top = max(pmax, data.budget if show_budget else 0.0)
    div, unit = _unit(top)
    unit_t = next((u for u in d["throughput_unit"].dropna()), "samples/s")
    fig = Figure(figsize=(9.5, 4.4))
    ax = fig.subplots()
    _style(ax)
    y = "predicted_throughput"
    feas, infeas = d[d["feasible"]], d[~d["feasible"]]
    ax.scatter(feas["predicted_peak_bytes"] / div, feas[y], s=18, color="#8fa3b8", label="fits the budget")
    if len(infeas):
        ax.scatter(infeas["predicted_peak_bytes"] / div, infeas[y], s=18, marker="x", color="#e0a89f",
                   label="over the budget")
    front = d[d["pareto"]].sort_values("predicted_peak_bytes")
    if len(front):
        ax.step(front["predicted_peak_bytes"] / div, front[y], where="post", color="#0072B2", linewidth=1.5,
                marker="o", markersize=5, label="Pareto front")
    ver = d[d["verify_status"].notna()]
    if len(ver):
        ax.scatter(ver["predicted_peak_bytes"] / div, ver[y], s=70, facecolors="none", edgecolors="black",
                   linewidth=1.0, label="verified for real")
    ch = d[d["chosen"]]
    if len(ch):
        ax.scatter(ch["predicted_peak_bytes"] / div, ch[y], s=260, marker="*", color="#E69F00", edgecolor="black",
                   linewidth=0.8, zorder=5, label=f"chosen (trial {int(ch.iloc[0]['trial'])})")
    if not show_budget:
        _budget_note(ax, data)
    elif data.budget:
        ax.axvline(data.budget / div, color="#c0392b", linestyle="--", linewidth=1.2,
                   label=f"{data.budget_label} {format_bytes(data.budget)}")
        if data.limit and data.limit < data.budget:
            ax.axvline(data.limit / div, color="#c0392b", linestyle=":", linewidth=1.0,
                       label=f"less safety margin {format_bytes(data.limit)}")
    ax.set_xlabel(f"predicted peak memory ({unit})")
    ax.set_ylabel(f"predicted throughput ({unit_t})")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title("Study: peak memory against throughput", loc="left")
    caption = (f"{len(d)} distinct plans of study {data.study_name!r}, predicted by the cost model. The Pareto "
               "front joins the plans no other plan beats on both memory and throughput; the star is the chosen "
               "plan (crosses: over the budget less the safety margin).")
    return Plot("pareto", "Pareto front", caption, _png(fig))


def _fig_verified(Figure, df: pd.DataFrame) -> Plot:
    v = df[df["verify_status"].notna()]
    fig = Figure(figsize=(9.5, 4.0))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"wspace": 0.3})
    for ax in (ax1, ax2):
        _style(ax)
        ax.grid(axis="x", color="#e5e5e5", linewidth=0.8)
    pk = v.dropna(subset=["measured_peak_bytes"])
    if len(pk):
        div, unit = _unit(float(max(pk["predicted_peak_bytes"].max(), pk["measured_peak_bytes"].max())))
        _diag(ax1, pk["predicted_peak_bytes"] / div, pk["measured_peak_bytes"] / div, pk)
        ax1.set_xlabel(f"predicted peak ({unit})")
        ax1.set_ylabel(f"measured peak ({unit})")
    else:
        ax1.text(0.5, 0.5, "no peaks measured", ha="center", va="center", transform=ax1.transAxes)
        ax1.set_xticks([])
        ax1.set_yticks([])
    ax1.set_title("Peak memory", loc="left")
    st = v.dropna(subset=["predicted_step_s", "measured_step_s"])
    if len(st):
        _diag(ax2, st["predicted_step_s"] * 1e3, st["measured_step_s"] * 1e3, st)
        ax2.set_xlabel("predicted step (ms)")
        ax2.set_ylabel("measured step (ms)")
    else:
        ax2.text(0.5, 0.5, "no step times measured", ha="center", va="center", transform=ax2.transAxes)
        ax2.set_xticks([])
        ax2.set_yticks([])
    ax2.set_title("Step time", loc="left")
    caption = f"{len(v)} plans run for real ({', '.join(f'{n} {k}' for k, n in v['verify_status'].value_counts().items())}). "
    caption += "On the dashed diagonal the prediction is exact; the orange point is the chosen plan."
    if len(pk):
        err = (pk["measured_peak_bytes"] - pk["predicted_peak_bytes"]) / pk["measured_peak_bytes"]
        caption += (f" Peak error (measured - predicted) / measured: median {err.median():+.1%}, "
                    f"worst {err.abs().max():.1%}.")
    return Plot("verified", "Predicted against measured", caption, _png(fig))


def _diag(ax, x, y, rows) -> None:
    lo = float(min(x.min(), y.min())) * 0.95
    hi = float(max(x.max(), y.max())) * 1.05
    ax.plot([lo, hi], [lo, hi], color="#999999", linestyle="--", linewidth=1)
    colors = ["#E69F00" if c else "#0072B2" for c in rows["chosen"]]
    ax.scatter(x, y, s=36, color=colors, edgecolor="black", linewidth=0.5, zorder=3)
    for xi, yi, t in zip(x, y, rows["trial"], strict=True):
        ax.annotate(str(int(t)), (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7, color="#555555")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)


# --- HTML --------------------------------------------------------------------------------------------------
_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#222;margin:0;
background:#f6f7f9;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:24px 28px 48px;background:#fff;min-height:100vh}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.2em;margin:32px 0 8px;border-bottom:1px solid #e3e3e3;
padding-bottom:4px}.sub{color:#666;margin:0 0 16px;font-size:.92em}
img{max-width:100%;height:auto;display:block;margin:8px 0}
figcaption{color:#555;font-size:.9em;margin-bottom:10px}
table{border-collapse:collapse;font-size:.88em;margin:8px 0}
th,td{padding:3px 10px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th{background:#fafafa;text-align:right}td.l,th.l,td:first-child,th:first-child{text-align:left}
table.facts td{text-align:left;white-space:normal}table.facts td:first-child{color:#666;padding-right:18px}
.kpis{display:grid;grid-template-columns:repeat(auto-fill,minmax(132px,1fr));margin:12px 0}
.kpis{gap:10px}.kpi{border:1px solid #e3e3e3;border-radius:6px;padding:8px 12px}
.kpi b{display:block;font-size:1.3em}.kpi span{color:#666;font-size:.85em}
.lossy{color:#b03a2e;font-weight:bold}details{margin:6px 0}summary{cursor:pointer;color:#0b5cad}
div.scroll{overflow-x:auto}td.l{white-space:normal;min-width:60px}
ul.notes{color:#555;font-size:.9em}pre{background:#f6f8fa;padding:8px 12px;font-size:.85em;overflow-x:auto}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt_table(df: pd.DataFrame, fmt: dict[str, Any]) -> str:
    """An HTML table: numbers right-aligned, text left-aligned, empty cells for missing values."""
    import pandas as pd

    left = {c for c in df.columns if c not in fmt and df[c].dtype == object}

    def cell(col: str, v: Any) -> str:
        text = "" if v is None or (not isinstance(v, (list, dict)) and pd.isna(v)) else (fmt[col](v) if col in fmt else v)
        return f'<td class="l">{_e(text)}</td>' if col in left else f"<td>{_e(text)}</td>"

    head = "".join(f'<th class="l">{_e(c)}</th>' if c in left else f"<th>{_e(c)}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(cell(c, v) for c, v in zip(df.columns, row, strict=True)) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kpis(data: ReportData) -> str:
    items = []
    if data.baseline is not None:
        items.append((format_bytes(data.baseline.peak_bytes), "baseline peak (predicted)"))
    if data.profile is not None and data.profile.peak.allocated_bytes:
        what = "measured peak" if data.profile.peak.measured else "peak (sum of parts, CPU)"
        items.append((format_bytes(data.profile.peak.allocated_bytes), what))
    if data.planned is not None:
        items.append((format_bytes(data.planned.peak_bytes), "plan peak (predicted)"))
        if data.baseline and data.baseline.step_s and data.planned.step_s:
            items.append((f"{data.planned.step_s / data.baseline.step_s:.2f}×", "plan step time vs baseline"))
    elif data.profile is not None and data.profile.step_s:
        items.append((format_seconds(data.profile.step_s), "measured step"))
    if data.budget:
        items.append((format_bytes(data.budget), data.budget_label))
    if data.trials is not None:
        items.append((str(len(data.trials)), "distinct plans in the study"))
        items.append((str(int(data.trials["verify_status"].notna().sum())), "plans verified for real"))
    return '<div class="kpis">' + "".join(f'<div class="kpi"><b>{_e(v)}</b><span>{_e(k)}</span></div>'
                                          for v, k in items) + "</div>"


def _facts(data: ReportData) -> str:
    rows: list[tuple[str, str]] = [("input", f"{data.source} ({data.kind})")]
    p = data.profile
    if p is not None:
        hw = p.hardware
        dev = f"{hw.gpu_name}, {format_bytes(hw.gpu_total_bytes or 0)}" if hw.gpu_name else "CPU"
        rows += [("profile", data.profile_source or ""), ("script", " ".join([p.script or p.module or "?", *p.argv])),
                 ("device", dev), ("torch", p.torch_version), ("model", f"{p.model_cls.rsplit('.', 1)[-1]}, {len(p.blocks)} blocks "
                  f"({len(p.repeated_blocks)} repeated), {format_bytes(p.param_bytes)} of parameters"),
                 ("optimizer", ", ".join(o.kind for o in p.optimizers) or "?")]
        if p.batch_size:
            rows.append(("batch", f"{p.batch_size}" + (f" × {p.seq_len} tokens" if p.seq_len else "")))
    if data.plan is not None and data.plan.sections:
        from memtune.strategies import get_strategy

        for name, sec in data.plan.sections.items():
            try:
                desc = get_strategy(name).describe(sec) or json.dumps(sec)
            except (MemtuneError, NotImplementedError):
                desc = json.dumps(sec)
            rows.append((f"plan: {name}", desc))
        try:
            lossy = data.plan.lossy
        except MemtuneError:
            lossy = []
        if lossy:
            rows.append(("lossy", f'<span class="lossy">{_e(", ".join(lossy))}</span>'))
    if data.study_name:
        rows.append(("study", data.study_name))
    body = "".join(f"<tr><td>{_e(k)}</td><td>{v if k == 'lossy' else _e(v)}</td></tr>" for k, v in rows)
    return f'<table class="facts">{body}</table>'


def render_html(data: ReportData, tables: dict[str, pd.DataFrame], figures: list[Plot]) -> str:
    import pandas as pd

    B = lambda v: format_bytes(v)  # noqa: E731
    T = lambda v: format_seconds(v)  # noqa: E731
    figs = {f.name: f for f in figures}
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>memtune report: "
             f"{_e(Path(data.source).name)}</title><meta name=\"viewport\" content=\"width=device-width, "
             f"initial-scale=1\"><style>{_CSS}</style></head><body><main>",
             f"<h1>memtune report</h1><p class=\"sub\">{_e(Path(data.source).name)} · generated "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p>", _kpis(data), _facts(data)]

    def fig(name: str) -> str:
        f = figs.get(name)
        if f is None:
            return ""
        b64 = base64.b64encode(f.png).decode()
        return (f'<figure style="margin:0"><img alt="{_e(f.title)}" src="data:image/png;base64,{b64}">'
                f"<figcaption>{_e(f.caption)}</figcaption></figure>")

    if "memory" in tables:
        mem = tables["memory"]
        mem = pd.concat([mem, pd.DataFrame([{"component": "total", "baseline_bytes": mem["baseline_bytes"].sum(),
                                             "plan_bytes": mem["plan_bytes"].sum(min_count=1)}])])
        if data.planned is None:
            mem = mem.drop(columns=["plan_bytes"])
        parts += ["<h2>Memory by component</h2>", fig("memory"),
                  _fmt_table(mem.rename(columns={"baseline_bytes": "baseline", "plan_bytes": "plan"}),
                             {"baseline": B, "plan": B})]
    if "blocks" in tables:
        df = tables["blocks"]
        show = df if data.plan is not None else df.drop(columns=["plan_choice", "plan_kept_bytes"])
        parts += ["<h2>Blocks</h2>", fig("blocks"),
                  f"<details><summary>table of {len(df)} blocks</summary>"
                  + _fmt_table(show, {"activation_bytes": B, "input_bytes": B, "fwd_s": T, "bwd_s": T,
                                      "plan_kept_bytes": B}) + "</details>"]
    if "timeline" in tables:
        parts += ["<h2>Memory over one step</h2>", fig("timeline")]
    if "trials" in tables:
        parts += ["<h2>Study</h2>", fig("pareto"), fig("verified")]
        tr = tables["trials"]
        best = tr[tr["pareto"] | tr["chosen"] | tr["verify_status"].notna()].sort_values("predicted_peak_bytes")
        cols = ["trial", "plan", "predicted_peak_bytes", "predicted_step_s", "predicted_throughput", "feasible",
                "chosen", "verify_status", "measured_peak_bytes", "measured_step_s", "lossy"]
        cols = [c for c in cols if best[c].notna().any() and (best[c] != "").any()]  # leave out empty columns
        show = best[cols].rename(columns={"predicted_peak_bytes": "peak", "predicted_step_s": "step",
                                          "predicted_throughput": "throughput", "verify_status": "verified",
                                          "measured_peak_bytes": "measured peak", "measured_step_s": "measured step"})
        parts.append(f"<p>{len(best)} Pareto, chosen and verified plans (predicted unless marked measured; all "
                     f"{len(tr)} in trials.csv with --csv):</p><div class=\"scroll\">"
                     + _fmt_table(show, {"peak": B, "measured peak": B, "step": T, "measured step": T,
                                         "throughput": lambda v: f"{v:.4g}",
                                         "feasible": lambda v: "yes" if v else "no",
                                         "chosen": lambda v: "★" if v else ""}) + "</div>")
    notes = list(data.notes) + (list(data.planned.notes) if data.planned is not None else [])
    if notes:
        parts.append("<h2>Notes</h2><ul class=\"notes\">" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


# --- writing -----------------------------------------------------------------------------------------------
@dataclass
class ReportResult:
    html: Path
    pngs: list[Path] = field(default_factory=list)
    csvs: list[Path] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def write_report(source: str | os.PathLike, out: str | os.PathLike = "report.html", *,
                 png_dir: str | os.PathLike | None = None, csv_dir: str | os.PathLike | None = None,
                 force: bool = False, profile: str | os.PathLike | None = None, budget: str | int | None = None,
                 study_name: str | None = None) -> ReportResult:
    """Render the report of a profile, plan or study: HTML, and PNGs/CSVs when asked."""
    from memtune.io import check_writable

    check_writable(out, force)
    for d in (png_dir, csv_dir):
        if d is not None and Path(d).exists() and not Path(d).is_dir():
            raise InputError(f"{d} is a file: give a directory for --png/--csv")
    _mpl()  # fail on a missing matplotlib before reading anything
    data = load_report_data(source, profile=profile, budget=budget, study_name=study_name)
    tables = build_tables(data)
    figures = build_figures(data, tables)
    # Check every target before writing any, so a refused overwrite leaves nothing half-written.
    pngs = [check_writable(Path(png_dir) / f"{f.name}.png", force) for f in figures] if png_dir is not None else []
    csvs = [check_writable(Path(csv_dir) / f"{n}.csv", force) for n in tables] if csv_dir is not None else []
    for f, p in zip(figures, pngs, strict=False):
        write_bytes_atomic(p, f.png)
    for (name, df), p in zip(tables.items(), csvs, strict=False):
        write_bytes_atomic(p, df[CSV_COLUMNS[name]].to_csv(index=False).encode())
    html_path = write_bytes_atomic(Path(out), render_html(data, tables, figures).encode("utf-8"))
    return ReportResult(html=html_path, pngs=pngs, csvs=csvs, sections=[f.name for f in figures],
                        notes=data.notes)
