"""How good is the cost model? Predicted against measured peak memory and step time, plan by plan.

For each model: `memtune profile` once, then for each plan `memtune apply PLAN --steps N --report R` in a
subprocess (an out-of-memory plan is recorded, not fatal), and `memtune.costmodel.estimate` on the profile.

    # on the GPU (writes results.json + accuracy.md into --out):
    python benchmarks/accuracy.py --out /tmp/acc
    # anywhere, later: re-predict from the stored profiles with the current cost model and write the doc
    python benchmarks/accuracy.py --from /tmp/acc/results.json --doc docs/accuracy.md
    # CPU smoke test of the whole pipeline at tiny sizes (no allocator peak on CPU, times only):
    python benchmarks/accuracy.py --tiny --out /tmp/acc-tiny

Plans are built from the strategies registered when it runs (a section that does not validate is skipped
and said so): baseline, checkpoint all / half / selective, activation offload, optimizer-state offload,
quantized optimizer states, bf16 parameters, and several batch sizes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> script, argv, profiled batch size, other batch sizes measured, plans left out (device time)
_LARGE_DROP = ["adamw4bit", "offload act. quarter", "compress int8 half", "update in backward",
               "bf16 params + ckpt half", "checkpoint selective"]
MODELS: dict[str, dict[str, Any]] = {
    "gpt-125m": dict(script="examples/gpt.py", argv=["--preset", "125m"], batch=8, batches=[4, 16, 24],
                     drop=["adamw4bit", "offload act. quarter"]),
    "gpt-350m": dict(script="examples/gpt.py", argv=["--preset", "350m"], batch=8, batches=[4, 16],
                     drop=_LARGE_DROP),
    "llama-1b": dict(script="examples/hf_llama.py", argv=["--preset", "1b"], batch=4, batches=[2, 6],
                     drop=_LARGE_DROP),
}
# Training scripts written elsewhere (examples/zoo, none made for memtune), at their `--size gpu` presets:
# name -> the plans measured (names of `candidate_plans`), the profiled batch and the other batches measured.
_Z = "examples/zoo/"
_COMMON = ["baseline", "checkpoint all", "checkpoint half", "offload act. half"]
ZOO: dict[str, dict[str, Any]] = {
    "hf_trainer": dict(script=_Z + "hf_trainer.py", batch=8, batches=[16],
                       keep=[*_COMMON, "offload opt. state", "ckpt all + offload opt. state", "batch 16", "bf16 params"]),
    "fused_adamw": dict(script=_Z + "fused_adamw.py", batch=4, batches=[8],
                        keep=[*_COMMON, "offload opt. state", "ckpt all + offload opt. state", "batch 8", "adamw8bit"]),
    "lora_handwritten": dict(script=_Z + "lora_handwritten.py", batch=4, batches=[8],
                             keep=[*_COMMON, "bf16 params", "batch 8", "ckpt all + offload opt. state"]),
    "peft_lora": dict(script=_Z + "peft_lora.py", batch=4, batches=[8],
                      keep=[*_COMMON, "batch 8", "offload opt. state"]),
    "vit": dict(script=_Z + "vit.py", batch=256, batches=[384],
                keep=[*_COMMON, "compress int8 half", "batch 384", "offload opt. state"]),
    "resnet_amp": dict(script=_Z + "resnet_amp.py", batch=256, batches=[384], keep=[*_COMMON, "batch 384"]),
    "accelerate_loop": dict(script=_Z + "accelerate_loop.py", batch=32, batches=[64],
                            keep=[*_COMMON, "offload opt. state", "batch 64"]),
    "lightning_module": dict(script=_Z + "lightning_module.py", batch=8, batches=[16],
                             keep=[*_COMMON, "offload opt. state", "batch 16"]),
    "distill": dict(script=_Z + "distill.py", batch=16, batches=[24], keep=[*_COMMON, "bf16 params"]),
    "grad_accum": dict(script=_Z + "grad_accum.py", batch=16, batches=[24], keep=[*_COMMON[:3], "offload opt. state"]),
    "unet_diffusion": dict(script=_Z + "unet_diffusion.py", batch=64, batches=[96], keep=_COMMON),
    "encoder_decoder": dict(script=_Z + "encoder_decoder.py", batch=8, batches=[12], keep=_COMMON),
    # two models and optimizers, torch.compile, experts, an RNN (first measured in device call 25new, H200)
    "gan": dict(script=_Z + "gan.py", batch=1024, batches=[1536], keep=[*_COMMON, "offload opt. state"]),
    "compiled": dict(script=_Z + "compiled.py", batch=8, batches=[12], keep=[*_COMMON, "offload opt. state"]),
    # the train step compiled as a function, not the model (added 2026-12-04; not measured on a GPU yet)
    "compiled_step": dict(script=_Z + "compiled_step.py", batch=256, batches=[384],
                          keep=[*_COMMON, "offload opt. state"]),
    "moe": dict(script=_Z + "moe.py", batch=8, batches=[12], keep=[*_COMMON, "offload opt. state"]),
    "lstm_lm": dict(script=_Z + "lstm_lm.py", batch=128, batches=[192], keep=[*_COMMON, "offload opt. state"]),
    # DDP as one plain process (world size 1: DDP's buckets, no peer); not measured on a GPU yet (2026-12-03)
    "ddp_torchrun": dict(script=_Z + "ddp_torchrun.py", batch=16, batches=[24], keep=[*_COMMON, "offload opt. state"]),
}
for _z in ZOO.values():
    _z["argv"] = ["--size", "gpu"]
TINY: dict[str, dict[str, Any]] = {
    "gpt-tiny": dict(script="examples/gpt.py", argv=["--device", "cpu"], batch=8, batches=[4, 16]),
    "llama-tiny": dict(script="examples/hf_llama.py", argv=["--device", "cpu"], batch=4, batches=[2]),
}
OOM_WORDS = ("out of memory", "OutOfMemoryError")


def candidate_plans(n_repeated: int, batch: int, batches: list[int],
                    others: list[str] = ()) -> list[tuple[str, dict[str, Any]]]:
    """Plans as YAML dicts; those whose strategy is missing or rejects the section are dropped later. A model
    without repeated blocks (an LSTM, a GAN) gets its large other blocks (`others`, the tuner's choices) for
    "all", the first half of them for "half" and the first for "quarter"."""
    if n_repeated:
        every: Any = "all"
        half = [f"0-{max(0, n_repeated // 2 - 1)}"]
        last_half = [f"{n_repeated // 2}-{n_repeated - 1}"]
        first_quarter = [f"0-{max(0, n_repeated // 4 - 1)}"]
    else:
        every, half = list(others), list(others[: max(1, len(others) // 2)])
        last_half, first_quarter = list(others[len(half):]) or half, half[:1]
    big = max(batches)
    return [
        ("baseline", {}),
        ("checkpoint all", {"checkpoint": {"blocks": every}}),
        ("checkpoint half", {"checkpoint": {"blocks": half}}),
        ("checkpoint selective", {"checkpoint": {"blocks": every, "mode": "selective"}}),
        ("offload act. quarter", {"offload": {"activations": first_quarter}}),
        ("offload act. half", {"offload": {"activations": half}}),
        ("offload opt. state", {"offload": {"optimizer_state": True}}),
        ("adamw8bit", {"optimizer": {"name": "adamw8bit"}}),
        ("adamw4bit", {"optimizer": {"name": "adamw4bit"}}),
        ("update in backward", {"optimizer": {"name": "inbackward"}}),
        ("bf16 params", {"precision": {"params": "bf16"}}),
        ("bf16 params + ckpt half", {"precision": {"params": "bf16"}, "checkpoint": {"blocks": half}}),
        ("ckpt last half + offload quarter", {"checkpoint": {"blocks": last_half},
                                              "offload": {"activations": first_quarter}}),
        ("compress int8 half", {"compress": {"blocks": half, "dtype": "int8"}}),
        *[(f"batch {b}", {"run": {"knobs": {"--batch-size": b}}}) for b in batches],
        (f"batch {big} + ckpt all", {"run": {"knobs": {"--batch-size": big}}, "checkpoint": {"blocks": every}}),
        (f"batch {2 * big} + ckpt all", {"run": {"knobs": {"--batch-size": 2 * big}},
                                        "checkpoint": {"blocks": every}}),
        # what the tuner picks at tight budgets: nothing but the loss and checkpoint inputs on the device
        ("ckpt all + offload opt. state", {"checkpoint": {"blocks": every}, "offload": {"optimizer_state": True}}),
        (f"batch {big} + ckpt all + offload opt. state", {"run": {"knobs": {"--batch-size": big}},
                                                          "checkpoint": {"blocks": every},
                                                          "offload": {"optimizer_state": True}}),
    ]


def valid_plans(cands, script: str, argv: list[str]):
    from memtune.errors import MemtuneError
    from memtune.strategies import plan_from_dict

    out, skipped = [], []
    for name, d in cands:
        d = dict(d)
        run = dict(d.pop("run", {}))
        run.update(script=script, argv=list(argv))
        try:
            plan = plan_from_dict({"run": run, **d}, source=name)
        except MemtuneError as e:
            skipped.append((name, " ".join(str(e).split())))
            continue
        out.append((name, plan))
    return out, skipped


def sh(cmd: list[str], timeout: float) -> tuple[int, str, str, float]:
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        return r.returncode, r.stdout, r.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        return 124, str(e.stdout or ""), f"timed out after {timeout:.0f} s", time.perf_counter() - t0


# `memtune apply PLAN --steps N --report R` is this same library call (memtune/cli.py). Run through this
# wrapper, several plans can start at once: each builds its model on the CPU in parallel, then takes a file
# lock before its first forward (Session.on_ready), so only one runs on the GPU at a time and its step times
# and peak are its own (the peak counter is per process and reset once the plan is applied).
# While a process waits for the GPU it builds its model with 2 CPU threads, so that the process measuring has
# the host to itself (its Python launches and, for optimizer-state offload, its CPU update: the first zoo run,
# H200 2026-12-01, measured offloaded updates 3-5x slower with three processes building models beside it).
APPLY_LOCKED = """
import fcntl, json, os, sys
import torch
torch.set_num_threads(2)
import memtune.capture as cap
from memtune.patcher import run_apply
_init = cap.Session.__init__
def _init_locked(self, *a, **k):
    _init(self, *a, **k)
    def take(s):
        f = open(sys.argv[4], "w")
        fcntl.flock(f, fcntl.LOCK_EX)
        s._gpu_lock = f
        torch.set_num_threads(os.cpu_count())
    self.on_ready.insert(0, take)
cap.Session.__init__ = _init_locked
r = run_apply(sys.argv[1], steps=int(sys.argv[2]))
open(sys.argv[3], "w").write(json.dumps(r.to_dict()))
"""


PROFILE_LOCKED = """
import fcntl, os, sys
import torch
torch.set_num_threads(2)
import memtune.capture as cap
_init = cap.Session.__init__
def _init_locked(self, *a, **k):
    _init(self, *a, **k)
    def take(s):
        f = open(LOCK, "w")
        fcntl.flock(f, fcntl.LOCK_EX)
        s._gpu_lock = f
        torch.set_num_threads(os.cpu_count())
    self.on_ready.insert(0, take)
cap.Session.__init__ = _init_locked
LOCK = sys.argv[1]
sys.argv = ["memtune", *sys.argv[2:]]
from memtune.cli import main
main()
"""


def apply_cmd(plan_path: Path, steps: int, rep_path: Path, lock: Path | None) -> list[str]:
    """`memtune apply PLAN --steps N --report R`, or the same call holding the GPU lock when running several."""
    if lock is not None:
        return [sys.executable, "-c", APPLY_LOCKED, str(plan_path), str(steps), str(rep_path), str(lock)]
    return [sys.executable, "-m", "memtune", "apply", str(plan_path), "--steps", str(steps),
            "--report", str(rep_path), "--force"]


def run_plan(name: str, i: int, pname: str, plan, work: Path, args) -> dict[str, Any]:
    plan_path = work / f"plan{i}.yaml"
    plan.save(plan_path)
    rep_path = work / f"apply{i}.json"
    lock = work.parent / "gpu.lock" if args.jobs > 1 or args.model_jobs > 1 else None
    rc, out, err, wall = sh(apply_cmd(plan_path, args.steps, rep_path, lock), args.timeout)
    row: dict[str, Any] = {"plan": pname, "plan_dict": plan.to_dict(), "rc": rc, "wall_s": wall}
    if rep_path.is_file():
        rep = json.loads(rep_path.read_text())
        row.update(measured_peak=rep.get("peak_allocated_bytes"), measured_step_s=rep.get("step_s"),
                   measured_reserved=rep.get("peak_reserved_bytes"), step_times=rep.get("step_times"),
                   failure=rep.get("failure"), apply_notes=rep.get("notes"))
    text = out + err + json.dumps(row.get("failure"))
    row["oom"] = any(w in text for w in OOM_WORDS)
    if row.get("failure") and not row["oom"]:
        row["error"] = f"{row['failure'].get('exc_type')}: {row['failure'].get('message', '')[:200]}"
    elif rc != 0 and not row["oom"]:
        row["error"] = (err.strip().splitlines() or ["?"])[-1][:300]
    print(f"[{name}] {pname:32s} rc={rc} oom={row['oom']} peak={row.get('measured_peak')} "
          f"step={row.get('measured_step_s')} {wall:.1f}s {row.get('error', '')}", flush=True)
    if row.get("error"):
        print(err[-1500:], flush=True)
    return row


def measure_model(name: str, cfg: dict[str, Any], work: Path, args, prev: dict[str, Any] | None,
                  t_start: float) -> dict[str, Any]:
    from memtune.profile import Profile

    work.mkdir(parents=True, exist_ok=True)
    argv = list(cfg["argv"]) + ["--batch-size", str(cfg["batch"]), "--steps", "1000"]
    late = bool(args.deadline and time.perf_counter() - t_start > args.deadline)
    reprofile = name in (args.reprofile or []) and not late
    if prev and "profile" in prev and not reprofile:
        profile = Profile.from_dict(prev["profile"])
        rec = {k: v for k, v in prev.items() if k != "rows"}
        rec["rows"] = [r for r in prev["rows"] if not r.get("not_run")]
        print(f"[{name}] profile reused from the earlier results", flush=True)
    else:
        prof_path = work / "profile.json"
        cmd = [sys.executable, "-m", "memtune", "profile", cfg["script"], "-o", str(prof_path), "--force",
               "--steps", str(args.profile_steps), "--warmup", str(args.profile_warmup), "--", *argv]
        if args.jobs > 1 or args.model_jobs > 1:  # several processes at once: take turns on the GPU, as the plans do
            cmd = [sys.executable, "-c", PROFILE_LOCKED, str(work.parent / "gpu.lock"), *cmd[3:]]
        rc, out, err, wall = sh(cmd, args.timeout)
        print(f"[{name}] profile rc={rc} {wall:.1f}s", flush=True)
        if rc != 0 or not prof_path.is_file():
            print(err[-3000:], flush=True)
            return {"model": name, "error": f"profile failed: {err.strip().splitlines()[-1:]}", "rows": []}
        profile = Profile.load(prof_path)
        rec = {"model": name, "profile": profile.to_dict(), "profile_wall_s": wall, "rows": []}
        if prev:  # measured plans do not depend on the profile: keep them, re-predicted from this one
            rec["rows"] = [r for r in prev.get("rows", []) if not r.get("not_run")]
            if "profile" in prev:
                rec["previous_profile_peak"] = prev["profile"]["peak"]
    earlier = {r["plan"]: r for r in rec["rows"]}
    if args.only:  # named plans are measured again, replacing earlier rows of the same name
        rec["rows"] = [r for r in rec["rows"] if r["plan"] not in args.only]
    done = {r["plan"] for r in rec["rows"]}
    from memtune.strategies.layout import exception_blocks

    cands = candidate_plans(len(profile.repeated_blocks), cfg["batch"], cfg["batches"], exception_blocks(profile))
    if cfg.get("drop"):
        cands = [c for c in cands if c[0] not in cfg["drop"]]
    if cfg.get("keep"):
        cands = [c for c in cands if c[0] in cfg["keep"]]
    plans, skipped = valid_plans(cands, cfg["script"], argv)
    rec["skipped"] = skipped
    for pname, why in skipped:
        print(f"[{name}] skip {pname}: {why}", flush=True)
    from concurrent.futures import ThreadPoolExecutor

    todo = []
    for i, (pname, plan) in enumerate(plans):
        if (args.only and pname not in args.only) or pname in done:
            continue
        todo.append((i, pname, plan))

    def one(item):
        i, pname, plan = item
        if args.deadline and time.perf_counter() - t_start > args.deadline:
            if pname in earlier:
                print(f"[{name}] {pname}: past --deadline, the earlier measurement is kept", flush=True)
                return earlier[pname]
            print(f"[{name}] {pname}: not run (past --deadline)", flush=True)
            return {"plan": pname, "plan_dict": plan.to_dict(), "not_run": True}
        return run_plan(name, i, pname, plan, work, args)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        rec["rows"] += list(ex.map(one, todo))
    pos = {pname: i for i, (pname, _) in enumerate(plans)}
    rec["rows"].sort(key=lambda r: pos.get(r["plan"], len(pos)))
    return rec


# --- predictions and the document --------------------------------------------------------------------


def predict(results: dict[str, Any]) -> None:
    """(Re)compute each row's prediction from the stored profile with the current cost model."""
    from memtune.errors import MemtuneError
    from memtune.estimate import estimate
    from memtune.profile import Profile
    from memtune.strategies import plan_from_dict

    for rec in results["models"]:
        if "profile" not in rec:
            continue
        profile = Profile.from_dict(rec["profile"])
        for row in rec["rows"]:
            try:
                est = estimate(profile, plan_from_dict(row["plan_dict"]))
            except MemtuneError as e:
                row["predict_error"] = str(e)
                continue
            row.update(pred_peak=est.peak_bytes, pred_step_s=est.step_s, pred_phase=est.peak_phase,
                       pred_where=est.peak_where, lossy=est.lossy)


def _err(pred, meas):
    if pred is None or not meas:
        return None
    return 100.0 * (pred - meas) / meas


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    def errs(rows):  # |errors| of the rows that ran (no OOM, error or deadline skip)
        ok = [r for r in rows if not (r.get("oom") or r.get("error") or r.get("not_run"))]
        return ([abs(r["peak_err"]) for r in ok if r["peak_err"] is not None],
                [abs(r["step_err"]) for r in ok if r["step_err"] is not None])

    rows = []
    per_model = {}
    for rec in results["models"]:
        for row in rec["rows"]:
            row["peak_err"] = _err(row.get("pred_peak"), row.get("measured_peak"))
            row["step_err"] = _err(row.get("pred_step_s"), row.get("measured_step_s"))
        per_model[rec["model"]] = _stats(*errs(rec["rows"]))
        rows += rec["rows"]
    return {"all": _stats(*errs(rows)), "models": per_model,
            "without_baselines": _stats(*errs([r for r in rows if r["plan"] != "baseline"]))}


def _stats(pe, se):
    return {"n_peak": len(pe), "median_abs_peak_err": statistics.median(pe) if pe else None,
            "worst_abs_peak_err": max(pe) if pe else None, "n_step": len(se),
            "median_abs_step_err": statistics.median(se) if se else None,
            "worst_abs_step_err": max(se) if se else None}


def _gib(x):
    return "" if x is None else f"{x / 2**30:.2f}"


def _pct(x):
    return "" if x is None else f"{x:+.1f}%"


def _f(x, nd=1):
    return "—" if x is None else f"{x:.{nd}f}"


def render(results: dict[str, Any], summary: dict[str, Any]) -> str:
    env = results.get("env", {})
    a = summary["all"]
    lines = [
        "# Cost-model accuracy: predicted vs measured peak memory and step time",
        "",
        f"GPU: {env.get('gpu', '?')} · torch {env.get('torch', '?')} · CUDA {env.get('cuda', '?')} · "
        f"measured {env.get('date', '?')} · predictions from the cost model at commit "
        f"`{results.get('predicted_at', '?')}`",
        "",
        f"Command (on the GPU): `{env.get('command', '?')}`. The profiles and measurements are stored in "
        "`benchmarks/accuracy_results.json`; predictions are re-made from them with the current cost model by "
        "`python benchmarks/accuracy.py --from benchmarks/accuracy_results.json --doc docs/accuracy.md`.",
        "",
        "Measured peak = `torch.cuda.max_memory_allocated` over the applied run (`memtune.patcher.run_apply`, "
        f"what `memtune apply --steps {env.get('steps', '?')} --report` runs, in one subprocess per plan), step "
        "time = median of its steps after the first. Predicted = "
        "`memtune.costmodel.estimate(profile, plan)` from one `memtune profile` per model at its default "
        "batch size (batch sizes other than the profile's are scaled from that one profile).",
        "",
        "How the model predicts (memtune/costmodel/): it walks one optimizer step block by block from the "
        "profile (forward keeps each block's saved bytes as the plan chooses: keep, recompute, offload, "
        "compress; the loss adds the logits and its working set, and its forward also the 16-bit weight "
        "copies autocast still caches for blocks whose saved tensors are gone; backward frees activations and "
        "creates gradients; the optimizer step adds its temporaries), takes the peak of that timeline, and calibrates "
        "what the parts leave unexplained once on the profile's measured peak. Step time = profiled forward "
        "and backward + recompute + the part of each host copy the compute cannot hide + optimizer + glue.",
        "",
        "## Summary",
        "",
        "| | plans | median \\|peak err\\| | worst \\|peak err\\| | median \\|step err\\| | worst \\|step err\\| |",
        "|---|---|---|---|---|---|",
    ]
    for m, s in [*summary["models"].items(), ("all", a)]:
        lines.append(f"| {m} | {s['n_peak']} | {_f(s['median_abs_peak_err'])}% | {_f(s['worst_abs_peak_err'])}% | "
                     f"{_f(s['median_abs_step_err'])}% | {_f(s['worst_abs_step_err'])}% |")
    ok = lambda v, t: "met" if v is not None and v <= t else "NOT met"
    lines += ["", f"Median absolute peak error: {_f(a['median_abs_peak_err'])}% over {a['n_peak']} measured plans "
              f"(worst {_f(a['worst_abs_peak_err'])}%); median absolute step-time error: "
              f"{_f(a['median_abs_step_err'])}%.",
              "", f"Without the baseline rows (the calibration reproduces them by construction): median |peak err| "
              f"{_f(summary['without_baselines']['median_abs_peak_err'])}%, median |step err| "
              f"{_f(summary['without_baselines']['median_abs_step_err'])}% over "
              f"{summary['without_baselines']['n_peak']} plans.",
              "", f"Targets: median |peak err| <= 3% ({ok(a['median_abs_peak_err'], 3)}), worst <= 8% "
              f"({ok(a['worst_abs_peak_err'], 8)}), median |step err| <= 10% "
              f"({ok(a['median_abs_step_err'], 10)}).", ""]
    for rec in results["models"]:
        lines += [f"## {rec['model']}", ""]
        if rec.get("error"):
            lines += [f"Not measured: {rec['error']}", ""]
            continue
        p = rec["profile"]
        lines += [f"`{p.get('script')} {' '.join(p.get('argv', []))}` · profile peak "
                  f"{_gib(p['peak']['allocated_bytes'])} GiB in {p['peak'].get('phase')} · step "
                  f"{p.get('step_s', 0) * 1e3:.0f} ms", "",
                  "| plan | measured peak GiB | predicted GiB | err | predicted phase | measured step ms | "
                  "predicted ms | err |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in rec["rows"]:
            name = row["plan"] + (" (lossy)" if row.get("lossy") else "")
            if row.get("not_run"):
                lines.append(f"| {name} | not run | {_gib(row.get('pred_peak'))} | | {row.get('pred_phase', '')} | "
                             f"| {_f((row.get('pred_step_s') or 0) * 1e3, 0)} | |")
                continue
            if row.get("oom"):
                lines.append(f"| {name} | OOM | {_gib(row.get('pred_peak'))} | | {row.get('pred_phase', '')} | "
                             f"| {_f((row.get('pred_step_s') or 0) * 1e3, 0)} | |")
                continue
            if row.get("error"):
                lines.append(f"| {name} | failed: {row['error'][:80]} | {_gib(row.get('pred_peak'))} | | | | | |")
                continue
            ms = row.get("measured_step_s")
            lines.append(
                f"| {name} | {_gib(row.get('measured_peak'))} | {_gib(row.get('pred_peak'))} | "
                f"{_pct(row.get('peak_err'))} | {row.get('pred_phase', '')} | {_f(ms and ms * 1e3, 0)} | "
                f"{_f((row.get('pred_step_s') or 0) * 1e3, 0)} | {_pct(row.get('step_err'))} |")
        if rec.get("skipped"):
            lines += ["", "Plans not run (their strategy was missing or refused them): "
                      + "; ".join(f"{n} ({w[:90]})" for n, w in rec["skipped"])]
        lines.append("")
    if results.get("notes"):
        lines += ["## What the measurements changed in the model", "", *results["notes"], ""]
    return "\n".join(lines) + "\n"


def _git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip() or "?"
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="accuracy-out", help="folder for results.json and accuracy.md")
    ap.add_argument("--models", nargs="*", help=f"subset of {sorted(MODELS)} (or of the tiny ones)")
    ap.add_argument("--only", nargs="*", help="run only these plan names (with --resume: run them again)")
    ap.add_argument("--reprofile", nargs="*", help="with --resume: profile these models again (their measured "
                    "plans are kept and re-predicted from the new profile)")
    ap.add_argument("--tiny", action="store_true", help="tiny CPU sizes: checks the pipeline, not accuracy")
    ap.add_argument("--steps", type=int, default=5, help="steps per applied plan")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--profile-warmup", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per subprocess")
    ap.add_argument("--from", dest="from_", help="results.json of an earlier run: re-predict and render only")
    ap.add_argument("--resume", help="results.json of an earlier run: reuse its profiles and measured plans, "
                    "run the rest")
    ap.add_argument("--jobs", type=int, default=1, help="plans started at once (they take turns on the GPU)")
    ap.add_argument("--zoo-size", default="gpu", help="the zoo scripts' --size (tiny: a CPU smoke test)")
    ap.add_argument("--model-jobs", type=int, default=1, help="models measured side by side (their waiting processes load the host: on the H200 it made optimizer-state offload steps 5-12x longer, docs/accuracy-zoo.md; with --jobs > 1, "
                    "set --jobs to how many processes may wait for the GPU per model)")
    ap.add_argument("--work", help="folder for profiles, plans and reports (default: inside --out)")
    ap.add_argument("--deadline", type=float, help="seconds: plans not started by then are recorded as not run")
    ap.add_argument("--doc", help="also write the markdown here")
    ap.add_argument("--notes", help="markdown file whose lines go under 'What the measurements changed'")
    ap.add_argument("--save", help="with --from: write the merged results (notes included) here")
    args = ap.parse_args()

    if args.from_:
        results = json.loads(Path(args.from_).read_text())
    else:
        import torch

        table = TINY if args.tiny else {**MODELS, **ZOO}
        if args.zoo_size != "gpu":  # a smoke test of the zoo path on small sizes (not an accuracy result)
            for z in ZOO.values():
                z["argv"] = ["--size", args.zoo_size]
        names = list(ZOO) if args.models == ["zoo"] else (args.models or list(table))
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
        results = {"env": {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
                           "date": datetime.date.today().isoformat(), "steps": args.steps,
                           "command": "python " + shlex.join(["benchmarks/accuracy.py", *sys.argv[1:]])},
                   "models": []}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        prev = {}
        if args.resume:
            old = json.loads(Path(args.resume).read_text())
            prev = {m["model"]: m for m in old["models"]}
            results["env"]["command"] = f"{old['env']['command']}`, then `{results['env']['command']}"
        t_start = time.perf_counter()
        from concurrent.futures import ThreadPoolExecutor

        def one_model(n: str) -> dict[str, Any]:
            # models run side by side (their plans one after another), taking turns on the GPU: each
            # process's start-up (imports, building the model) overlaps another's measured steps
            work = Path(args.work or out) / n
            return measure_model(n, table[n], work, args, prev.pop(n, None), t_start)

        with ThreadPoolExecutor(max_workers=max(1, args.model_jobs)) as ex:
            for rec in ex.map(one_model, names):
                results["models"].append(rec)
                (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        results["models"] += list(prev.values())  # models measured earlier and not this time
    if args.notes:
        results["notes"] = Path(args.notes).read_text().splitlines()
    results["predicted_at"] = _git_head()
    predict(results)
    summary = summarize(results)
    results["summary"] = summary
    doc = render(results, summary)
    out = Path(args.out)
    if not args.from_:
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "accuracy.md").write_text(doc)
    if args.doc:
        Path(args.doc).write_text(doc)
    if args.save:
        Path(args.save).write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(summary["all"], indent=1))


if __name__ == "__main__":
    main()
