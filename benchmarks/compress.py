"""Activation compression kernels on one CUDA GPU: pack/unpack bandwidth against a plain device copy, and a
GPT (examples/gpt.py) forward+backward with every block's saved activations compressed.

    python benchmarks/compress.py                     # 256 MiB tensors; GPT 12 x 1024, batch 8 x 1024
    python benchmarks/compress.py --json out.json

Bandwidth counts bytes read plus bytes written (codes and scales included), as the copy does.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from memtune.kernels import activation_quant as aq  # noqa: E402
from memtune.strategies.compress import make_codec  # noqa: E402
from memtune.strategies.saved_tensors import SavedTensorPipeline  # noqa: E402


def bench(fn, warmup=5, rep=30):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def kernels(mib, rows):
    n = mib * 2**20 // 2
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    copy_ms = bench(lambda: y.copy_(x))
    copy_gbps = 2 * x.nbytes / copy_ms / 1e6
    print(f"copy bf16 {mib} MiB: {copy_ms:.3f} ms, {copy_gbps:.0f} GB/s (read + write)")
    rows.append(dict(op="copy", dtype="bf16", ms=copy_ms, gbps=copy_gbps, share=1.0))
    for src_dt in (torch.bfloat16, torch.float32):
        xs = x.to(src_dt)
        for qd in ("int8", "fp8"):
            if qd == "fp8" and not aq.fp8_supported():
                continue
            codes, scales = aq.quantize(xs, qd)
            qbytes = codes.nbytes + scales.nbytes
            pk = bench(lambda xs=xs, qd=qd: aq.quantize(xs, qd))
            up = bench(lambda c=codes, s=scales, d=src_dt: aq.dequantize(c, s, d))
            back = aq.dequantize(codes, scales, src_dt)
            ok = bool(((back.float() - xs.float()).abs() <= aq.error_bound(xs, qd) + 1e-2 * xs.float().abs()).all())
            for op, ms in (("pack", pk), ("unpack", up)):
                gbps = (xs.nbytes + qbytes) / ms / 1e6
                rows.append(dict(op=op, dtype=f"{str(src_dt)[6:]}->{qd}", ms=ms, gbps=gbps, share=gbps / copy_gbps))
                print(f"{op:6s} {str(src_dt)[6:]:8s} {qd}: {ms:.3f} ms {gbps:5.0f} GB/s = {gbps / copy_gbps:.0%} of copy"
                      f"  (round trip within bound: {ok})")
            del codes, scales, back
        del xs
    return copy_gbps


def gpt(layers, width, batch, seq, rows):
    spec = importlib.util.spec_from_file_location("gpt_example", ROOT / "examples" / "gpt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    model = mod.GPT(layers, width, width // 64, seq, 50304).cuda()
    idx = torch.randint(50304, (batch, seq + 1), device="cuda")
    x, y = idx[:, :-1], idx[:, 1:]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).view(-1, 50304).float(), y.reshape(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    params = {p.data_ptr() for p in model.parameters()}
    for mode in ("none", "int8", "fp8"):
        if mode == "fp8" and not aq.fp8_supported():
            continue
        undos = []
        if mode != "none":
            pack, unpack = make_codec(mode, 2**20, params)
            pipe = SavedTensorPipeline(lambda name: model.blocks[int(name)], [])
            undos = [pipe.add_codec([str(i) for i in range(len(model.blocks))], (pack, unpack))]
        loss = step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = step().item()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = bench(step, warmup=2, rep=10)
        rows.append(dict(op="gpt fwd+bwd", dtype=mode, ms=ms, peak_mib=peak, loss=loss))
        print(f"GPT {layers}x{width} b{batch}x{seq} compress={mode:5s}: {ms:7.2f} ms  peak above start {peak:7.0f} MiB  loss {loss:.4f}")
        for u in undos:
            u()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--json")
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    rows: list[dict] = []
    kernels(args.mib, rows)
    gpt(args.layers, args.width, args.batch, args.seq, rows)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                                                   args=vars(args), rows=rows), indent=1))


if __name__ == "__main__":
    main()
