"""A 7B full fine-tune on one GPU: memtune's host-offload plans beside torchao's CPUOffloadOptimizer and FSDP2's
CPUOffloadPolicy, on the same model (examples/zoo/llama7b_full.py: fp32 weights, bf16 autocast, AdamW).

    python benchmarks/offload7b.py --out offload7b.json                  # the H200 run (~8 min), markdown table
    python benchmarks/offload7b.py --size 1b --steps 4                   # smaller Llamas of the same recipe
    python benchmarks/offload7b.py --only memtune,torchao_b8             # some configurations
    python benchmarks/offload7b.py --plan plan.yaml --batch-size 8       # `memtune apply PLAN` on the script
    python benchmarks/offload7b.py --size tiny --device cpu --steps 3    # smoke test of this file (CPU)

Each configuration runs in its own subprocess (fresh CUDA context, allocator and pinned memory) under a
timeout; those that would start after --budget-s are skipped. Reported per configuration: the whole run's
peak `max_memory_allocated` (model construction included), tokens/s (median step after the warm-up steps,
as the script times it), the peak host RSS of the process tree (pinned memory included), the last loss.

- memtune configurations run the unchanged script through `python -m memtune apply PLAN SCRIPT -- ...`: the
  plan (benchmarks/plans/llama7b_24gib.yaml, what `memtune tune` found for a 24 GiB budget; or --plan) places
  the model itself when the script calls `model.to("cuda")`. Peak = max(the peak before the plan was applied,
  the steps' peak) from the `--report`.
- torchao: `CPUOffloadOptimizer(params, torch.optim.AdamW, offload_gradients=True)` with transformers'
  gradient checkpointing, fp32 weights on the GPU; no clipping (its gradients are not on the device when
  `clip_grad_norm_` runs, so the clip would do nothing) and no LR scheduler (it is not a torch Optimizer).
- fsdp2: `fully_shard` on every decoder layer and the root in a world-size-1 process group, with
  `CPUOffloadPolicy(pin_memory=True)` and `MixedPrecisionPolicy(bf16 params, fp32 reduce)`, transformers'
  checkpointing, the script's AdamW stepping on the host-resident fp32 shards, clipping on.
- unconstrained: bf16 weights, transformers' checkpointing, fused AdamW on the GPU (the issue's 8.84k tok/s
  reference at batch 4; not lossless: bf16 weights without masters).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "zoo" / "llama7b_full.py"
PLAN = ROOT / "benchmarks" / "plans" / "llama7b_24gib.yaml"
sys.path.insert(0, str(ROOT / "examples" / "zoo"))
sys.path.insert(0, str(ROOT))


# --- configurations ----------------------------------------------------------------------------------------


def configs(plan_batch: int) -> dict[str, dict]:
    """In priority order (what --budget-s cuts comes last)."""
    b = plan_batch
    return {
        f"memtune_b{b}": dict(kind="memtune", batch=b),  # the tuned plan, exact schedule, lossless, clip on
        "torchao_b8": dict(kind="torchao", batch=8),
        "fsdp2_b8": dict(kind="fsdp2", batch=8),
        f"memtune_b{b}_noclip": dict(kind="memtune", batch=b, clip=0.0),  # beside torchao, which cannot clip
        "memtune_delayed_b8": dict(kind="memtune", batch=8, schedule="delayed"),  # lossy: one-step delay
        "memtune_b8": dict(kind="memtune", batch=8),
        "torchao_b1": dict(kind="torchao", batch=1),
        "unconstrained_b4": dict(kind="unconstrained", batch=4),
        "fsdp2_b1": dict(kind="fsdp2", batch=1),
    }


def plan_for(base: dict, c: dict) -> dict:
    """The plan document of one memtune configuration: the base plan at the configuration's batch."""
    import copy

    d = copy.deepcopy(base)
    d.pop("provenance", None)
    d.setdefault("run", {})["knobs"] = {"--batch-size": c["batch"]}
    if c.get("schedule") == "delayed":  # the host weights are rewritten while the next step runs: keep them
        d["offload"] = {k: v for k, v in d["offload"].items() if k not in ("params", "prefetch")}  # resident
        d["offload"]["schedule"] = "delayed"
    return d


# --- children ------------------------------------------------------------------------------------------------


def _loop(model, opt, sched, cfg, args, batch, clip, device):
    """The script's training loop (examples/zoo/llama7b_full.py), for the configurations not run through it."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    losses, times = [], []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        ids = torch.randint(cfg["vocab"], (batch, cfg["seq_len"]), generator=gen).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.item()))
        times.append(time.perf_counter() - t0)
        _progress(f"step {len(times)}: {times[-1]:.2f} s, loss {losses[-1]:.4f}")
    return losses, times


_T0 = time.perf_counter()


def _progress(msg: str) -> None:
    """A child's progress on its stdout: what a timeout reports (where the time went)."""
    print(f"[{time.perf_counter() - _T0:6.1f} s] {msg}", flush=True)


def child_inprocess(name: str, c: dict, args) -> dict:
    import torch
    from llama7b_full import build

    device = torch.device(args.device)
    torch.manual_seed(0)
    model, cfg = build(args.size)
    _progress("model built")
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    clip = c.get("clip", args.clip)
    sched = None
    notes: list[str] = []
    if c["kind"] == "torchao":
        try:
            from torchao.optim import CPUOffloadOptimizer
        except ImportError as e:
            return {"error": f"torchao not importable here ({e})"}
        model.to(device)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        opt = CPUOffloadOptimizer(model.parameters(), torch.optim.AdamW, offload_gradients=True, lr=args.lr,
                                  betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        clip = 0.0
        notes.append("no clip (offloaded gradients), no LR schedule (not a torch Optimizer)")
    elif c["kind"] == "fsdp2":
        opt, notes = _fsdp2(model, args, device)
    elif c["kind"] == "unconstrained":
        model.to(device, torch.bfloat16)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                                fused=device.type == "cuda")
        notes.append("bf16 weights without masters (lossy)")
    else:
        raise ValueError(c["kind"])
    _progress(f"{c['kind']} set up")
    if sched is None and isinstance(opt, torch.optim.Optimizer):
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    losses, times = _loop(model, opt, sched, cfg, args, c["batch"], clip, device)
    timed = times[args.warmup:] or times
    med = statistics.median(timed)
    tokens = c["batch"] * cfg["seq_len"]
    return {"losses": losses, "step_times": times, "median_step_s": med, "tokens_per_s": tokens / med,
            "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "clip": clip, "notes": notes, "n_params": sum(p.numel() for p in model.parameters())}


def _fsdp2(model, args, device):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    dist.init_process_group(backend, rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (1,))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
    if device.type == "cuda":
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    return opt, ["FSDP2 world size 1: fp32 shards (+ grads, AdamW state) on the host, bf16 compute"]


def child_memtune(name: str, c: dict, args, tmp: Path) -> dict:
    """`python -m memtune apply PLAN SCRIPT -- ...` in this process's child; its report and the script's json."""
    import yaml

    base = yaml.safe_load(Path(args.plan).read_text())
    plan_file, report, out = tmp / f"{name}.plan.yaml", tmp / f"{name}.report.json", tmp / f"{name}.script.json"
    plan_file.write_text(yaml.safe_dump(plan_for(base, c), sort_keys=False))
    clip = c.get("clip", args.clip)
    cmd = [sys.executable, "-m", "memtune", "apply", str(plan_file), str(SCRIPT), "--report", str(report), "--",
           "--size", args.size, "--batch-size", str(c["batch"]), "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--clip", str(clip), "--lr", str(args.lr), "--json", str(out), "--device", args.device]
    if args.device == "cpu":  # the smoke test: offload on a CPU with clones for host copies (tests' stand-in)
        cmd = [sys.executable, "-c", "import sys; from memtune.strategies.offload import simulate_host; "
               "from memtune.cli import app; sys.argv = ['memtune'] + sys.argv[1:]; keep = simulate_host(); keep.__enter__(); app()",
               *cmd[3:]]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # its lines pass through as progress: a timeout then says how far `memtune apply` got (call 48's plan
    # run timed out at 150 s with nothing to show)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=str(ROOT))
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            tail = (tail + [line])[-3:]
            _progress(f"apply: {line[:160]}")
    proc.wait()
    if not out.exists():
        return {"error": f"memtune apply exit {proc.returncode}: {' | '.join(tail)}"}
    r = json.loads(out.read_text())
    rep = json.loads(report.read_text()) if report.exists() else {}
    peaks = [x for x in (rep.get("load_peak_bytes"), rep.get("peak_allocated_bytes")) if x is not None]
    r["peak_bytes"] = max(peaks) if peaks else r.get("peak_bytes")
    r["load_peak_bytes"] = rep.get("load_peak_bytes")
    r["notes"] = [f"{n['strategy']}: {n['note']}" for n in rep.get("notes", [])]
    r["clip"] = clip
    r["lossy"] = rep.get("lossy", [])
    return r


def child(args) -> dict:
    tmp = Path(args.tmp)
    c = json.loads(args.child_cfg)
    if c["kind"] == "memtune":
        return child_memtune(args.child, c, args, tmp)
    return child_inprocess(args.child, c, args)


# --- the parent --------------------------------------------------------------------------------------------


def _watch_rss(proc: subprocess.Popen, peak: list[float]) -> None:
    """Peak resident memory of the child and its children (pinned host memory is resident)."""
    try:
        import psutil
    except ImportError:
        return
    try:
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            rss = p.memory_info().rss + sum(ch.memory_info().rss for ch in p.children(recursive=True))
            peak[0] = max(peak[0], rss)
            time.sleep(0.5)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass


def pinned_bandwidth() -> tuple[float, float]:
    import torch

    if not torch.cuda.is_available():
        return 0.0, 0.0
    n = 1 << 30
    d = torch.empty(n, dtype=torch.uint8, device="cuda")
    h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    out = []
    for dst, src in ((h, d), (d, h)):
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        out.append(3 * n / (time.perf_counter() - t0) / 1e9)
    return out[0], out[1]


def table(results: dict, meta: dict) -> str:
    rows = ["| configuration | batch | peak GiB (whole run) | tokens/s | step s | host RSS GiB | last loss | notes |",
            "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | {r.get('batch', '')} | - | - | - | - | - | {r['error'][:160]} |")
            continue
        pk = r.get("peak_bytes")
        lossy = " LOSSY" if r.get("lossy") else ""
        rows.append(f"| {name}{lossy} | {r['batch']} | {pk / 2**30:.1f} | {r['tokens_per_s']:.0f} | "
                    f"{r['median_step_s']:.2f} | {r.get('host_rss_bytes', 0) / 2**30:.1f} | {r['losses'][-1]:.4f} | "
                    f"clip {r.get('clip')}; {'; '.join(r.get('notes', []))[:200]} |" if pk is not None else
                    f"| {name}{lossy} | {r['batch']} | n/a | {r['tokens_per_s']:.0f} | {r['median_step_s']:.2f} | "
                    f"{r.get('host_rss_bytes', 0) / 2**30:.1f} | {r['losses'][-1]:.4f} | |")
    head = (f"{meta.get('device', '?')}, torch {meta.get('torch', '?')}, Llama {meta['size']} "
            f"({meta.get('n_params', 0) / 1e9:.2f}B), seq {meta.get('seq_len')}, {meta['steps']} steps "
            f"({meta['warmup']} warm-up), pinned D2H {meta.get('d2h_gbps', 0):.1f} / H2D {meta.get('h2d_gbps', 0):.1f} "
            f"GB/s, {meta.get('cpu_count')} host cores, total {meta.get('wall_s', 0):.0f} s")
    return head + "\n\n" + "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="7b", choices=["tiny", "1b", "3b", "7b"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--plan", default=str(PLAN), help="the memtune plan (default: the tuned 24 GiB plan)")
    p.add_argument("--batch-size", type=int, help="--plan mode: the batch size (default: the plan's)")
    p.add_argument("--only", help="comma-separated configuration names, or 'memtune' / 'torchao' / 'fsdp2'")
    p.add_argument("--timeout", type=float, default=200.0, help="seconds per configuration")
    p.add_argument("--budget-s", type=float, default=470.0, help="start no configuration after this many seconds")
    p.add_argument("--out", help="write all numbers as JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-cfg", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        try:
            r = child(args)
        except Exception as e:  # reported in the row
            import traceback

            r = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        Path(args.result).write_text(json.dumps(r))
        return

    import yaml

    t_start = time.perf_counter()
    plan_batch = (yaml.safe_load(Path(args.plan).read_text()).get("run", {}).get("knobs", {}) or {}).get(
        "--batch-size", 8)
    if args.batch_size:
        plan_batch = args.batch_size
    all_cfgs = configs(int(plan_batch))
    if args.plan != str(PLAN) or args.batch_size:  # --plan mode: that plan alone unless --only says more
        all_cfgs = {f"plan_b{plan_batch}": dict(kind="memtune", batch=int(plan_batch)), **all_cfgs}
        if not args.only:
            args.only = f"plan_b{plan_batch}"
    names = list(all_cfgs)
    if args.only:
        want = args.only.split(",")
        names = [n for n in names if n in want or any(n.startswith(w + "_") for w in want)]
    d2h, h2d = (pinned_bandwidth() if args.device == "cuda" else (0.0, 0.0))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            c = all_cfgs[name]
            left = args.budget_s - (time.perf_counter() - t_start)
            if left < 30:
                results[name] = {"error": "skipped: --budget-s spent", "batch": c["batch"]}
                print(f"{name:26s} skipped (budget)", flush=True)
                continue
            res_file = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--child", name, "--child-cfg", json.dumps(c), "--result", str(res_file),
                   "--tmp", tmp, "--size", args.size, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--lr", str(args.lr), "--clip", str(args.clip), "--device", args.device, "--plan", args.plan]
            t0 = time.perf_counter()
            peak_rss = [0.0]
            # its own process group: a timeout ends `memtune apply`'s process too, which would hold the GPU
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            watcher = threading.Thread(target=_watch_rss, args=(proc, peak_rss), daemon=True)
            watcher.start()
            limit = min(args.timeout, left)
            try:
                log, _ = proc.communicate(timeout=limit)
                r = json.loads(res_file.read_text()) if res_file.exists() else {
                    "error": f"exit {proc.returncode}: {(log or '').strip().splitlines()[-1:]}"}
            except subprocess.TimeoutExpired:
                import signal

                os.killpg(proc.pid, signal.SIGKILL)
                log, _ = proc.communicate()
                last = [ln for ln in (log or "").splitlines() if ln.startswith("[")][-1:]
                r = {"error": f"timeout after {limit:.0f} s" + (f" (last: {last[0]})" if last else ""),
                     "log_tail": (log or "")[-3000:]}
            watcher.join(timeout=2)
            r.update(batch=c["batch"], wall_s=time.perf_counter() - t0, host_rss_bytes=peak_rss[0], kind=c["kind"])
            results[name] = r
            msg = r["error"] if "error" in r else (
                f"{r['tokens_per_s']:7.0f} tok/s  step {r['median_step_s']:.2f} s  peak "
                f"{(r.get('peak_bytes') or 0) / 2**30:6.1f} GiB  host {peak_rss[0] / 2**30:5.1f} GiB  "
                f"loss {r['losses'][-1]:.4f}")
            print(f"{name:26s} {msg}  [{r['wall_s']:.0f} s]", flush=True)
    import torch
    from llama7b_full import SIZES

    meta = {"size": args.size, "steps": args.steps, "warmup": args.warmup, "d2h_gbps": d2h, "h2d_gbps": h2d,
            "device": torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "seq_len": SIZES[args.size]["seq_len"],
            "n_params": next((r.get("n_params") for r in results.values() if r.get("n_params")), 0),
            "command": " ".join(["python"] + sys.argv), "wall_s": time.perf_counter() - t_start}
    print()
    print(table(results, meta))
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
