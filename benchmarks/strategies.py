"""Peak memory and step time of each lossless strategy on examples/hf_llama.py's model, beside the anchors.

    python benchmarks/strategies.py --preset 1b --out strategies.json      # on an H100 (results: docs/strategies.md)
    python benchmarks/strategies.py --preset tiny --steps 2 --device cpu  # smoke test of the script itself

Each configuration runs in its own subprocess (fresh CUDA context and allocator, a timeout so one slow
configuration cannot eat the run; configurations that would start after --budget-s are skipped): the model
built from the same seed, the training loop of examples/hf_llama.py (bf16 autocast, AdamW, clip_grad_norm_
unless a row says otherwise), synthetic tokens (same for every configuration). `warmup` steps, then `steps`
timed steps (cuda-synchronized perf_counter per step): median, min, max and quartiles; peak =
torch.cuda.max_memory_allocated over the whole configuration (first step included, so the optimizer state is
in it). Anchors: transformers' own gradient checkpointing, torchao's CPUOffloadOptimizer (it does not see
clipping, so its row runs without clipping, beside ours without clipping). Activation offload: the transfer
time its copies would take at the measured pinned bandwidth, and the share of it hidden = 1 - (step -
baseline step) / transfer time. Optimizer offload rows also report where the step's CPU time went.
On the H100 machine each configuration takes 27-39 s of wall time (most of it process start and model
build), so a full run needs ~7 minutes: split it with --only over calls, or raise --budget-s.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

import memtune  # noqa: E402
from memtune.strategies.offload import simulate_host  # noqa: E402


def build(preset: str, device: torch.device):
    from hf_llama import PRESETS
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(layers=2, hidden=128, intermediate=344, heads=4, kv_heads=2, vocab=1000, seq_len=64, batch_size=4)
    if preset != "tiny":
        cfg.update(PRESETS[preset])
    config = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                         num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["kv_heads"], max_position_embeddings=cfg["seq_len"],
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model, cfg


def pinned_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> tuple[float, float]:
    if device.type != "cuda":
        return 0.0, 0.0
    d = torch.empty(nbytes, dtype=torch.uint8, device=device)
    h = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    out = []
    for dst, src in ((h, d), (d, h)):
        for _ in range(2):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        out.append(nbytes / statistics.median(ts) / 1e9)
    del d, h
    return out[0], out[1]  # D2H, H2D GB/s


def run_config(model, cfg, device, make_opt, plan=None, clip=True, hf_gc=False, steps=4, warmup=2,
               clip_on_host=None, chunk_mib=None):
    import memtune.strategies.offload.optimizer_state as offload

    if clip_on_host is not None:
        offload.CLIP_ON_HOST = clip_on_host
    if chunk_mib is not None:  # the optimizer offload's update/copy-back pipeline granularity
        offload.CHUNK_BYTES = int(chunk_mib * 2**20)
    gc.collect()
    torch.manual_seed(1234)  # same tokens for every configuration
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if hf_gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = make_opt(model)
    undo = memtune.apply_plan(model, opt, plan) if plan else None
    off = undo.ctx.activation_offloader if undo else None
    opt_offs = undo.ctx.optimizer_offloads if undo else []
    use_amp = device.type == "cuda"
    times, losses = [], []
    try:
        for i in range(warmup + steps):
            if i == warmup:
                if off is not None:
                    off.bytes_offloaded = 0
                for o in opt_offs:
                    o.stats = dict.fromkeys(o.stats, 0)
                    o.stats["wait_s"] = o.stats["update_s"] = 0.0
                gc.collect()
            ids = torch.randint(cfg["vocab"], (cfg["batch_size"], cfg["seq_len"]), device=device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            losses.append(loss.item())
        q = statistics.quantiles(times, n=4, method="inclusive") if len(times) >= 2 else [times[0]] * 3
        res = {"step_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "q1_s": q[0],
               "q3_s": q[2], "step_times": times, "losses": losses,
               "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
               "notes": [f"{s}: {n}" for s, n in (undo.notes if undo else [])]}
        if off is not None:
            res["offloaded_bytes_per_step"] = off.bytes_offloaded / steps
        if opt_offs:
            st = opt_offs[0].stats
            res["offload_stats_per_step"] = {k: v / max(1, st["steps"]) for k, v in st.items() if k != "steps"}
    except torch.OutOfMemoryError as e:
        res = {"error": f"OOM: {str(e).splitlines()[0]}"}
    finally:
        if undo:
            undo()
        if hf_gc:
            model.gradient_checkpointing_disable()
        del opt
    return res


def configs(n_rep: int) -> dict[str, dict]:
    first5 = f"0-{min(5, n_rep - 1) - 1}"  # the first 5 blocks (of 22 in the 1b preset)
    opt = {"offload": {"optimizer_state": True}}
    return {  # in priority order: what --budget-s cuts comes last
        "baseline": dict(),
        "offload_optimizer_state_noclip": dict(plan=opt, clip=False),
        "torchao_cpu_offload_noclip": dict(make_opt="torchao", clip=False),
        "offload_optimizer_state_noclip_c16": dict(plan=opt, clip=False, chunk_mib=16),
        "offload_optimizer_state_noclip_c256": dict(plan=opt, clip=False, chunk_mib=256),
        "offload_optimizer_state": dict(plan=opt),  # clipped gradients copied down again (the default)
        "offload_optimizer_state_hostclip": dict(plan=opt, clip_on_host=True),
        "hf_gradient_checkpointing": dict(hf_gc=True),
        "checkpoint_full_all": dict(plan={"checkpoint": {"blocks": "all", "mode": "full"}}),
        "offload_act_first5": dict(plan={"offload": {"activations": [first5]}}),
        "precision_bf16_params_master": dict(plan={"precision": {"params": "bf16", "master_weights": True}}),
        "bf16_params_offload_optimizer": dict(plan={"precision": {"params": "bf16"}, **opt}),
        "baseline_noclip": dict(clip=False),
        "checkpoint_selective_all": dict(plan={"checkpoint": {"blocks": "all", "mode": "selective"}}),
        "offload_act_every3": dict(plan={"offload": {"activations": list(range(0, n_rep - 1, 3))}}),
    }


def child(args) -> dict:
    """One configuration in this process."""
    device = torch.device(args.device)
    model, cfg = build(args.preset, device)
    c = dict(configs(cfg["layers"])[args.child])
    make = c.pop("make_opt", "adamw")
    if make == "torchao":
        from torchao.optim import CPUOffloadOptimizer

        def make_opt(m):
            return CPUOffloadOptimizer(m.parameters(), torch.optim.AdamW, lr=2e-5, weight_decay=0.0)
    else:
        def make_opt(m):
            return torch.optim.AdamW(m.parameters(), lr=2e-5, weight_decay=0.0)
    out = {}
    if args.bandwidth:
        out["d2h_gbps"], out["h2d_gbps"] = pinned_bandwidth(device)
    with simulate_host() if device.type != "cuda" else _null():
        out.update(run_config(model, cfg, device, make_opt, steps=args.steps, warmup=args.warmup, **c))
    out["cfg"] = cfg
    out["n_params"] = sum(p.numel() for p in model.parameters())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="1b", choices=["tiny", "1b", "7b"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", help="comma-separated configuration names")
    p.add_argument("--out", help="write all numbers as JSON here")
    p.add_argument("--timeout", type=float, default=75.0, help="seconds per configuration")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no configuration after this many seconds")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--bandwidth", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        try:
            r = child(args)
        except Exception as e:  # the parent reports it in the row
            r = {"error": f"{type(e).__name__}: {e}"}
        Path(args.result).write_text(json.dumps(r))
        return
    t_start = time.perf_counter()
    names = args.only.split(",") if args.only else list(configs(22))
    results, meta = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, cname in enumerate(names):  # a name repeated in --only is run again (interleaved A/B timing)
            name = cname if cname not in results else f"{cname}#{sum(n.split('#')[0] == cname for n in results) + 1}"
            left = args.budget_s - (time.perf_counter() - t_start)
            if left < 20:
                results[name] = {"error": "skipped: --budget-s spent"}
                print(f"{name:34s} skipped (budget)", flush=True)
                continue
            res_file = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--child", cname, "--result", str(res_file), "--preset", args.preset,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
            if k == 0:
                cmd.append("--bandwidth")
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, timeout=min(args.timeout, left), capture_output=True, text=True)
                r = json.loads(res_file.read_text()) if res_file.exists() else {
                    "error": f"exit {proc.returncode}: {(proc.stderr or '').strip().splitlines()[-1:]}"}
            except subprocess.TimeoutExpired:
                r = {"error": f"timeout after {min(args.timeout, left):.0f} s"}
            r["wall_s"] = time.perf_counter() - t0
            results[name] = r
            for key in ("d2h_gbps", "h2d_gbps", "cfg", "n_params"):
                if key in r:
                    meta.setdefault(key, r[key])
            pk = r.get("peak_bytes")
            print(f"{name:34s} " + (r["error"] if "error" in r else
                  f"step {r['step_s'] * 1e3:7.1f} ms (min {r['min_s'] * 1e3:6.1f}, q1 {r['q1_s'] * 1e3:6.1f}, "
                  f"q3 {r['q3_s'] * 1e3:6.1f}, max {r['max_s'] * 1e3:6.1f}; n={len(r['step_times'])})  "
                  f"peak {pk / 2**30 if pk else float('nan'):6.2f} GiB  loss {r['losses'][-1]:.4f}  "
                  f"[{r['wall_s']:.0f} s]"), flush=True)
            if "offload_stats_per_step" in r:
                st = r["offload_stats_per_step"]
                print(f"{'':34s} per step: CPU waited {st['wait_s'] * 1e3:.0f} ms for gradients, CPU update "
                      f"{st['update_s'] * 1e3:.0f} ms, {st['recopied']:.0f} re-copied, {st['host_scaled']:.0f} "
                      "scaled on the host", flush=True)
    base = results.get("baseline", {})
    d2h, h2d = meta.get("d2h_gbps", 0.0), meta.get("h2d_gbps", 0.0)
    for name, r in results.items():
        if "losses" in r and "losses" in base and name != "baseline":
            r["max_loss_diff_vs_baseline"] = max(abs(a - b) for a, b in zip(r["losses"], base["losses"], strict=False))
        if "offloaded_bytes_per_step" in r and "step_s" in base and d2h:
            b = r["offloaded_bytes_per_step"]
            transfer = b / (d2h * 1e9) + b / (h2d * 1e9)
            exposed = max(0.0, r["step_s"] - base["step_s"])
            r["transfer_s"] = transfer
            r["hidden_fraction"] = 1 - exposed / transfer if transfer else None
            print(f"{name}: {b / 2**30:.2f} GiB/step offloaded, transfer {transfer * 1e3:.0f} ms, exposed "
                  f"{exposed * 1e3:.0f} ms, hidden {r['hidden_fraction']:.0%}")
    print("max |loss - baseline loss| over the steps: " + ", ".join(
        f"{n} {r['max_loss_diff_vs_baseline']:.2e}" for n, r in results.items() if "max_loss_diff_vs_baseline" in r))
    meta.update({"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                 "torch": torch.__version__, "command": " ".join(["python"] + sys.argv),
                 "wall_s": time.perf_counter() - t_start})
    print(f"device {meta['device']}, torch {meta['torch']}, pinned D2H {d2h:.1f} GB/s, H2D {h2d:.1f} GB/s, "
          f"{meta.get('n_params', 0) / 1e9:.2f}B params, total {meta['wall_s']:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


if __name__ == "__main__":
    main()
