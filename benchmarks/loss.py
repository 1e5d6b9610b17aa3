"""Fused linear cross-entropy vs torch eager, torch.compile and Liger-Kernel: forward+backward time and
extra peak memory, on one CUDA GPU.

    python benchmarks/loss.py                                   # 8192 tokens, hidden 2048, bf16
    python benchmarks/loss.py --vocab 32000 128256 --chunks 256 512 1024 --json out.json
    python benchmarks/loss.py --vocab 128256 --chunks 2048 --low-chunks 256 512   # low_memory variants too

"extra peak" = max_memory_allocated during loss forward+backward minus what was allocated before (x, W,
labels). It includes the two gradients every method returns (dx: N*H, dW: V*H in the input dtype);
"beyond grads" subtracts them. Time: CUDA events around forward+backward; "ms": median of --rep runs, the
methods taking turns, each after 50 ms idle (full clock); "sustained": median of the last 10 of 20
back-to-back runs of one method (at the GPU's power cap, as inside a training step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from memtune.kernels.linear_cross_entropy import linear_cross_entropy  # noqa: E402


def eager(x, w, y):
    return F.cross_entropy(F.linear(x, w).float(), y)


def methods(chunks, block_vs=(), low_chunks=()):
    out = {"eager": eager, "torch.compile": torch.compile(eager, dynamic=False)}
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        out["liger"] = lambda x, w, y: liger(w, x, y)
    except ImportError as e:
        print(f"liger-kernel not installed ({e}); skipping it")
    for c in chunks:
        out[f"memtune c={c}"] = lambda x, w, y, c=c: linear_cross_entropy(x, w, y, chunk_tokens=c)
    for bv in block_vs:
        out[f"memtune bv={bv}"] = lambda x, w, y, bv=bv: linear_cross_entropy(x, w, y, block_v=bv)
    out["memtune auto"] = lambda x, w, y: linear_cross_entropy(x, w, y)
    for c in low_chunks:
        out[f"memtune low c={c}"] = lambda x, w, y, c=c: linear_cross_entropy(x, w, y, chunk_tokens=c, low_memory=True)
    out["memtune low"] = lambda x, w, y: linear_cross_entropy(x, w, y, low_memory=True)
    return out


def _once(fn, x, w, y):
    x.grad = w.grad = None
    loss = fn(x, w, y)
    loss.backward()
    return loss


def prepare(fn, x, w, y, warmup):
    """Warm up, then one run for the extra peak memory and the gradients."""
    for _ in range(warmup):
        _once(fn, x, w, y)
    x.grad = w.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = _once(fn, x, w, y)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = (x.grad.detach().clone(), w.grad.detach().clone(), loss.detach().float().item())
    x.grad = w.grad = None
    return extra, grads


def _timed(fn, x, w, y):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    _once(fn, x, w, y)
    b.record()
    return a, b


def time_settled(fns, x, w, y, rounds, gap=0.05):
    """Median per method, the methods taking turns (rotated each round), each run after `gap` s idle: the
    H100's clock drops under the 700 W cap within a few back-to-back runs (1980 -> ~1500 MHz measured),
    so without the pause a method's time depends on what ran before it."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            torch.cuda.synchronize()
            time.sleep(gap)
            a, b = _timed(fns[n], x, w, y)
            b.synchronize()
            times[n].append(a.elapsed_time(b))
    x.grad = w.grad = None
    return {n: statistics.median(t) for n, t in times.items()}


def time_sustained(fn, x, w, y, runs=20, keep=10):
    """Median of the last `keep` of `runs` back-to-back runs after a 0.5 s pause: the method at the power cap,
    as inside a training step."""
    torch.cuda.synchronize()
    time.sleep(0.5)
    ev = [_timed(fn, x, w, y) for _ in range(runs)]
    torch.cuda.synchronize()
    x.grad = w.grad = None
    return statistics.median(a.elapsed_time(b) for a, b in ev[-keep:])


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--chunks", type=int, nargs="*", default=[256, 512, 1024])
    p.add_argument("--block-v", type=int, nargs="*", default=[], help="row-kernel block sizes to try (auto chunk)")
    p.add_argument("--low-chunks", type=int, nargs="*", default=[], help="chunk sizes to try with low_memory")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rep", type=int, default=10)
    p.add_argument("--json")
    args = p.parse_args()
    dt = getattr(torch, args.dtype)
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} tokens={args.tokens} hidden={args.hidden} {dt}")
    rows = []
    for v in args.vocab:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(args.tokens, args.hidden, device=dev, dtype=dt, generator=g).requires_grad_()
        w = (torch.randn(v, args.hidden, device=dev, dtype=dt, generator=g) * 0.02).requires_grad_()
        y = torch.randint(v, (args.tokens,), device=dev, generator=g)
        grad_bytes = (x.numel() + w.numel()) * x.element_size()
        ref = None
        ready = {}
        for name, fn in methods(args.chunks, args.block_v, args.low_chunks).items():
            try:
                extra, grads = prepare(fn, x, w, y, args.warmup)
            except Exception as e:  # one failing method should not lose the others' numbers
                print(f"{name} V={v}: FAILED {type(e).__name__}: {e}")
                torch.cuda.empty_cache()
                continue
            if ref is None:
                ref = grads
            ready[name] = fn
            rows.append(dict(method=name, vocab=v, extra_mib=extra / 2**20,
                             beyond_grads_mib=(extra - grad_bytes) / 2**20, loss=grads[2],
                             rel_dx=rel(grads[0], ref[0]), rel_dw=rel(grads[1], ref[1])))
            del grads
            torch.cuda.empty_cache()
        settled = time_settled(ready, x, w, y, args.rep)
        for r in rows:
            if r["vocab"] == v:
                r["ms"] = settled[r["method"]]
                r["ms_sustained"] = time_sustained(ready[r["method"]], x, w, y)
                print(f"V={v:6d} {r['method']:18s} {r['ms']:7.2f} ms (sustained {r['ms_sustained']:6.2f})  extra "
                      f"{r['extra_mib']:6.0f} MiB  beyond grads {r['beyond_grads_mib']:6.0f} MiB  loss {r['loss']:.5f}  "
                      f"rel dx {r['rel_dx']:.1e} dW {r['rel_dw']:.1e}", flush=True)
        del x, w, y, ref
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
