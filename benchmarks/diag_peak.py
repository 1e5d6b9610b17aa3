"""What is allocated at a plan's measured peak: `memtune apply` in-process under the CUDA allocator's history,
the live blocks at the highest point of allocated memory grouped by the Python frames that made them.

    python benchmarks/diag_peak.py PLAN.yaml --steps 3 [--frames 4] [--top 25]

A diagnostic for cost-model misses (where the prediction says the peak is, against what is really there);
it prints a table, it asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _where(frames: list[dict], depth: int) -> str:
    keep = [f for f in frames if f.get("filename", "").endswith(".py") and "/torch/" not in f["filename"]
            or "autograd" in f.get("name", "")]
    out = [f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in (keep or frames)[:depth]]
    return " < ".join(out) or "?"


def peak_live(trace: list[dict]) -> tuple[int, int, dict[int, dict]]:
    """(peak bytes, the event index of the peak, addr -> the alloc event of each block live then)."""
    live: dict[int, dict] = {}
    cur = best = best_i = 0
    best_live: dict[int, dict] = {}
    for i, e in enumerate(trace):
        a = e.get("action")
        if a == "alloc":
            live[e["addr"]] = e
            cur += e["size"]
            if cur > best:
                best, best_i, best_live = cur, i, dict(live)
        elif a == "free_requested" and e["addr"] in live:
            cur -= live.pop(e["addr"])["size"]
    return best, best_i, best_live


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plan")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--cli", action="store_true", help="run the plan through the CLI's `apply` (in-process)")
    ap.add_argument("--no-history", action="store_true", help="only the peak, without the allocator's history")
    args = ap.parse_args()

    import torch

    from memtune.patcher import run_apply

    if not args.no_history:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    if args.cli:
        from memtune.cli import app

        with contextlib.suppress(SystemExit):
            app(["apply", args.plan, "--steps", str(args.steps)], standalone_mode=False)
        peak_alloc = torch.cuda.max_memory_allocated()  # reset once the plan was applied (patcher.ready)
    else:
        peak_alloc = run_apply(args.plan, steps=args.steps).peak_allocated_bytes
    if args.no_history:
        print(f"max_memory_allocated {peak_alloc / 2**30:.3f} GiB (no history)")
        return
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][0]
    peak, at, live = peak_live(trace)
    print(f"max_memory_allocated {peak_alloc / 2**30:.3f} GiB; trace peak {peak / 2**30:.3f} GiB "
          f"at event {at} of {len(trace)} (history from the first recorded allocation)")
    groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for e in live.values():
        g = groups[_where(e.get("frames", []), args.frames)]
        g[0] += e["size"]
        g[1] += 1
    print(f"{'GiB':>8} {'n':>5}  made at")
    for where, (size, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"{size / 2**30:8.3f} {n:5d}  {where}")
    # what was happening at the peak: the frames of the allocation that made it
    e = trace[at]
    print("peak made by:", _where(e.get("frames", []), 8))


if __name__ == "__main__":
    main()
