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


if __name__ == "__main__":
    main()
