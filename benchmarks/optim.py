"""Optimizer step time and state bytes per parameter on one GPU: ours vs torch, bitsandbytes, torchao.

    python benchmarks/optim.py                         # 16 x (4096 x 4096) fp32 params (268M), the issue's case
    python benchmarks/optim.py --sweep --out results/  # also the kernel config sweep; JSON + markdown table

Each optimizer gets fresh params and fixed random grads; state bytes = torch.cuda.memory_allocated() after the
first step minus before it (lazy state); time = median of per-step CUDA-event times after warm-up. Peers that
are not installed are skipped with a note. Minimum traffic for AdamW in fp32 is 28 B/param (read p, g, m, v;
write p, m, v); for 8-bit moments 16 B/param (+ absmax); for 4-bit 14 B/param.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median_ms(fn, steps: int, warmup: int, per: int = 5, synced: bool = False) -> float:
    """Median over `steps` samples of the time of `per` back-to-back steps / per (as in a training loop, where
    the host's work for one step overlaps the GPU's previous work); synced=True times one step from an idle GPU,
    host overhead included."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    n = 1 if synced else per
    times = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / n)
    return statistics.median(times)


def copy_bandwidth_gbps() -> float:
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()  # 1 GiB
    y = torch.empty_like(x)
    ms = _median_ms(lambda: y.copy_(x), 20, 5)
    return 2 * x.numel() / ms / 1e6


def make_params(n_tensors: int, shape: tuple[int, ...], dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, device="cuda", generator=g, dtype=torch.float32).to(dtype) * 0.02)
              for _ in range(n_tensors)]
    for p in params:
        p.grad = torch.randn(shape, device="cuda", generator=g, dtype=torch.float32).to(dtype) * 1e-3
    return params


def measure(name: str, build, n_tensors: int, shape, steps: int, warmup: int, dtype=torch.float32) -> dict:
    torch.cuda.empty_cache()
    params = make_params(n_tensors, shape, dtype)
    n = sum(p.numel() for p in params)
    opt = build(params)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    opt.step()  # first step allocates state (and compiles where a peer uses torch.compile)
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    state = torch.cuda.memory_allocated() - before
    ms = _median_ms(opt.step, steps, warmup)
    synced = _median_ms(opt.step, steps, 0, synced=True)
    finite = all(torch.isfinite(p).all().item() for p in params)
    del opt, params
    torch.cuda.empty_cache()
    return {"name": name, "ms": ms, "ms_synced": synced, "state_bytes_per_param": state / n, "n_params": n, "first_step_s": first_s,
            "finite": finite, "dtype": str(dtype).replace("torch.", "")}


def builders(lr=1e-3):
    from memtune.optim import swap as O

    out = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=lr, fused=True),
        "memtune adamw8bit": lambda ps: O.make_optimizer("adamw8bit", ps, lr=lr),
        "memtune adamw4bit": lambda ps: O.make_optimizer("adamw4bit", ps, lr=lr),
        "torch Adafactor": lambda ps: torch.optim.Adafactor(ps, lr=lr),
        "memtune galore r128 (no refresh)": lambda ps: O.make_optimizer("galore", ps, lr=lr, rank=128,
                                                                         update_proj_gap=10**9),
    }
    try:
        import bitsandbytes as bnb

        out["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=lr)
    except Exception as e:  # noqa: BLE001
        print(f"[skip] bitsandbytes: {type(e).__name__}: {e}")
    try:
        from torchao.optim import AdamW4bit, AdamW8bit

        out["torchao AdamW8bit"] = lambda ps: AdamW8bit(ps, lr=lr)
        out["torchao AdamW4bit"] = lambda ps: AdamW4bit(ps, lr=lr)
    except Exception as e:  # noqa: BLE001
        print(f"[skip] torchao: {type(e).__name__}: {e}")
    return out


def sweep(n_tensors, shape, steps, warmup) -> list[dict]:
    from memtune.kernels import quantized_adamw as Q

    rows = []
    for bits in (8, 4):
        variants = [{"block": b, "num_warps": w} for b in (2048, 4096, 8192) for w in (4, 8)]
        variants.append({"block": 4096, "num_warps": 8, "aligned": False})  # no alignment hints on the addresses
        for cfg in variants:
            if True:
                params = make_params(n_tensors, shape)
                states = [Q.new_state(p, bits) for p in params]
                grads = [p.grad for p in params]
                step = [0]

                def fn(params=params, grads=grads, states=states, bits=bits, cfg=cfg, step=step):
                    step[0] += 1
                    Q.fused_step(params, grads, states, bits=bits, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                 weight_decay=0.01, step=step[0], config=cfg)

                ms = _median_ms(fn, steps, warmup)
                rows.append({"bits": bits, "aligned": True, **cfg, "ms": ms})
                print(f"sweep bits={bits} {cfg}: {ms:.3f} ms", flush=True)
                del params, states, grads
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=16)
    ap.add_argument("--shape", type=int, nargs="+", default=[4096, 4096])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--sweep", action="store_true", help="also time kernel block sizes / warps")
    ap.add_argument("--only", nargs="*", help="names (substrings) to run")
    ap.add_argument("--out", type=Path, default=None, help="folder for results.json and results.md")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/optim.py needs a CUDA GPU")
    shape = tuple(a.shape)
    bw = copy_bandwidth_gbps()
    head = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": str(datetime.date.today()),
            "command": "python " + " ".join(sys.argv), "copy_gbps": bw, "tensors": a.tensors, "shape": shape}
    try:
        import triton

        head["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps(head), flush=True)
    sweep_rows = sweep(a.tensors, shape, a.steps, a.warmup) if a.sweep else []
    rows = []
    for name, build in builders().items():
        if a.only and not any(s in name for s in a.only):
            continue
        try:
            r = measure(name, build, a.tensors, shape, a.steps, a.warmup)
        except Exception as e:  # noqa: BLE001
            print(f"[fail] {name}: {type(e).__name__}: {e}", flush=True)
            continue
        rows.append(r)
        print(f"{name:36s} {r['ms']:8.3f} ms ({r['ms_synced']:.3f} synced)  {r['state_bytes_per_param']:.3f} B/param  "
              f"first {r['first_step_s']:.1f}s",
              flush=True)
    for name, kw in [("memtune adamw8bit bf16 params", {}), ("memtune adamw8bit bf16 params + SR",
                                                            {"stochastic_rounding": True})]:
        if a.only and not any(s in name for s in a.only):
            continue
        from memtune.optim import swap as O

        r = measure(name, lambda ps, kw=kw: O.make_optimizer("adamw8bit", ps, lr=1e-3, **kw), a.tensors, shape,
                    a.steps, a.warmup, dtype=torch.bfloat16)
        rows.append(r)
        print(f"{name:36s} {r['ms']:8.3f} ms  {r['state_bytes_per_param']:.3f} B/param", flush=True)
    md = [f"GPU {head['gpu']}, torch {head['torch']}, triton {head.get('triton')}, {head['date']}; "
          f"{a.tensors} x {shape} params; device copy {bw:.0f} GB/s; `{head['command']}`", "",
          "| optimizer | param dtype | ms/step | ms/step from idle GPU | state B/param | ns/param |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['name']} | {r['dtype']} | {r['ms']:.3f} | {r['ms_synced']:.3f} | {r['state_bytes_per_param']:.3f} | "
                  f"{r['ms'] * 1e6 / r['n_params']:.5f} |")
    if sweep_rows:
        md += ["", "| kernel | block | warps | aligned hints | ms/step |", "|---|---|---|---|---|"]
        md += [f"| {s['bits']}-bit | {s['block']} | {s['num_warps']} | {s['aligned']} | {s['ms']:.3f} |"
               for s in sweep_rows]
    text = "\n".join(md)
    print(text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "results.json").write_text(json.dumps({**head, "rows": rows, "sweep": sweep_rows}, indent=2))
        (a.out / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
