"""Does `memtune tune` find a plan as good as an exhaustive measured sweep, in under two minutes?

For each workload and budget:
  1. `memtune profile` the unchanged example script (a subprocess);
  2. tune over the reduced space {checkpoint: last k blocks, full or selective} x {--batch-size values}, with
     `--verify 2` (the best two predicted plans run for real through `memtune apply` subprocesses); wall time;
  3. in one worker process per workload (the model built once), measure every point of a grid of that same
     space, the manual recipe (transformers' gradient checkpointing on every layer, or checkpointing every
     block for the plain-PyTorch GPT, plus the largest batch that fits), the unpatched run, and the tuned plans;
     peak = torch.cuda.max_memory_allocated over 6 steps after a warm-up step, time = median step.
A batch grows in a family only while the smaller batch stayed under the largest budget and did not run out of
memory. Results: JSON and a markdown table (docs/benchmarks.md).

    python benchmarks/tune.py --out /tmp/tune                  # H100: Llama 1B at 12/20/32 GiB, GPT-350M at 12 GiB
    python benchmarks/tune.py --tiny --out /tmp/tune           # CPU smoke test of the whole path (seconds)
"""

from __future__ import annotations

import argparse
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
    "llama1b": dict(script="examples/hf_llama.py", argv=["--preset", "1b"], batches=[2, 4, 8, 16],
                    budgets=[12 * GiB, 20 * GiB, 32 * GiB], n_layers=22, hf=True, default_batch=4),
    "gpt350m": dict(script="examples/gpt.py", argv=["--preset", "350m"], batches=[4, 8, 16, 32],
                    budgets=[12 * GiB], n_layers=24, hf=False, default_batch=8),
}
TINY = {  # CPU smoke test: the same path on the examples' default (tiny) sizes
    "llama1b": dict(script="examples/hf_llama.py", argv=["--layers", "4"], batches=[2, 4], budgets=[64 * 2**20],
                    n_layers=4, hf=True, default_batch=4),
    "gpt350m": dict(script="examples/gpt.py", argv=[], batches=[4, 8], budgets=[64 * 2**20], n_layers=4, hf=False,
                    default_batch=8),
}


def ks(n: int) -> list[int]:
    """Grid of k (the last k blocks checkpointed): 0, about a quarter, half, three quarters, all."""
    return sorted({0, round(n / 4), round(n / 2), round(3 * n / 4), n})


def grid(w: dict) -> list[dict]:
    """The measured sweep: families of configs, each over the batch sizes."""
    n = w["n_layers"]
    fams = [{"family": "unpatched", "plan": None}]
    for k in ks(n)[1:]:
        fams.append({"family": f"checkpoint last {k} full", "plan": ck(n, k, "full")})
    for k in (round(n / 2), n):
        fams.append({"family": f"checkpoint last {k} selective", "plan": ck(n, k, "selective")})
    fams.append({"family": "manual: HF gradient checkpointing" if w["hf"] else "manual: checkpoint every block",
                 "plan": None if w["hf"] else ck(n, n, "full"), "hf_gc": w["hf"], "manual": True})
    return fams


def ck(n: int, k: int, mode: str) -> dict:
    return {"checkpoint": {"blocks": "all" if k == n else [f"{n - k}-{n - 1}"], "mode": mode}}


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


def worker(name: str, w: dict, configs: list[dict], out: Path, steps: int, max_budget: int) -> None:
    """Measure each config (model built once); write results after each so a timeout keeps what was done."""
    import torch

    from memtune.patcher import apply_plan

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, opt, batch, loss_fn, seq = build(name, w, device)
    use_amp = device.type == "cuda"
    results: list[dict] = []
    over: set[str] = set()  # families whose smaller batch already ran out of memory or over the largest budget

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(bs):
        data = batch(bs)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = loss_fn(data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # one-time costs (allocator, cuBLAS, the optimizer's state) before any measurement
        step(min(c["batch"] for c in configs))
    sync()
    for c in configs:
        r = {k: v for k, v in c.items() if k != "plan"}
        r["plan"] = c.get("plan")
        if c["family"] in over and not c.get("tuned"):
            r["status"] = "skipped (smaller batch over budget)"
            results.append(r)
            continue
        undo = None
        try:
            if c.get("plan"):
                undo = apply_plan(model, opt, c["plan"])
            if c.get("hf_gc"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            step(c["batch"])  # warm-up (and the optimizer's state on the first config)
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                step(c["batch"])
                sync()
                times.append(time.perf_counter() - t0)
            r["step_s"] = statistics.median(times)
            r["samples_per_s"] = c["batch"] / r["step_s"]
            r["tokens_per_s"] = r["samples_per_s"] * seq
            r["peak_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
            r["status"] = "ok"
            if r["peak_bytes"] is not None and r["peak_bytes"] > max_budget:
                over.add(c["family"])
        except torch.OutOfMemoryError:
            r["status"] = "oom"
            over.add(c["family"])
        finally:
            opt.zero_grad(set_to_none=True)
            if undo is not None:
                undo()
            if c.get("hf_gc"):
                model.gradient_checkpointing_disable()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(r)
        print(json.dumps({k: r.get(k) for k in ("family", "batch", "status", "peak_bytes", "samples_per_s")}), flush=True)
        out.write_text(json.dumps(results, indent=1, default=str))


# --- the driver ---------------------------------------------------------------------------------------------


def sh(cmd: list[str], timeout: float, log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t0


def run_workload(name: str, w: dict, out: Path, deadline: float, args) -> dict:
    import memtune.strategies as strategies
    from memtune import search
    from memtune.units import format_bytes

    res: dict = {"workload": name, "script": w["script"], "argv": w["argv"], "batches": w["batches"], "tunes": []}
    log = out / f"{name}.log"
    prof = out / f"{name}.profile.json"
    rc, wall = sh([sys.executable, "-m", "memtune", "profile", w["script"], "-o", str(prof), "--force", "--steps", "4",
                   "--", *w["argv"]], timeout=max(30, deadline - time.time()), log=log)
    res["profile_wall_s"] = round(wall, 1)
    if rc != 0:
        res["error"] = f"profile failed (exit {rc}): see {log.name}"
        return res
    # the reduced space: only the checkpoint strategy (and the batch knob), in this process
    strategies._load()
    keep = {"checkpoint": strategies._REGISTRY["checkpoint"]}
    saved = dict(strategies._REGISTRY)
    strategies._REGISTRY.clear()
    strategies._REGISTRY.update(keep)
    knob = f"--batch-size={','.join(map(str, w['batches']))}"
    tuned_cfgs = []
    try:
        for b in w["budgets"]:
            if time.time() > deadline - 60:
                res["tunes"].append({"budget_bytes": b, "status": "not run (time)"})
                continue
            plan_out = out / f"{name}-{b // 2**20}MiB.plan.yaml"
            t0 = time.perf_counter()
            entry = {"budget_bytes": b, "budget": format_bytes(b)}
            try:
                r = search.tune_files(str(prof), str(b), str(plan_out), trials=args.trials, timeout=f"{args.search_s}s",
                                      verify=args.verify, verify_steps=8, batch_knob=knob, lossless_only=True,
                                      force=True, seed=0)
                entry.update(status="ok", wall_s=round(time.perf_counter() - t0, 1), plan=r.chosen.describe,
                             predicted=r.chosen.to_dict(), trials=r.new_trials,
                             verified=[c.to_dict() for c in r.verified])
                sections = {k: v for k, v in r.plan.sections.items()}
                bs = r.plan.run.get("knobs", {}).get("--batch-size")
                tuned_cfgs.append({"family": f"tuned {format_bytes(b)}", "plan": sections or None, "batch": bs,
                                   "tuned": True, "budget_bytes": b})
            except search.MemtuneError as e:
                entry.update(status="error", wall_s=round(time.perf_counter() - t0, 1), error=str(e))
            res["tunes"].append(entry)
            print(json.dumps(entry, default=str)[:400], flush=True)
    finally:
        strategies._REGISTRY.clear()
        strategies._REGISTRY.update(saved)
    # the measured sweep, in a worker process (GPU memory of this process stays untouched)
    configs = [dict(f, batch=bs) for f in grid(w) for bs in w["batches"]]
    if args.remeasure:  # only the sweep's best, the manual recipe and the unpatched run of an earlier sweep
        prev = next(r for r in json.loads(Path(args.remeasure).read_text())["results"] if r["workload"] == name)
        keys = set()
        for row in summarize(prev, w):
            if row["budget_bytes"] in w["budgets"]:
                keys |= {(r["family"], r["batch"]) for r in (row["best_grid"], row["manual"], row["unpatched"]) if r}
        configs = [c for c in configs if (c["family"], c["batch"]) in keys]
    configs += tuned_cfgs
    cfg_path, sweep_path = out / f"{name}.configs.json", out / f"{name}.sweep.json"
    cfg_path.write_text(json.dumps({"name": name, "w": w, "configs": configs}, default=str))
    rc, wall = sh([sys.executable, __file__, "--worker", str(cfg_path), "--worker-out", str(sweep_path),
                   "--max-budget", str(max(w["budgets"]))], timeout=max(10, deadline - time.time()), log=log)
    res["sweep_wall_s"] = round(wall, 1)
    res["sweep_exit"] = rc
    res["sweep"] = json.loads(sweep_path.read_text()) if sweep_path.is_file() else []
    res["summary"] = summarize(res, w)
    return res


def summarize(res: dict, w: dict) -> list[dict]:
    rows = []
    sweep = res["sweep"]
    ok = [r for r in sweep if r.get("status") == "ok"]
    for t in res["tunes"]:
        b = t["budget_bytes"]
        fits = [r for r in ok if r.get("peak_bytes") is None or r["peak_bytes"] <= b]
        grid_pts = [r for r in fits if not r.get("tuned")]
        best = max(grid_pts, key=lambda r: r["samples_per_s"], default=None)
        manual = max([r for r in grid_pts if r.get("manual")], key=lambda r: r["batch"], default=None)
        unpatched = [r for r in sweep if r["family"] == "unpatched" and r["batch"] == w["default_batch"]]
        tuned = next((r for r in sweep if r.get("tuned") and r.get("budget_bytes") == b), None)
        ver = next((v for v in t.get("verified", []) if v.get("measured") and v["measured"].get("status") == "ok"
                    and v["plan"] == t.get("plan")), None)
        row = {"budget": t.get("budget"), "budget_bytes": b, "tune_status": t.get("status"), "tune_wall_s": t.get("wall_s"),
               "tuned_plan": t.get("plan"), "tuned": tuned, "tuned_apply": ver and ver["measured"],
               "best_grid": best, "manual": manual, "unpatched": unpatched[0] if unpatched else None}
        if tuned and tuned.get("status") == "ok" and best:
            row["ratio_vs_best"] = tuned["samples_per_s"] / best["samples_per_s"]
        if tuned and tuned.get("status") == "ok" and manual:
            row["speedup_vs_manual"] = tuned["samples_per_s"] / manual["samples_per_s"]
        rows.append(row)
    return rows


def markdown(all_res: list[dict]) -> str:
    from memtune.units import format_bytes

    def fmt(r):
        if not r:
            return "-"
        if r.get("status") != "ok":
            return r.get("status", "-")
        peak = format_bytes(r["peak_bytes"]) if r.get("peak_bytes") is not None else "?"
        return f"{r['samples_per_s']:.2f} samp/s, {peak} (bs {r['batch']})"

    lines = ["| workload | budget | tuned plan | tuned (harness) | tuned via `memtune apply` | best of sweep | tuned/best | "
             "manual recipe | tuned/manual | unpatched | tune wall |", "|" + "---|" * 11]
    for res in all_res:
        for row in res.get("summary", []):
            ta = row.get("tuned_apply")
            apply_s = (f"{ta['throughput']:.2f} samp/s, {format_bytes(ta['peak_bytes'])}"
                       if ta and ta.get("peak_bytes") is not None else (f"{ta['throughput']:.2f} samp/s" if ta else "-"))
            ratio = f"{row['ratio_vs_best']:.1%}" if "ratio_vs_best" in row else "-"
            sp = f"{row['speedup_vs_manual']:.2f}x" if "speedup_vs_manual" in row else "-"
            lines.append(f"| {res['workload']} | {row['budget']} | {row.get('tuned_plan') or row.get('tune_status')} | "
                         f"{fmt(row['tuned'])} | {apply_s} | {fmt(row['best_grid'])} ({(row['best_grid'] or {}).get('family', '')}) | "
                         f"{ratio} | {fmt(row['manual'])} | {sp} | {fmt(row['unpatched'])} | {row.get('tune_wall_s')} s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench-tune")
    p.add_argument("--workloads", default="llama1b,gpt350m")
    p.add_argument("--deadline", type=float, default=540, help="seconds for everything; later stages are skipped")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on the examples' tiny sizes")
    p.add_argument("--trials", type=int, default=150)
    p.add_argument("--search-s", type=float, default=20)
    p.add_argument("--verify", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--remeasure", help="results JSON of an earlier run: measure only its key configs again")
    p.add_argument("--budgets", default="", help="override budgets in GiB, e.g. llama1b=32;gpt350m=12")
    p.add_argument("--worker")
    p.add_argument("--worker-out")
    p.add_argument("--max-budget", type=int, default=0)
    args = p.parse_args()
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        worker(spec["name"], spec["w"], spec["configs"], Path(args.worker_out), args.steps, args.max_budget)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.deadline
    table = TINY if args.tiny else WORKLOADS
    import torch

    env = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
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
        (out / "tune_bench.json").write_text(json.dumps({"env": env, "results": all_res}, indent=1, default=str))
    md = markdown(all_res)
    (out / "tune_bench.md").write_text(md)
    print(json.dumps(env))
    print(md)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
