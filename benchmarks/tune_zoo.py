"""`memtune tune --verify` on zoo scripts at a budget, against the best measured plan of the accuracy run.

The accuracy run (benchmarks/accuracy.py --models zoo) measured a reduced space per script (baseline,
checkpoint half/all, activation offload of half the blocks, optimizer-state offload, a larger batch...): its
best lossless plan inside the budget is the sweep's best. Here each script is tuned from that run's profile at
the budget (default: half its measured baseline peak), its plans verified for real; several tunes run side by
side, their verification runs taking turns on the GPU (benchmarks/accuracy.py's lock).

    python benchmarks/tune_zoo.py --results benchmarks/results/zoo_run2.json --out $OUT/tune --jobs 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy import PROFILE_LOCKED  # noqa: E402  (runs a memtune command once it holds the GPU lock)

SCRIPTS = ["fused_adamw", "lora_handwritten", "peft_lora", "vit", "distill", "unet_diffusion"]


def best_measured(rec: dict, budget: float) -> dict | None:
    ok = [r for r in rec["rows"] if r.get("measured_peak") and r.get("measured_step_s") and r["measured_peak"] <= budget
          and not r.get("lossy") and not r.get("error")]
    if not ok:
        return None

    def sps(r):
        bs = ((r["plan_dict"].get("run") or {}).get("knobs") or {}).get("--batch-size") or rec["profile"]["batch_size"]
        return bs / r["measured_step_s"]

    best = max(ok, key=sps)
    return {"plan": best["plan"], "peak": best["measured_peak"], "samples_per_s": sps(best)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--scripts", nargs="*", default=SCRIPTS)
    ap.add_argument("--fractions", nargs="*", type=float, default=[0.5], help="budgets as shares of the baseline peak")
    ap.add_argument("--also", nargs="*", default=[], metavar="SCRIPT:FRACTION",
                    help="more runs, each a script at its own budget share (after the --scripts x --fractions ones)")
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--search-s", default="8s")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--verify", type=int, default=2)
    args = ap.parse_args()

    import memtune.tune.verify as verify
    from memtune.errors import MemtuneError
    from memtune.tune import tune_files

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lock = out / "gpu.lock"
    real_run = verify.subprocess.run

    def locked_run(cmd, **kw):  # `python -m memtune apply ...` once it holds the GPU
        return real_run([cmd[0], "-c", PROFILE_LOCKED, str(lock), *cmd[3:]], **kw)

    verify.subprocess.run = locked_run
    data = json.loads(Path(args.results).read_text())
    recs = {m["model"]: m for m in data["models"]}
    jobs = []
    pairs = [(n, f) for n in args.scripts for f in args.fractions]
    pairs += [(a.split(":")[0], float(a.split(":")[1])) for a in args.also]
    for name, f in pairs:
        rec = recs[name]
        base = next(r for r in rec["rows"] if r["plan"] == "baseline")
        prof = out / f"{name}.profile.json"
        prof.write_text(json.dumps(rec["profile"]))
        jobs.append((name, rec, prof, f * base["measured_peak"]))

    def one(job):
        name, rec, prof, budget = job
        t0 = time.perf_counter()
        row = {"script": name, "budget_bytes": int(budget), "budget_GiB": round(budget / 2**30, 2)}
        try:
            r = tune_files(str(prof), f"{int(budget)}B", str(out / f"{name}-{int(budget) >> 20}MiB.plan.yaml"),
                           trials=args.trials, timeout=args.search_s, verify=args.verify, verify_steps=5,
                           force=True, lossless_only=True)
            m = r.chosen.measured or {}
            row.update(status="ok", plan=r.chosen.describe, measured_peak_GiB=round((m.get("peak_bytes") or 0) / 2**30, 2),
                       measured_step_s=m.get("step_s"), verified=len(r.verified),
                       within_budget=bool(m.get("peak_bytes") and m["peak_bytes"] <= budget))
            # every verified plan in the order run: the cost model's own step and peak against the measured ones
            row["verified_plans"] = [
                {"plan": c.describe, "predicted_step_s": c.raw_step_s, "predicted_peak_GiB": round(c.raw_peak_bytes / 2**30, 2),
                 "measured_step_s": (c.measured or {}).get("step_s"), "status": (c.measured or {}).get("status"),
                 "measured_peak_GiB": round(((c.measured or {}).get("peak_bytes") or 0) / 2**30, 2)}
                for c in r.verified]
            bs = rec["profile"]["batch_size"]
            row["samples_per_s"] = bs / m["step_s"] if m.get("step_s") else None
        except MemtuneError as e:
            row.update(status="error", error=" ".join(str(e).split())[:400])
        row["tune_s"] = round(time.perf_counter() - t0, 1)
        best = best_measured(rec, budget)
        row["sweep_best"] = best
        if best and row.get("samples_per_s"):
            row["ratio_vs_sweep"] = round(row["samples_per_s"] / best["samples_per_s"], 3)
        print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(max_workers=args.jobs) as ex:
        rows = list(ex.map(one, jobs))
    (out / "tune_results.json").write_text(json.dumps(rows, indent=1))
    print("\n| script | budget GiB | tuned plan | measured GiB | samples/s | sweep best | ratio | tune s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = r.get("sweep_best") or {}
        print(f"| {r['script']} | {r['budget_GiB']} | {r.get('plan', r.get('error', ''))[:80]} | "
              f"{r.get('measured_peak_GiB', '')} | {r.get('samples_per_s') or 0:.2f} | {b.get('plan', 'none fits')} "
              f"{(b.get('samples_per_s') or 0):.2f} | {r.get('ratio_vs_sweep', '')} | {r['tune_s']} |")


if __name__ == "__main__":
    main()
