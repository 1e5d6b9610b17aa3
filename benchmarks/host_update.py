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

from memtune.kernels import host_adamw


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
    ap.add_argument("--one-pass", action="store_true",
                    help="also: memtune's one-pass kernel (kernels/host_adamw.py: upcast, AdamW, rounding in one loop"
                         " of C), on the main thread and on a worker thread")
    ap.add_argument("--beside-copies", action="store_true",
                    help="also (CUDA): the fused update chunk by chunk as optimizer-state offload runs it, alone, "
                         "beside each chunk's weights copied up, and beside every gradient copied down too (what a "
                         "script that clips does: its clipped gradients go down again at step time)")
    ap.add_argument("--contention", action="store_true",
                    help="also: the one-pass kernel on a worker thread (as the offload runs it), static against "
                         "dynamic OpenMP schedule, at N, N-1, N-2 threads, while the main thread idles, spins in "
                         "Python, spins on a CUDA sync, copies weights up, or runs torch CPU ops; and at several "
                         "sizes (what the profile's probe should use)")
    ap.add_argument("--out")
    args = ap.parse_args()
    n, k = args.elements, args.slice
    most = torch.get_num_threads()
    threads = args.threads or sorted({1, 2, 4, 8, most} & set(range(1, most + 1)))
    kinds = ["pageable", "pinned"] if torch.cuda.is_available() else ["pageable"]
    rows = []
    for kind in kinds:
        rows += _run(kind, n, k, threads, args.iters)
    if args.slices or args.one_pass:
        rows += _variants(kinds[-1], n, args.slices, args.one_pass, args.iters)
    if args.contention:
        rows += _contention(n, args.iters)
    if args.beside_copies and torch.cuda.is_available():
        rows += _beside_copies(n, args.iters)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"elements": n, "slice": k, "rows": rows}, f, indent=1)


HP = (1e-4, 0.9, 0.999, 0.01, 1e-8)  # lr, beta1, beta2, weight decay, eps


def _on_thread(fn, iters: int) -> float:
    """Seconds per call of fn on a Python thread, as offload's host worker runs the update."""
    box: dict = {}
    th = threading.Thread(target=lambda: box.update(s=_time(fn, iters)))
    th.start()
    th.join()
    return box["s"]


def _tensors(kind: str, n: int):
    pin = kind == "pinned"  # cudaHostAlloc'd, as offload's host buffers are
    p, m, v, g32 = (torch.empty(n, pin_memory=pin).uniform_() for _ in range(4))
    g16 = torch.empty(n, dtype=torch.bfloat16, pin_memory=pin).copy_(g32)
    out16 = torch.empty(n, dtype=torch.bfloat16, pin_memory=pin)
    return p, m, v, g32, g16, out16


def _sliced(t, n: int, k: int, step: torch.Tensor):
    """The runtime's three-pass update (kernels/host_adamw.py's reference) over k-element slices."""
    p, m, v, _, g16, out16 = t
    scratch = torch.empty(k)

    def run():
        for a in range(0, n, k):
            b = min(n, a + k)
            host_adamw.reference(p[a:b], g16[a:b], m[a:b], v[a:b], out16[a:b], *HP, step, scratch, [])

    return run


def _run(kind: str, n: int, k: int, threads: list[int], iters: int) -> list[dict]:
    t = _tensors(kind, n)
    p, m, v, g32 = t[:4]
    step = torch.tensor(1.0)
    lr, b1, b2, wd, eps = HP

    def fused():
        torch._fused_adamw_([p], [g32], [m], [v], [], [step], amsgrad=False, lr=lr, beta1=b1, beta2=b2,
                            weight_decay=wd, eps=eps, maximize=False, grad_scale=None, found_inf=None)

    sliced = _sliced(t, n, k, step)
    rows = []
    for nt in threads:
        torch.set_num_threads(nt)
        copy_s = _time(lambda: m.copy_(v), iters)
        fused_s = _time(fused, iters)
        sliced_s = _time(sliced, iters)
        row = {"memory": kind, "threads": nt, "copy_GBps": 8 * n / copy_s / 1e9, "fused_Mparams_s": n / fused_s / 1e6,
               "fused_GBps": 28 * n / fused_s / 1e9, "sliced_Mparams_s": n / sliced_s / 1e6,
               "sliced_GBps": 28 * n / sliced_s / 1e9,
               "sliced_thread_Mparams_s": n / _on_thread(sliced, iters) / 1e6}
        rows.append(row)
        print(json.dumps({k2: round(v2, 1) if isinstance(v2, float) else v2 for k2, v2 in row.items()}), flush=True)
    return rows


def _variants(kind: str, n: int, slices: list[int], compiled: bool, iters: int) -> list[dict]:
    t = _tensors(kind, n)
    step = torch.tensor(1.0)
    rows = []
    for k in slices:
        row = {"memory": kind, "threads": torch.get_num_threads(), "variant": f"sliced {k}",
               "Mparams_s": n / _on_thread(_sliced(t, n, k, step), iters) / 1e6}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if compiled:  # the runtime's one-pass kernel, built on this (main) thread
        p, m, v, _, g16, out16 = t
        t0 = time.perf_counter()
        fn = host_adamw.kernel()
        if fn is None:
            row = {"variant": "one-pass", "error": host_adamw.unavailable()}
            rows.append(row)
            print(json.dumps(row), flush=True)
            return rows
        build_s = time.perf_counter() - t0

        def one_pass():
            fn(p, g16, m, v, out16, *HP, 2.0)

        for where, rate in (("main", n / _time(one_pass, iters)), ("worker", n / _on_thread(one_pass, iters))):
            row = {"memory": kind, "threads": fn.threads, "variant": f"one-pass ({where} thread)",
                   "build_s": build_s, "Mparams_s": rate / 1e6}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _contention(n: int, iters: int) -> list[dict]:
    """The one-pass kernel where the training thread competes for the cores (see --contention)."""
    cuda = torch.cuda.is_available()
    kind = "pinned" if cuda else "pageable"
    p, m, v, _, g16, out16 = _tensors(kind, n)
    most = torch.get_num_threads()
    libs = {"dynamic": host_adamw._build(), "static": host_adamw._build("static")}
    busy = {}
    if cuda:
        host = torch.empty(256 << 20, pin_memory=True)
        dev = torch.empty(256 << 20, device="cuda")
        busy["cuda sync spin"] = lambda: (torch.cuda._sleep(20_000_000), torch.cuda.synchronize())
        busy["weights up (1 GiB copies)"] = lambda: (dev.copy_(host, non_blocking=True), torch.cuda.synchronize())
    small = torch.empty(4 << 20)
    busy["torch CPU ops"] = lambda: small.mul_(1.0)

    def python_spin():
        sum(i * i for i in range(20000))  # pure Python: holds the GIL

    busy["python spin"] = python_spin
    rows = []

    def measure(fn, size: int, beside) -> float:
        box: dict = {}
        done = threading.Event()
        a, b, c, d, e = p[:size], g16[:size], m[:size], v[:size], out16[:size]

        def work():
            try:
                box["s"] = _time(lambda: fn(a, b, c, d, e, *HP, 2.0), iters)
            finally:
                done.set()

        th = threading.Thread(target=work)
        th.start()
        while not done.is_set():
            if beside is None:
                done.wait()
            else:
                beside()
        th.join()
        return box["s"]

    for sched, lib in libs.items():
        for nt in sorted({most, max(1, most - 1), max(1, most - 2)}, reverse=True):
            fn = host_adamw.Kernel(lib, nt)
            for name, beside in [("idle", None), *busy.items()]:
                row = {"memory": kind, "threads": nt, "variant": f"one-pass {sched}, main thread: {name}",
                       "elements": n, "Mparams_s": n / measure(fn, n, beside) / 1e6}
                rows.append(row)
                print(json.dumps(row), flush=True)
    fn = host_adamw.Kernel(libs["dynamic"], most)
    for size in (16 << 20, 64 << 20, n):
        if size > n:
            continue
        row = {"memory": kind, "threads": most, "variant": "one-pass dynamic, main thread: idle", "elements": size,
               "Mparams_s": size / measure(fn, size, None) / 1e6}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _beside_copies(n: int, iters: int, chunk: int = 16 << 20) -> list[dict]:
    """The fused update in `chunk`-element pieces on pinned fp32 tensors (the offload's 64 MiB chunks), with the
    PCIe copies the run makes beside it on side streams: none; each chunk's weights up once it is updated; and
    also every gradient down, queued at the start."""
    p, m, v, g32 = (torch.empty(n, pin_memory=True).uniform_() for _ in range(4))
    dev_p, dev_g = torch.empty(n, device="cuda"), torch.empty(n, device="cuda").uniform_()
    up, down = torch.cuda.Stream(), torch.cuda.Stream()
    step = torch.tensor(1.0)
    lr, b1, b2, wd, eps = HP
    cuts = [(a, min(n, a + chunk)) for a in range(0, n, chunk)]

    def run(copy_up: bool, grads_down: bool):
        evs = []
        if grads_down:
            with torch.cuda.stream(down):
                for a, b in cuts:
                    g32[a:b].copy_(dev_g[a:b], non_blocking=True)
                    evs.append(torch.cuda.Event())
                    evs[-1].record(down)
        for i, (a, b) in enumerate(cuts):
            if evs:
                evs[i].synchronize()
            torch._fused_adamw_([p[a:b]], [g32[a:b]], [m[a:b]], [v[a:b]], [], [step], amsgrad=False, lr=lr,
                                beta1=b1, beta2=b2, weight_decay=wd, eps=eps, maximize=False, grad_scale=None,
                                found_inf=None)
            if copy_up:
                with torch.cuda.stream(up):
                    dev_p[a:b].copy_(p[a:b], non_blocking=True)
        torch.cuda.synchronize()

    rows = []
    for name, cu, gd in (("alone", False, False), ("weights up beside", True, False),
                         ("weights up and gradients down beside", True, True)):
        s = _time(lambda cu=cu, gd=gd: run(cu, gd), iters)
        row = {"memory": "pinned", "threads": torch.get_num_threads(), "variant": f"chunked {chunk}: {name}",
               "elements": n, "Mparams_s": n / s / 1e6}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
