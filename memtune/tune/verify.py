"""Verification: the best predicted plans run for real (`memtune apply` in a subprocess, launched the way
the profile was), measured against predicted, and the winner picked on measurements."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memtune.errors import VerificationFailed
from memtune.tune.records import best_measured, rank
from memtune.tune.space import canon, plan_family
from memtune.tune.study import add_verify_trial
from memtune.units import format_bytes

if TYPE_CHECKING:
    from memtune.plan import Plan
    from memtune.tune import TuneOptions
    from memtune.tune.evaluate import Tuner
    from memtune.tune.records import Candidate

_OOM = re.compile(r"out of memory|OutOfMemoryError", re.I)


def read_apply_report(path: Path) -> dict[str, Any]:
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


def apply_command(plan_path: Path, steps: int, report: Path, world_size: int) -> list[str]:
    """`memtune apply` launched the way the profile was: a profile taken on N ranks (torchrun, or Lightning's
    own launcher) runs under torchrun's module form on N local ranks, --standalone so it picks a free port;
    rank 0 writes the report (with every rank's peak)."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world_size)]
                if world_size > 1 else [sys.executable])
    return [*launcher, "-m", "memtune", "apply", str(plan_path), "--steps", str(steps), "--report", str(report)]


def _run_group(cmd: list[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess:
    """subprocess.run for torchrun: on a timeout SIGTERM first, which torchrun passes on to its ranks (they
    run in sessions of their own, so SIGKILL to torchrun or its group would leave them running, blocked in
    a collective and holding the output pipes), then SIGKILL to what is left of its group."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kw) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.terminate()
            try:
                p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def verify_plan(plan: Plan, cand: Candidate, tuner: Tuner, workdir: Path, budget: int) -> dict[str, Any]:
    """Run `memtune apply` on one plan in a subprocess for a few steps; an OOM is a failed verification."""
    idx = cand.number
    plan_path = workdir / f"plan-{idx}.yaml"
    report = workdir / f"apply-{idx}.json"
    plan.save(plan_path)
    world_size = max(1, tuner.profile.world_size)
    cmd = apply_command(plan_path, tuner.opts.verify_steps, report, world_size)
    cwd = tuner.profile.cwd if tuner.profile.cwd and Path(tuner.profile.cwd).is_dir() else None
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    try:
        if world_size > 1:
            proc = _run_group(cmd, tuner.opts.verify_timeout_s, cwd=cwd, env=env)
        else:
            proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                                  timeout=tuner.opts.verify_timeout_s)
        out, rc = (proc.stdout or "") + (proc.stderr or ""), proc.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"status": "timeout", "detail": f"no result within {tuner.opts.verify_timeout_s:.0f} s",
                "wall_s": time.perf_counter() - t0}
    res: dict[str, Any] = {"wall_s": round(time.perf_counter() - t0, 2)}
    rep: dict[str, Any] = {}
    if report.is_file():
        with contextlib.suppress(ValueError, OSError):
            rep = read_apply_report(report)
    failure = rep.get("failure")
    fail_text = json.dumps(failure) if failure else ""
    if _OOM.search(fail_text) or (rc != 0 and _OOM.search(out)):
        res.update(status="oom", detail="out of memory")
        return res
    if rc != 0 or failure or rep.get("step_s") is None:
        tail = " ".join(out.strip().splitlines()[-3:])[-400:]
        res.update(status="failed", detail=f"exit {rc}: {tail or fail_text or 'no report written'}")
        return res
    ranks = rep.get("raw", {}).get("world_size")
    if ranks is not None:
        res["ranks"] = ranks
        if ranks != world_size:  # e.g. a script that falls back to one process: not the profiled run
            res.update(status="failed", detail=f"the plan ran on {ranks} rank(s), the profile on {world_size}")
            return res
    step_s = float(rep["step_s"])
    peak = rep.get("peak_bytes")  # the largest over the ranks (rank 0's report gathers them)
    # the allocator's peak (max_memory_allocated) on a GPU; none on a CPU run, where only time is checked
    res.update(step_s=step_s, peak_bytes=float(peak) if peak is not None else None)
    # measured throughput in the prediction's unit: predicted work per step over the measured step time
    res["throughput"] = cand.throughput * cand.step_s / step_s if step_s > 0 else 0.0
    if peak is not None and float(peak) > budget:
        res.update(status="over budget", detail=f"measured peak {format_bytes(float(peak))} > budget {format_bytes(budget)}")
        return res
    res["status"] = "ok"
    return res


def _items(plan: Plan) -> set[str]:
    return {json.dumps([name, canon(sec)], default=str) for name, sec in plan.section_dicts().items()}


def _likely_fails(cand: Candidate, plan: Plan, failed: list[tuple[Candidate, Plan]]) -> bool:
    """After the first k all failed: skip plans predicted to use more memory than one that ran out of it, and
    plans holding a section that every crashed plan held (e.g. an optimizer the script cannot use)."""
    oom = [c.peak_bytes for c, _ in failed if c.measured and c.measured["status"] in ("oom", "over budget")]
    if oom and cand.peak_bytes >= min(oom):
        return True
    crashed = [_items(p) for c, p in failed if c.measured and c.measured["status"] in ("failed", "timeout")]
    common = set.intersection(*crashed) if crashed else set()
    return bool(common & _items(plan))


def _diverse(ranked: list[Candidate], tuner: Tuner, k: int) -> list[Candidate]:
    """The k plans to verify: the best predicted plan of each kind first, in predicted order, then the next best."""
    firsts: list[Candidate] = []
    seen: set[str] = set()
    for c in ranked[: max(50, 10 * k)]:
        sig = c.family or plan_family(tuner.plan_for(c.params))
        if sig not in seen:
            seen.add(sig)
            firsts.append(c)
        if len(firsts) == k:
            break
    rest = [c for c in ranked if all(c.key != f.key for f in firsts)]
    return firsts + rest


# Verification stops looking for a faster plan when no unverified one is predicted (corrected) this much faster
# than the best measured plan.
BETTER_BY = 0.02


def verify_best(studies, tuner: Tuner, cands: list[Candidate], opts: TuneOptions,
                verified: list[Candidate], research: Any = None, neighbours: Any = None) -> Candidate:
    """The closed loop. Verify the best plan of each kind (k at a time); each measurement corrects the cost
    model for its plan family (`Corrections`), the candidates are ranked again with the corrected model (and,
    with `research`, the search runs again under it to find plans the correction newly admits), and the loop
    goes on until a verified plan fits and none unverified is predicted faster, or no candidate with a lower
    corrected peak remains. With `neighbours`, a plan that runs within the budget is also evaluated at the
    other batch sizes once (per family). Picks the winner on measurements."""
    k = opts.verify
    study = studies[0]
    failed: list[tuple[Candidate, Plan]] = []
    corr = tuner.corrections
    for c in cands:  # a resumed study keeps earlier measurements: they correct the model too
        if c.measured:
            corr.add(c, c.measured, opts.budget_bytes)
            verified.append(c)
            if not c.verified_ok:
                failed.append((c, tuner.plan_for(c.params)))
    max_total = max(2 * k, 3 * k)
    rounds = 0
    widened: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="memtune-verify-") as tmp:
        while len(verified) < max_total:
            if neighbours is not None:
                for c in [c for c in verified if c.verified_ok and (c.family or "") not in widened]:
                    widened.add(c.family or "")
                    cands[:] = neighbours(c)
            corr.apply(cands, tuner.limit)
            todo = [c for c in cands if c.feasible and c.measured is None
                    and not _likely_fails(c, tuner.plan_for(c.params), failed)]
            ok = [c for c in verified if c.verified_ok]
            if ok:
                best = best_measured(ok, opts.objective)
                if opts.objective == "memory":
                    todo = [c for c in todo if c.peak_bytes < (best.measured.get("peak_bytes") or best.peak_bytes)
                            * (1 - BETTER_BY)]
                else:
                    todo = [c for c in todo if c.throughput > best.measured["throughput"] * (1 + BETTER_BY)]
                if rounds >= 2:
                    todo = []
            if not todo and research is not None and not ok and rounds < 2:
                cands[:] = research()  # the search again, under the corrected model
                corr.apply(cands, tuner.limit)
                todo = [c for c in cands if c.feasible and c.measured is None
                        and not _likely_fails(c, tuner.plan_for(c.params), failed)]
            if not todo:
                break
            batch = _diverse(rank(todo, opts.objective), tuner, k)[: max(1, k if not ok else 1)]
            trials = {ft.number: ft for ft in study.get_trials(deepcopy=False)}
            for cand in batch:
                plan = tuner.plan_for(cand.params)
                m = verify_plan(plan, cand, tuner, Path(tmp), opts.budget_bytes)
                cand.measured = m
                ft = trials[cand.number]
                for st in studies:
                    if st is not None:
                        add_verify_trial(st, cand, ft.params, ft.distributions, m, tuner)
                corr.add(cand, m, opts.budget_bytes)
                verified.append(cand)
                if not cand.verified_ok:
                    failed.append((cand, plan))
                if opts.progress:
                    opts.progress("verifying plans for real", len(verified), max(k, len(verified)))
            rounds += 1
    ok = [c for c in verified if c.verified_ok]
    if not ok:
        what = "; ".join(f"trial {c.number}: {c.measured.get('status')} ({c.measured.get('detail', '')})"
                         for c in verified)
        corr.apply(cands, tuner.limit)
        if all(c.measured.get("status") in ("oom", "over budget") for c in verified):
            low = min((c for c in cands if c.measured is None), key=lambda c: c.peak_bytes, default=None)
            todo = (f"no plan left is predicted to fit once the model is corrected by these measurements (the "
                    f"smallest corrected peak is {format_bytes(low.peak_bytes)}): raise --budget" if low is not None
                    else "every plan was tried: raise --budget")
        else:
            todo = "run one with `memtune apply PLAN` to see the script's error, or tune with --lossless-only"
        raise VerificationFailed(f"none of the {len(verified)} verified plans ran within the budget ({what}): {todo}")
    return best_measured(ok, opts.objective)
