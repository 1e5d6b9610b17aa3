"""Peak memory and step time of each lossless strategy on examples/hf_llama.py's model, beside the anchors.

    python benchmarks/strategies.py --preset 1b --out strategies.json      # on an H100 (results: docs/strategies.md)
    python benchmarks/strategies.py --preset tiny --steps 2 --device cpu  # smoke test of the script itself

One process, one model (built once on the GPU, weights reset before each configuration), the training loop
of examples/hf_llama.py (bf16 autocast, AdamW, clip_grad_norm_ unless a row says otherwise), synthetic
tokens. Per configuration: `warmup` steps, then `steps` timed steps (cuda-synchronized perf_counter per step,
median); peak = torch.cuda.max_memory_allocated over the whole configuration (first step included, so the
optimizer state is in it). Anchors: transformers' own gradient checkpointing, torchao's CPUOffloadOptimizer
(it drops nothing here: offload_gradients=False; it does not see clipping, so its rows run without clipping,
beside ours without clipping). Activation offload: the transfer time its copies would take at the measured
pinned bandwidth, and the share of it hidden = 1 - (step - baseline step) / transfer time.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
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


def run_config(model, cfg, device, make_opt, plan=None, clip=True, hf_gc=False, steps=4, warmup=2):
    gc.collect()
    torch.manual_seed(1234)  # same tokens for every configuration
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if hf_gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = make_opt(model)
    undo = memtune.apply_plan(model, opt, plan) if plan else None
    off = undo.ctx.shared.get("activation_offloader") if undo else None
    use_amp = device.type == "cuda"
    times, losses = [], []
    try:
        for i in range(warmup + steps):
            if off is not None and i == warmup:
                off.bytes_offloaded = 0
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
        res = {"step_s": statistics.median(times), "step_times": times, "losses": losses,
               "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
               "notes": [f"{s}: {n}" for s, n in (undo.notes if undo else [])]}
        if off is not None:
            res["offloaded_bytes_per_step"] = off.bytes_offloaded / steps
    except torch.OutOfMemoryError as e:
        res = {"error": f"OOM: {str(e).splitlines()[0]}"}
    finally:
        if undo:
            undo()
        if hf_gc:
            model.gradient_checkpointing_disable()
        del opt
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="1b", choices=["tiny", "1b", "7b"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", help="comma-separated configuration names")
    p.add_argument("--out", help="write all numbers as JSON here")
    args = p.parse_args()
    device = torch.device(args.device)
    model, cfg = build(args.preset, device)
    init = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    n_rep = cfg["layers"]
    adamw = lambda m: torch.optim.AdamW(m.parameters(), lr=2e-5, weight_decay=0.0)

    def torchao_opt(m):
        from torchao.optim import CPUOffloadOptimizer

        return CPUOffloadOptimizer(m.parameters(), torch.optim.AdamW, lr=2e-5, weight_decay=0.0)

    configs = {
        "baseline": dict(),
        "hf_gradient_checkpointing": dict(hf_gc=True),
        "checkpoint_full_all": dict(plan={"checkpoint": {"blocks": "all", "mode": "full"}}),
        "checkpoint_selective_all": dict(plan={"checkpoint": {"blocks": "all", "mode": "selective"}}),
        "offload_act_every3": dict(plan={"offload": {"activations": list(range(0, n_rep - 1, 3))}}),
        "offload_act_every2": dict(plan={"offload": {"activations": list(range(0, n_rep - 1, 2))}}),
        "offload_act_first_quarter": dict(plan={"offload": {"activations": [f"0-{max(0, n_rep // 4 - 1)}"]}}),
        "offload_act_all": dict(plan={"offload": {"activations": "all"}}),
        "precision_bf16_params_master": dict(plan={"precision": {"params": "bf16", "master_weights": True}}),
        "offload_optimizer_state": dict(plan={"offload": {"optimizer_state": True}}),
        "baseline_noclip": dict(clip=False),
        "offload_optimizer_state_noclip": dict(plan={"offload": {"optimizer_state": True}}, clip=False),
        "torchao_cpu_offload_noclip": dict(make_opt=torchao_opt, clip=False),
        "bf16_params_offload_optimizer": dict(plan={"precision": {"params": "bf16"},
                                                   "offload": {"optimizer_state": True}}),
    }
    names = args.only.split(",") if args.only else list(configs)
    d2h, h2d = pinned_bandwidth(device)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"model {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, cfg {cfg}, "
          f"pinned D2H {d2h:.1f} GB/s, H2D {h2d:.1f} GB/s", flush=True)
    results = {}
    for name in names:
        c = dict(configs[name])
        model.load_state_dict(init)
        slow = "optimizer" in name or "torchao" in name
        ctx = simulate_host() if device.type != "cuda" else _null()
        with ctx:
            try:
                r = run_config(model, cfg, device, c.pop("make_opt", adamw), steps=max(2, args.steps - (1 if slow else 0)),
                               warmup=args.warmup, **c)
            except Exception as e:  # one broken row must not lose the others
                r = {"error": f"{type(e).__name__}: {e}"}
        results[name] = r
        pk = r.get("peak_bytes")
        print(f"{name:34s} " + (r["error"] if "error" in r else
              f"step {r['step_s'] * 1e3:8.1f} ms  peak {pk / 2**30 if pk else float('nan'):6.2f} GiB  "
              f"loss {r['losses'][-1]:.4f}"), flush=True)
    base = results.get("baseline", {})
    for name, r in results.items():
        if "offloaded_bytes_per_step" in r and "step_s" in base and d2h:
            b = r["offloaded_bytes_per_step"]
            transfer = b / (d2h * 1e9) + b / (h2d * 1e9)
            exposed = max(0.0, r["step_s"] - base["step_s"])
            r["transfer_s"] = transfer
            r["hidden_fraction"] = 1 - exposed / transfer if transfer else None
            print(f"{name}: {b / 2**30:.2f} GiB/step offloaded, transfer {transfer * 1e3:.0f} ms, exposed "
                  f"{exposed * 1e3:.0f} ms, hidden {r['hidden_fraction']:.0%}")
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cfg": cfg, "d2h_gbps": d2h, "h2d_gbps": h2d,
            "command": " ".join(["python"] + sys.argv)}
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


if __name__ == "__main__":
    main()
