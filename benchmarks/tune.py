"""Does `memtune tune` find a plan as good as an exhaustive measured sweep, in under two minutes?

The reduced space (the same for the tuner and the sweep; `reduced_space()`): checkpoint the last k repeated
blocks (full recompute, k = 0..L) x optimizer {adamw, adamw8bit (lossy)} (+ update-in-backward where the
script allows it: both examples clip gradients, so it is not offered) x optimizer-state offload {off, on}
(lossless; with adamw only) x the script's `--batch-size`. For each workload and budget:
  1. `memtune profile` the unchanged example script (a subprocess);
  2. tune with `--verify 2` (the best predicted plan of the two best kinds runs for real through
     `memtune apply` subprocesses), lossless only; a budget no lossless plan reaches is tuned again with
     lossy plans allowed (said in the results); wall time = search + verification;
  3. in one worker process per workload (the model built once), measure the sweep: optimizer {adamw,
     adamw8bit, adamw + state offload} x checkpoint {none, last L/2, all} x batch, the tuned plans, the manual
     recipe (transformers' gradient checkpointing on every layer, or checkpointing every block for the
     plain-PyTorch GPT, plus the largest batch that fits each budget) and the unpatched run (the script's
     own batch). peak = torch.cuda.max_memory_allocated over the timed steps after a warm-up step; time =
     median of >= 8 timed steps, spread = (slowest - fastest) / median.
A batch grows in a family only while the smaller batch stayed under the largest budget and did not run out of
memory. Results: JSON and a markdown table (docs/benchmarks.md). `--deadline` bounds the whole run: later
stages are skipped and what was measured is written.

    python benchmarks/tune.py --out /tmp/tune                  # H100: GPT-350M at 12 GiB, Llama 1B at 12/20/32 GiB
    python benchmarks/tune.py --tiny --out /tmp/tune           # CPU smoke test of the whole path
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import runpy
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30

WORKLOADS = {
    "gpt350m": dict(script="examples/gpt.py", argv=["--preset", "350m"], batches=[4, 8, 16, 32],
                    budgets=[12 * GiB], n_layers=24, hf=False, default_batch=8, stored="gpt-350m"),
    "llama1b": dict(script="examples/hf_llama.py", argv=["--preset", "1b"], batches=[2, 4, 8, 16],
                    budgets=[12 * GiB, 20 * GiB, 32 * GiB], n_layers=22, hf=True, default_batch=4, stored="llama-1b"),
}
TINY = {  # CPU smoke test: the same path on the examples' default (tiny) sizes
    "gpt350m": dict(script="examples/gpt.py", argv=[], batches=[4, 8], budgets=[64 * 2**20], n_layers=4, hf=False,
                    default_batch=8),
    "llama1b": dict(script="examples/hf_llama.py", argv=["--layers", "4"], batches=[2, 4], budgets=[64 * 2**20],
                    n_layers=4, hf=True, default_batch=4),
}
OFFLOAD_STATE = {"offload": {"activations": [], "optimizer_state": True}}


# --- the reduced space ----------------------------------------------------------------------------------


@contextlib.contextmanager
def reduced_space():
    """Restrict the strategy registry (in this process) to the reduced space: each strategy's own validation,
    effect and description, with a smaller `space()`."""
    import memtune.strategies as strategies
    from memtune.strategies.base import _REGISTRY
    from memtune.strategies.layout import compact

    strategies._load()
    saved = dict(_REGISTRY)
    real_opt = saved["optimizer"]

    def ck_space(trial, profile, layout, opts):
        blocks = compact(layout.blocks("recompute"), len(profile.repeated_blocks))
        return {"blocks": blocks, "mode": "full"} if blocks else None

    def opt_space(trial, profile, layout, opts):
        choices = ["adamw"] if opts.lossless_only or opts.device != "cuda" else ["adamw", "adamw8bit"]
        if real_opt._inbackward_ok(profile) and opts.world_size <= 1:
            choices.append("inbackward")
        name = trial.suggest_categorical("optimizer.name", choices)
        return None if name == "adamw" else {"name": name}

    def offload_space(trial, profile, layout, opts):
        if opts.device != "cuda":
            return None
        on = trial.suggest_categorical("offload.optimizer_state", [False, True])
        return dict(OFFLOAD_STATE["offload"]) if on else None

    _REGISTRY.clear()
    for name, space in (("checkpoint", ck_space), ("optimizer", opt_space), ("offload", offload_space)):
        s = copy.copy(saved[name])
        s.space = space  # instance attribute: shadows the class's space()
        _REGISTRY[name] = s
    try:
        yield
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)


def ck(n: int, k: int) -> dict:
    return {"checkpoint": {"blocks": "all" if k == n else [f"{n - k}-{n - 1}"], "mode": "full"}} if k else {}


def grid(w: dict, cuda: bool) -> list[dict]:
    """The measured sweep's families (each over the batch sizes): optimizer x checkpoint {none, half, all}."""
    n = w["n_layers"]
    opts = [("adamw", {}, False), ("adamw + state offload", OFFLOAD_STATE, False),
            ("adamw8bit", {"optimizer": {"name": "adamw8bit"}}, True)]  # lossless first: the tunes are lossless
    if not cuda:  # state offload needs a GPU
        opts.pop(1)
    fams = []
    for oname, osec, lossy in opts:
        for k in (0, n // 2, n):
            what = "no checkpoint" if k == 0 else ("checkpoint all" if k == n else f"checkpoint last {k}")
            plan = {**osec, **ck(n, k)}
            fams.append({"family": f"{oname}, {what}", "plan": plan or None, "lossy": lossy, "k": k, "opt": oname})
    return fams


# --- the measuring worker: one model, many configs ------------------------------------------------------


def build(name: str, w: dict, device):
    import torch

    if name.startswith("llama"):
        from transformers import LlamaConfig, LlamaForCausalLM

        g = runpy.run_path(str(ROOT / w["script"]))
        cfg = dict(layers=2, hidden=128, intermediate=344, heads=4, kv_heads=2, vocab=1000, seq_len=64, batch_size=4)
        if "--preset" in w["argv"]:
            cfg.update(g["PRESETS"][w["argv"][w["argv"].index("--preset") + 1]])
        if "--layers" in w["argv"]:
            cfg["layers"] = int(w["argv"][w["argv"].index("--layers") + 1])
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                             num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                             num_key_value_heads=cfg["kv_heads"], max_position_embeddings=cfg["seq_len"],
                             attn_implementation="sdpa")
        model = LlamaForCausalLM(config).to(device)
        model.config.use_cache = False
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)

        def batch(bs):
            return torch.randint(cfg["vocab"], (bs, cfg["seq_len"]), device=device)

        def loss_fn(ids):
            return model(input_ids=ids, labels=ids).loss

        return model, opt, batch, loss_fn, cfg["seq_len"]
    import torch.nn.functional as F

    g = runpy.run_path(str(ROOT / w["script"]))
    cfg = dict(layers=4, width=128, heads=4, seq_len=64, vocab=512, batch_size=8)
    if "--preset" in w["argv"]:
        cfg.update(g["PRESETS"][w["argv"][w["argv"].index("--preset") + 1]])
    torch.manual_seed(0)
    model = g["GPT"](cfg["layers"], cfg["width"], cfg["heads"], cfg["seq_len"], cfg["vocab"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def batch(bs):
        return g["synthetic_batch"](bs, cfg["seq_len"] + 1, cfg["vocab"], gen).to(device)

    def loss_fn(data):
        x, y = data[:, :-1], data[:, 1:]
        logits = model(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))

    return model, opt, batch, loss_fn, cfg["seq_len"]


def plan_key(plan: dict | None) -> str:
    """Canonical form of a plan's sections, as validated by the strategies (the tuner's plans and the grid's
    compare equal when they are the same plan)."""
    if not plan:
        return "{}"
    from memtune.strategies import plan_from_dict

    return json.dumps(plan_from_dict(dict(plan)).section_dicts(), sort_keys=True, default=str)


def worker(name: str, w: dict, configs: list[dict], out: Path, steps: int, budgets: list[int], deadline: float) -> None:
    """Measure each config (model built once); write results after each so a timeout keeps what was done.
    After the grid, the manual recipe at the largest batch whose checkpoint-all twin fit each budget."""
    import torch

    from memtune.patcher import apply_plan
    from memtune.strategies import get_strategy, ordered_sections, plan_from_dict

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, opt, batch, loss_fn, seq = build(name, w, device)
    use_amp = device.type == "cuda"
    max_budget = max(budgets)
    results: list[dict] = []
    over: dict[str, int] = {}  # family -> smallest batch that ran out of memory or over the largest budget

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(bs):
        data = batch(bs)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = loss_fn(data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # looked up each step: offload's patch applies
        opt.step()
        opt.zero_grad(set_to_none=True)

    def measure(c: dict) -> dict:
        r = {k: v for k, v in c.items()}
        undos = []
        try:
            if c.get("plan"):
                plan = plan_from_dict(dict(c["plan"]))
                for sname, sec in ordered_sections(plan):  # what `memtune apply` installs before the script
                    undos.append(get_strategy(sname).install(sec, None))
                undos.append(apply_plan(model, opt, plan))
            if c.get("hf_gc"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            step(c["batch"])  # warm-up (kernels, pinned buffers, a swapped optimizer's state)
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                step(c["batch"])
                sync()
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            r.update(status="ok", step_s=med, step_times=[round(t, 5) for t in times],
                     spread=(max(times) - min(times)) / med, samples_per_s=c["batch"] / med,
                     tokens_per_s=c["batch"] * seq / med,
                     peak_bytes=torch.cuda.max_memory_allocated() if device.type == "cuda" else None)
        except torch.OutOfMemoryError:
            r["status"] = "oom"
        except Exception as e:  # a plan the harness cannot run: record it, go on
            r.update(status="failed", detail=f"{type(e).__name__}: {e}"[:300])
        finally:
            opt.zero_grad(set_to_none=True)
            for u in reversed(undos):
                u()
            if c.get("hf_gc"):
                model.gradient_checkpointing_disable()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return r

    def record(r: dict) -> None:
        results.append(r)
        print(json.dumps({k: r.get(k) for k in ("family", "batch", "status", "peak_bytes", "samples_per_s", "spread")},
                         default=str), flush=True)
        out.write_text(json.dumps(results, indent=1, default=str))

    for _ in range(2):  # one-time costs (allocator, cuBLAS, the optimizer's state) before any measurement
        step(min(c["batch"] for c in configs))
    sync()
    n = w["n_layers"]

    def run_manual() -> None:
        """transformers' gradient checkpointing at the largest batch that fits each budget (tried from the
        largest batch its checkpoint-all twin fitted), and at the smallest batch."""
        twin = [r for r in results if r.get("opt") == "adamw" and r.get("k") == n and r["status"] == "ok" and not r.get("tuned")]
        done: dict[int, dict] = {}

        def manual(bs: int) -> dict:
            if bs not in done:
                c = {"family": "manual: HF gradient checkpointing", "plan": None, "hf_gc": True, "manual": True, "batch": bs}
                done[bs] = measure(c) if time.time() < deadline else {**c, "status": "not run (time)"}
                record(done[bs])
            return done[bs]

        for b in sorted(budgets, reverse=True):  # the largest batch that fits each budget (its checkpoint-all twin's first)
            for bs in sorted((r["batch"] for r in twin if (r.get("peak_bytes") or 0) <= b), reverse=True):
                m = manual(bs)
                if m["status"] == "ok" and (m.get("peak_bytes") or 0) <= b:
                    break
        manual(min(w["batches"]))  # the recipe's floor, to show where it does not fit

    for c in configs:
        first_over = over.get(c["family"])
        if time.time() > deadline:
            record({**c, "status": "not run (time)"})
        elif first_over is not None and c["batch"] > first_over and not (c.get("tuned") or c.get("unpatched")):
            record({**c, "status": "skipped (smaller batch over budget)"})
        else:
            r = measure(c)
            if r["status"] == "oom" or (r.get("peak_bytes") or 0) > max_budget:
                over[c["family"]] = min(c["batch"], first_over or c["batch"])
            record(r)
        if c.get("last_of_twin") and w["hf"]:  # GPT's recipe (checkpoint every block) is that family itself
            run_manual()


# --- the driver ---------------------------------------------------------------------------------------------


def sh(cmd: list[str], timeout: float, log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=max(1, timeout)).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t0


def get_profile(name: str, w: dict, out: Path, deadline: float, args, res: dict) -> Path | None:
    """`memtune profile` of the unchanged script, or (--profiles stored) the H100 profile that
    benchmarks/accuracy_results.json holds for it."""
    prof = out / f"{name}.profile.json"
    if args.profiles == "stored" and w.get("stored"):
        from memtune.profile import Profile

        rec = next(m for m in json.loads((ROOT / "benchmarks" / "accuracy_results.json").read_text())["models"]
                   if m["model"] == w["stored"])
        p = Profile.from_dict(rec["profile"])
        p.cwd = str(ROOT)
        # both scripts clip at 1.0; these profiles predate the profiler recording it (profile.extra.clip_grad_norm)
        p.extra.setdefault("clip_grad_norm", 1.0)
        p.save(prof)
        res["profile"] = "stored (benchmarks/accuracy_results.json)"
        return prof
    rc, wall = sh([sys.executable, "-m", "memtune", "profile", w["script"], "-o", str(prof), "--force", "--steps",
                   str(args.profile_steps), "--", *w["argv"]], timeout=deadline - time.time(), log=out / f"{name}.log")
    res["profile"] = f"memtune profile --steps {args.profile_steps}"
    res["profile_wall_s"] = round(wall, 1)
    if rc != 0:
        res["error"] = f"profile failed (exit {rc}): see {name}.log"
        return None
    return prof


def tune_one(prof: Path, b: int, w: dict, out: Path, name: str, args, lossless: bool):
    from memtune.errors import MemtuneError
    from memtune.tune import tune_files

    tag = "lossless" if lossless else "lossy"
    plan_out = out / f"{name}-{b // 2**20}MiB-{tag}.plan.yaml"
    knob = f"--batch-size={','.join(map(str, w['batches']))}"
    t0 = time.perf_counter()
    try:
        r = tune_files(str(prof), b, str(plan_out), trials=args.trials, timeout=f"{args.search_s}s",
                              verify=args.verify, verify_steps=args.verify_steps, batch_knob=knob,
                              lossless_only=lossless, force=True, seed=0)
        return r, None, time.perf_counter() - t0
    except MemtuneError as e:
        return None, e, time.perf_counter() - t0


def run_tunes(name: str, w: dict, prof: Path, out: Path, deadline: float, args) -> tuple[list[dict], list[dict]]:
    """Tune each budget in the reduced space, lossless first, lossy where no lossless plan fits."""
    from memtune.errors import BudgetTooSmall
    from memtune.units import format_bytes

    tunes, tuned_cfgs = [], []
    with reduced_space():
        for b in w["budgets"]:
            entry: dict = {"budget_bytes": b, "budget": format_bytes(b)}
            if time.time() > deadline - args.tune_reserve:
                entry["status"] = "not run (time)"
                tunes.append(entry)
                continue
            r, err, wall = tune_one(prof, b, w, out, name, args, lossless=True)
            entry["lossless_attempt"] = {"wall_s": round(wall, 1), "error": str(err) if err else None}
            entry["lossy_allowed"] = False
            if isinstance(err, BudgetTooSmall) and time.time() < deadline - args.tune_reserve:
                entry["lossy_allowed"] = True  # no lossless plan is predicted to fit: allow lossy ones
                r, err, wall = tune_one(prof, b, w, out, name, args, lossless=False)
            entry["wall_s"] = round(wall, 1)
            if err is not None:
                entry.update(status="error", error=str(err))
            else:
                verify_s = sum((c.measured or {}).get("wall_s") or 0 for c in r.verified)
                bs = r.plan.run.get("knobs", {}).get("--batch-size")
                sections = dict(r.plan.sections)
                entry.update(status="ok", plan=r.chosen.describe, sections=sections, batch=bs,
                             key=plan_key(sections), lossy=r.chosen.lossy, margin=r.margin,
                             margin_source=r.margin_source, verify_s=round(verify_s, 1),
                             search_s=round(wall - verify_s, 1), predicted=r.chosen.to_dict(), trials=r.new_trials,
                             verified=[c.to_dict() for c in r.verified],
                             apply=r.chosen.measured)
                tuned_cfgs.append({"family": f"tuned {format_bytes(b)}", "plan": sections or None, "batch": bs,
                                   "tuned": True, "budget_bytes": b, "key": plan_key(sections),
                                   "lossy": bool(r.chosen.lossy)})
            tunes.append(entry)
            print(json.dumps({k: entry.get(k) for k in ("budget", "status", "plan", "lossy_allowed", "wall_s",
                                                         "verify_s", "error")}, default=str)[:600], flush=True)
    return tunes, tuned_cfgs


def sweep_configs(w: dict, cuda: bool, tuned: list[dict]) -> list[dict]:
    """What the worker measures, most useful first (a deadline cuts the end): tuned plans that are not grid
    points, the unpatched run, then the families, checkpoint-all ones first (they fit the most budgets),
    each by increasing batch."""
    fams = grid(w, cuda)
    fams.sort(key=lambda f: -f["k"])  # stable: adamw, offload, adamw8bit within each k
    configs, unpatched = [], []
    for f in fams:
        key = plan_key(f["plan"])
        for bs in w["batches"]:
            c = dict(f, batch=bs, key=key, grid=True)
            if f["plan"] is None and bs == w["default_batch"]:
                unpatched.append(dict(c, unpatched=True))
            else:
                configs.append(c)
        if f["opt"] == "adamw" and f["k"] == w["n_layers"]:
            configs[-1]["last_of_twin"] = True
    on_grid = {(c["key"], c["batch"]) for c in configs + unpatched}
    extra, seen = [], set()
    for t in tuned:
        if (t["key"], t["batch"]) not in on_grid and (t["key"], t["batch"]) not in seen:
            seen.add((t["key"], t["batch"]))
            extra.append(t)
    return extra + unpatched + configs


def run_workload(name: str, w: dict, out: Path, deadline: float, args) -> dict:
    import torch

    res: dict = {"workload": name, "script": w["script"], "argv": w["argv"], "batches": w["batches"], "tunes": []}
    prof = get_profile(name, w, out, deadline, args, res)
    if prof is None:
        return res
    res["tunes"], tuned = run_tunes(name, w, prof, out, deadline, args)
    configs = sweep_configs(w, torch.cuda.is_available(), tuned)
    cfg_path, sweep_path = out / f"{name}.configs.json", out / f"{name}.sweep.json"
    cfg_path.write_text(json.dumps({"name": name, "w": w, "configs": configs}, default=str))
    rc, wall = sh([sys.executable, __file__, "--worker", str(cfg_path), "--worker-out", str(sweep_path),
                   "--steps", str(args.steps), "--worker-deadline", str(deadline - 5)],
                  timeout=deadline - time.time(), log=out / f"{name}.log")
    res["sweep_wall_s"] = round(wall, 1)
    res["sweep_exit"] = rc
    res["sweep"] = json.loads(sweep_path.read_text()) if sweep_path.is_file() else []
    res["summary"] = summarize(res, w)
    return res


def summarize(res: dict, w: dict) -> list[dict]:
    rows = []
    sweep = res.get("sweep", [])
    ok = [r for r in sweep if r.get("status") == "ok"]
    n = w["n_layers"]

    def fits(r, b):
        return r.get("peak_bytes") is None or r["peak_bytes"] <= b

    for t in res["tunes"]:
        b = t["budget_bytes"]
        lossy_ok = t.get("lossy_allowed", False)
        grid_fit = [r for r in ok if r.get("grid") and fits(r, b)]
        space = [r for r in grid_fit if lossy_ok or not r.get("lossy")]
        best = max(space, key=lambda r: r["samples_per_s"], default=None)
        best_any = max(grid_fit, key=lambda r: r["samples_per_s"], default=None)
        if w["hf"]:
            recipe = [r for r in ok if r.get("manual")]
        else:
            recipe = [r for r in ok if r.get("grid") and r.get("opt") == "adamw" and r.get("k") == n]
        manual = max([r for r in recipe if fits(r, b)], key=lambda r: r["batch"], default=None)
        recipe_floor = min(recipe, key=lambda r: r["batch"], default=None)
        unpatched = next((r for r in sweep if r.get("unpatched")), None)
        tuned = None
        if t.get("status") == "ok":
            same = [r for r in ok if r.get("key") == t["key"] and r.get("batch") == t["batch"]]
            tuned = same[0] if same else next((r for r in sweep if r.get("key") == t["key"]
                                               and r.get("batch") == t["batch"]), None)
        row = {"budget": t.get("budget"), "budget_bytes": b, "tune_status": t.get("status"),
               "tune_wall_s": t.get("wall_s"), "search_s": t.get("search_s"), "verify_s": t.get("verify_s"),
               "lossy_allowed": lossy_ok, "tuned_plan": t.get("plan"), "tuned": tuned, "tuned_apply": t.get("apply"),
               "best_grid": best, "best_any": best_any, "manual": manual, "recipe_floor": recipe_floor,
               "unpatched": unpatched, "error": t.get("error")}
        if tuned and tuned.get("status") == "ok":
            for key, ref in (("ratio_vs_best", best), ("speedup_vs_manual", manual), ("vs_unpatched", unpatched)):
                if ref and ref.get("status") == "ok":
                    row[key] = tuned["samples_per_s"] / ref["samples_per_s"]
            row["within_budget"] = fits(tuned, b)
        rows.append(row)
    return rows


def markdown(all_res: list[dict]) -> str:
    from memtune.units import format_bytes

    def fmt(r, plan=False):
        if not r:
            return "-"
        if r.get("status") != "ok":
            return f"{r.get('family', '')} bs {r.get('batch')}: {r.get('status', '-')}"
        peak = format_bytes(r["peak_bytes"]) if r.get("peak_bytes") is not None else "?"
        what = f"{r['family']}, " if plan else ""
        return f"{what}bs {r['batch']}: {r['samples_per_s']:.2f} samp/s (spread {r['spread']:.0%}), {peak}"

    def pct(row, key):
        return f"{row[key]:.1%}" if key in row else "-"

    lines = ["| workload | budget | tuned plan | tuned (harness) | tuned via `memtune apply` | best of sweep | tuned/best | "
             "manual recipe | tuned/manual | unpatched | tune wall (search + verify) |", "|" + "---|" * 11]
    for res in all_res:
        for row in res.get("summary", []):
            ta = row.get("tuned_apply") or {}
            apply_s = "-"
            if ta.get("status") == "ok":
                apply_s = f"{ta['throughput']:.2f} samp/s" + (f", {format_bytes(ta['peak_bytes'])}"
                                                               if ta.get("peak_bytes") is not None else "")
            plan = row.get("tuned_plan") or f"{row.get('tune_status')}: {(row.get('error') or '')[:160]}"
            if row.get("lossy_allowed"):
                plan += " (lossy allowed: no lossless plan fits)"
            man = fmt(row["manual"]) if row["manual"] else f"none fits (floor: {fmt(row.get('recipe_floor'))})"
            unp = fmt(row["unpatched"])
            if row.get("unpatched") and row["unpatched"].get("peak_bytes", 0) and row["unpatched"]["peak_bytes"] > row["budget_bytes"]:
                unp += " (over budget)"
            wall = (f"{row.get('tune_wall_s')} s ({row.get('search_s')} + {row.get('verify_s')})"
                    if row.get("search_s") is not None else f"{row.get('tune_wall_s')} s")
            lines.append(f"| {res['workload']} | {row['budget']} | {plan} | {fmt(row['tuned'])} | {apply_s} | "
                         f"{fmt(row['best_grid'], plan=True)} | {pct(row, 'ratio_vs_best')} | {man} | "
                         f"{pct(row, 'speedup_vs_manual')} | {unp} | {wall} |")
    return "\n".join(lines) + "\n"


def sweep_markdown(res: dict) -> str:
    """Every measured point of one workload: family x batch -> samples/s (spread), peak."""
    from memtune.units import format_bytes

    batches = res.get("batches", [])
    fams: dict[str, dict[int, str]] = {}
    for r in res.get("sweep", []):
        fam = r["family"] + (" [LOSSY]" if r.get("lossy") else "")
        if r.get("status") == "ok":
            peak = format_bytes(r["peak_bytes"]) if r.get("peak_bytes") is not None else "?"
            cell = f"{r['samples_per_s']:.2f} ({r['spread']:.0%}), {peak}"
        else:
            cell = r.get("status", "-").split(" (")[0]
        fams.setdefault(fam, {})[r["batch"]] = cell
    lines = [f"| {res['workload']}: family | " + " | ".join(f"bs {b}" for b in batches) + " |",
             "|" + "---|" * (len(batches) + 1)]
    for fam, cells in fams.items():
        lines.append(f"| {fam} | " + " | ".join(cells.get(b, "") for b in batches) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench-tune")
    p.add_argument("--workloads", default="gpt350m,llama1b")
    p.add_argument("--deadline", type=float, default=540, help="seconds for everything; later stages are skipped")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on the examples' tiny sizes")
    p.add_argument("--profiles", choices=("fresh", "stored"), default="fresh",
                   help="stored: the H100 profiles of benchmarks/accuracy_results.json instead of profiling")
    p.add_argument("--profile-steps", type=int, default=4)
    p.add_argument("--trials", type=int, default=150)
    p.add_argument("--search-s", type=float, default=15)
    p.add_argument("--verify", type=int, default=2)
    p.add_argument("--verify-steps", type=int, default=8)
    p.add_argument("--tune-reserve", type=float, default=60, help="skip a tune with less than this many seconds left")
    p.add_argument("--steps", type=int, default=8, help="timed steps per measured point (median)")
    p.add_argument("--budgets", default="", help="override budgets in GiB, e.g. llama1b=32;gpt350m=12")
    p.add_argument("--worker")
    p.add_argument("--worker-out")
    p.add_argument("--worker-deadline", type=float, default=0)
    args = p.parse_args()
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        worker(spec["name"], spec["w"], spec["configs"], Path(args.worker_out), args.steps, spec["w"]["budgets"],
               args.worker_deadline or float("inf"))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    deadline = t_start + args.deadline
    table = TINY if args.tiny else WORKLOADS
    import torch

    from memtune.tune.margin import safety_margin

    env = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "margin": safety_margin()}
    all_res = []
    for name in args.workloads.split(","):
        w = dict(table[name], key=name)
        for spec in filter(None, args.budgets.split(";")):
            wname, _, vals = spec.partition("=")
            if wname == name:
                w["budgets"] = [int(float(v) * GiB) for v in vals.split(",")]
        if time.time() > deadline - 30:
            all_res.append({"workload": name, "error": "not run (time)"})
            continue
        all_res.append(run_workload(name, w, out, deadline, args))
        env["elapsed_s"] = round(time.time() - t_start, 1)
        (out / "tune_bench.json").write_text(json.dumps({"env": env, "results": all_res}, indent=1, default=str))
    md = markdown(all_res) + "".join("\n" + sweep_markdown(r) for r in all_res if r.get("sweep"))
    (out / "tune_bench.md").write_text(md)
    print(json.dumps(env, default=str))
    print(md)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
