"""Where a plan's step time goes: `memtune apply` in-process under torch.profiler, the top operators by their own
device time and by their own host time over the profiled steps.

    python benchmarks/diag_step.py PLAN.yaml --steps 6 --skip 3 [--top 25]

A diagnostic for step-time misses (what the cost model charges against what the run spends); it prints
tables, it asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plan")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skip", type=int, default=3, help="steps run before the profiler starts recording")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--overlap", action="store_true", help="also print how the device's compute and copies "
                    "overlapped (from the chrome trace), per recorded step")
    args = ap.parse_args()

    from torch.profiler import ProfilerActivity, profile, schedule

    import memtune.patcher as patcher

    rec = max(1, args.steps - args.skip)
    sched = schedule(wait=args.skip, warmup=0, active=rec, repeat=1)

    base = patcher.Session

    class Stepped(base):  # one profiler step per counted optimizer step (the session's own count)
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.on_step.append(lambda s, i: prof.step())

    patcher.Session = Stepped
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=sched) as prof:
        try:
            res = patcher.run_apply(args.plan, steps=args.steps)
        finally:
            patcher.Session = base
    print(f"steps {args.steps}, recorded {rec}; median step {res.step_s * 1e3 if res.step_s else float('nan'):.1f} ms")
    ka = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):  # the name changed across torch versions
        try:
            print(ka.table(sort_by=key, row_limit=args.top))
            break
        except (AttributeError, KeyError, ValueError):
            continue
    print(ka.table(sort_by="self_cpu_time_total", row_limit=args.top))
    if args.overlap:
        import json
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = f"{d}/trace.json"
            prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f)["traceEvents"]
        print(overlap_summary(events, rec))


def _union(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(iv: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in iv)


def _intersect(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
    i = j = 0
    tot = 0.0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        tot += max(0.0, b - a)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return tot


def overlap_summary(events: list[dict], steps: int) -> str:
    """Device busy time by kind over the recorded window (chrome-trace microseconds), per step: compute
    kernels, copies down and up, how much of the copies ran beside compute, and the time nothing ran (the
    host had queued nothing: host-bound)."""
    comp, down, up = [], [], []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        cat, name = e.get("cat", ""), e.get("name", "")
        iv = (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        if cat == "kernel" or cat == "gpu_memset":
            comp.append(iv)
        elif cat == "gpu_memcpy":
            (down if "DtoH" in name else up if "HtoD" in name else comp).append(iv)
    if not comp:
        return "overlap: no device events in the trace"
    allv = _union(comp + down + up)
    span = allv[-1][1] - allv[0][0]
    c, d, u = _union(comp), _union(down), _union(up)
    n = max(1, steps)
    ms = lambda x: f"{x / n / 1e3:.1f} ms"  # noqa: E731
    return (f"overlap per step ({n} recorded): span {ms(span)}, compute {ms(_length(c))}, down {ms(_length(d))}, "
            f"up {ms(_length(u))}, down beside compute {ms(_intersect(d, c))}, up beside compute "
            f"{ms(_intersect(u, c))}, down beside up {ms(_intersect(d, u))}, nothing running "
            f"{ms(span - _length(allv))}")


if __name__ == "__main__":
    main()
