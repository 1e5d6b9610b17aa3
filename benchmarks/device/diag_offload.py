"""Where an offloaded run's step time goes (GPU diagnostic, not a test): runs `memtune apply` in-process
with timers around the offload paths and cProfile over the main thread.

    python benchmarks/device/diag_offload.py PLAN.yaml --steps 6 --out DIR
"""

import argparse
import collections
import cProfile
import functools
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

from memtune.strategies.offload import activations, optimizer_state, transport

T: dict[str, float] = collections.defaultdict(float)
N: dict[str, int] = collections.defaultdict(int)


def timed(cls, name, key=None):
    orig = getattr(cls, name)
    key = key or f"{cls.__name__}.{name}"

    @functools.wraps(orig)
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            T[key] += time.perf_counter() - t0
            N[key] += 1

    setattr(cls, name, wrapper)


for cls, names in [(optimizer_state.OptimizerOffload, ["_step", "_todo", "_update", "_grad_ready", "_write_back",
                                                        "_host_grad", "state_to_host"]),
                   (transport.CudaTransport, ["host_like", "d2h", "h2d_new", "h2d", "sync", "join"]),
                   (activations.ActivationOffloader, ["pack", "unpack", "_fetch_group"])]:
    for n in names:
        if hasattr(cls, n):
            timed(cls, n)
timed(torch.cuda.Event, "synchronize", "Event.synchronize")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("plan")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--skip", type=int, default=0, help="timers count from after this many optimizer steps")
    a = ap.parse_args()
    import memtune.patcher as patcher

    base = patcher.Session

    class Skipping(base):  # the timers restart once the first steps (pinned allocations, warm-up) are done
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.on_step.append(lambda s, i: (T.clear(), N.clear()) if i == a.skip - 1 else None)

    if a.skip:
        patcher.Session = Skipping
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    prof = cProfile.Profile()
    if a.cprofile:
        prof.enable()
    try:
        res = patcher.run_apply(a.plan, steps=a.steps)
    finally:
        patcher.Session = base
    prof.disable()
    s = io.StringIO()
    if a.cprofile:
        st = pstats.Stats(prof, stream=s)
        st.sort_stats("tottime").print_stats(25)
        st.sort_stats("cumtime").print_stats(35)
    counted = max(1, a.steps - a.skip)
    rep = {"per_step_ms": {k: round(v / counted * 1e3, 2) for k, v in sorted(T.items(), key=lambda kv: -kv[1])},
           "step_times": res.step_times, "step_s": res.step_s, "peak": res.peak_allocated_bytes,
           "notes": res.notes, "failure": res.failure,
           "timers_s": {k: round(v, 4) for k, v in sorted(T.items(), key=lambda kv: -kv[1])}, "calls": dict(N),
           "threads": torch.get_num_threads()}
    (out / "diag.json").write_text(json.dumps(rep, indent=1, default=str))
    (out / "pstats.txt").write_text(s.getvalue())
    print(json.dumps({k: rep[k] for k in ("step_s", "per_step_ms", "calls")}, default=str))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
