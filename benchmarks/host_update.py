"""This host's AdamW update rate, against its memory bandwidth: what bounds an optimizer-state-offload step.

    python benchmarks/host_update.py --elements 268435456 --out host.json

Measured, each at 1..N intra-op threads (torch.set_num_threads):
- copy: fp32 `dst.copy_(src)` over the buffer (read + write bytes per second);
- fused: torch's fused CPU AdamW (`torch._fused_adamw_`) on one fp32 tensor, fp32 gradient;
- sliced: what memtune's optimizer-state offload runs (memtune/strategies/offload/optimizer_state.py): a bf16
  gradient upcast slice by slice into a cached fp32 scratch, the fused kernel on the slice, the slice rounded
  into a bf16 copy for the device; again on a Python thread (where the offload's host worker runs it).
Each in pageable memory and (with CUDA) in pinned memory, where offload's host buffers live. Rates are
parameters per second; bytes are the minimum each update moves (fp32 master, m, v read and written;
the gradient read; the 16-bit copy written).
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import torch


def _time(fn, iters: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=64 << 20)
    ap.add_argument("--slice", type=int, default=4 << 20)
    ap.add_argument("--threads", type=int, nargs="*", default=None)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--slices", type=int, nargs="*", default=[],
                    help="also: the sliced update at all threads, on a worker thread, at each of these slice sizes")
    ap.add_argument("--compiled", action="store_true",
                    help="also: one torch.compile'd pass per slice (upcast, AdamW, rounding in one loop)")
    ap.add_argument("--out")
    args = ap.parse_args()
    n, k = args.elements, args.slice
    most = torch.get_num_threads()
    threads = args.threads or sorted({1, 2, 4, 8, most} & set(range(1, most + 1)))
    kinds = ["pageable", "pinned"] if torch.cuda.is_available() else ["pageable"]
    rows = []
    for kind in kinds:
        rows += _run(kind, n, k, threads, args.iters)
    if args.slices or args.compiled:
        rows += _variants(kinds[-1], n, args.slices, args.compiled, args.iters)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"elements": n, "slice": k, "rows": rows}, f, indent=1)


def _run(kind: str, n: int, k: int, threads: list[int], iters: int) -> list[dict]:
    pin = kind == "pinned"  # cudaHostAlloc'd, as offload's host buffers are
    p, m, v, g32 = (torch.empty(n, pin_memory=pin).uniform_() for _ in range(4))
    g16 = torch.empty(n, dtype=torch.bfloat16, pin_memory=pin).copy_(g32)
    out16 = torch.empty(n, dtype=torch.bfloat16, pin_memory=pin)
    scratch = torch.empty(k)
    step = torch.tensor(1.0)
    kw = dict(amsgrad=False, lr=1e-4, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, maximize=False,
              grad_scale=None, found_inf=None)

    def fused():
        torch._fused_adamw_([p], [g32], [m], [v], [], [step], **kw)

    def sliced():
        for a in range(0, n, k):
            b = min(n, a + k)
            s = scratch[:b - a]
            s.copy_(g16[a:b])
            torch._fused_adamw_([p[a:b]], [s], [m[a:b]], [v[a:b]], [], [step], **kw)
            out16[a:b].copy_(p[a:b])

    rows = []
    for t in threads:
        torch.set_num_threads(t)
        copy_s = _time(lambda: m.copy_(v), iters)
        fused_s = _time(fused, iters)
        sliced_s = _time(sliced, iters)
        box: dict = {}
        th = threading.Thread(target=lambda box=box: box.update(s=_time(sliced, iters)))  # as the offload's worker
        th.start()
        th.join()
        row = {"memory": kind, "threads": t, "copy_GBps": 8 * n / copy_s / 1e9, "fused_Mparams_s": n / fused_s / 1e6,
               "fused_GBps": 28 * n / fused_s / 1e9, "sliced_Mparams_s": n / sliced_s / 1e6,
               "sliced_GBps": 28 * n / sliced_s / 1e9, "sliced_thread_Mparams_s": n / box["s"] / 1e6}
        rows.append(row)
        print(json.dumps({k2: round(v2, 1) if isinstance(v2, float) else v2 for k2, v2 in row.items()}), flush=True)
    return rows


def _adamw_slice(p, g16, m, v, out16, lr: float, b1: float, b2: float, wd: float, eps: float, bc1: float,
                 bc2_sqrt: float) -> None:
    """AdamW on one slice as torch's formula writes it, the gradient upcast and the result rounded in the same
    loop once compiled."""
    g = g16.float()
    p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    p.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(eps), value=-lr / bc1)
    out16.copy_(p)


def _variants(kind: str, n: int, slices: list[int], compiled: bool, iters: int) -> list[dict]:
    pin = kind == "pinned"
    p, m, v = (torch.empty(n, pin_memory=pin).uniform_() for _ in range(3))
    g16 = torch.empty(n, dtype=torch.bfloat16, pin_memory=pin).uniform_()
    out16 = torch.empty(n, dtype=torch.bfloat16, pin_memory=pin)
    step = torch.tensor(1.0)
    kw = dict(amsgrad=False, lr=1e-4, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, maximize=False,
              grad_scale=None, found_inf=None)
    rows = []

    def on_thread(fn) -> float:
        box = {}
        th = threading.Thread(target=lambda: box.update(s=_time(fn, iters)))
        th.start()
        th.join()
        return box["s"]

    for k in slices:
        scratch = torch.empty(k)

        def sliced(k=k, scratch=scratch):
            for a in range(0, n, k):
                b = min(n, a + k)
                s = scratch[:b - a]
                s.copy_(g16[a:b])
                torch._fused_adamw_([p[a:b]], [s], [m[a:b]], [v[a:b]], [], [step], **kw)
                out16[a:b].copy_(p[a:b])

        row = {"memory": kind, "threads": torch.get_num_threads(), "variant": f"sliced {k}",
               "Mparams_s": n / on_thread(sliced) / 1e6}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if compiled:
        k = 4 << 20
        try:
            fn = torch.compile(_adamw_slice, dynamic=False)

            def one_pass():
                for a in range(0, n - n % k, k):
                    fn(p[a:a + k], g16[a:a + k], m[a:a + k], v[a:a + k], out16[a:a + k], 1e-4, 0.9, 0.999, 0.01,
                       1e-8, 0.1, 0.0316)

            t0 = time.perf_counter()
            one_pass()
            row = {"memory": kind, "threads": torch.get_num_threads(), "variant": f"compiled {k}",
                   "compile_s": time.perf_counter() - t0, "Mparams_s": (n - n % k) / on_thread(one_pass) / 1e6}
        except Exception as e:  # no C++ compiler on the host, say
            row = {"variant": "compiled", "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
