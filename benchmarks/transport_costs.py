"""Host microseconds per call of what offload does for each tensor it moves: CUDA events, stream switches,
an async copy's launch, a pinned buffer from the caching host allocator, and offload's own pack and unpack.

    python benchmarks/transport_costs.py [--mib 4] [--n 300]

A GPU diagnostic for the host time activation and optimizer-state offload add to a step (a host-bound
script pays it in full); it prints a table, it asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=float, default=4.0, help="size of each tensor moved")
    ap.add_argument("--n", type=int, default=300, help="tensors per measurement")
    args = ap.parse_args()

    import torch

    from memtune.strategies.offload.activations import ActivationOffloader
    from memtune.strategies.offload.transport import CudaTransport

    dev = torch.device("cuda")
    n = args.n
    numel = int(args.mib * 2**20 / 2)
    srcs = [torch.randn(numel, device=dev, dtype=torch.bfloat16) for _ in range(n)]
    hosts = [torch.empty(numel, dtype=torch.bfloat16, pin_memory=True) for _ in range(n)]
    t = CudaTransport(dev)
    side = t.d2h_stream
    rows = []

    def bench(name, fn, reps=2):
        best = float("inf")
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)  # host time to issue; the copies run on
            torch.cuda.synchronize()
        rows.append((name, best / n * 1e6))

    bench("torch.cuda.Event() + record", lambda: [torch.cuda.Event().record() for _ in range(n)])
    bench("side.wait_stream(current)", lambda: [side.wait_stream(torch.cuda.current_stream()) for _ in range(n)])

    def ctx():
        for _ in range(n):
            with torch.cuda.stream(side):
                pass
    bench("with torch.cuda.stream(side)", ctx)
    bench("copy_ D2H non_blocking (launch)", lambda: [h.copy_(s, non_blocking=True) for h, s in zip(hosts, srcs, strict=True)])
    bench("record_stream", lambda: [s.record_stream(side) for s in srcs])

    def pinned():
        for s in srcs:
            torch.empty_like(s, device="cpu", pin_memory=True)  # freed at once: the cache serves the next
    pinned()
    bench("empty_like pinned (cached)", pinned)
    bench("CudaTransport.d2h", lambda: [t.d2h(h, s) for h, s in zip(hosts, srcs, strict=True)])
    bench("CudaTransport.d2h_many (all in one)", lambda: t.d2h_many(list(zip(hosts, srcs, strict=True))))
    bench("CudaTransport.h2d_new", lambda: [t.h2d_new(h, dev) for h in hosts])

    off = ActivationOffloader(t, dev, set())

    def pack_unpack():
        g = off.begin("b")
        recs = [off.pack(g, s, s) for s in srcs]
        for r in recs:
            off.unpack(r)
    pack_unpack()
    bench("ActivationOffloader pack + unpack", pack_unpack)
    for name, us in rows:
        print(f"{name:40s} {us:8.1f} us per tensor")


if __name__ == "__main__":
    main()
