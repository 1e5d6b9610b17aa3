"""GPU measurements for docs/profile.md: accounted vs measured peak, and profile overhead.

    python tests/scripts/measure_profile.py OUT_DIR
For each example: run the plain script for W+N steps, then `memtune profile` for the same steps, timing both
processes end to end; then compare states + activations with the allocator's peak.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

W, N = 1, 5
CASES = [("gpt 350m", "examples/gpt.py", ["--preset", "350m"]),
         ("hf_llama 1b", "examples/hf_llama.py", ["--preset", "1b"])]


def timed(cmd):
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode:
        print(r.stdout[-3000:], r.stderr[-3000:])
    return dt, r


def main():
    out = Path(sys.argv[1])
    results = []
    for name, script, args in CASES:
        plain_s, r1 = timed([sys.executable, script, *args, "--steps", str(W + N)])
        pj = out / f"{Path(script).stem}.json"
        prof_s, r2 = timed([sys.executable, "-m", "memtune", "profile", script, "-o", str(pj), "--force",
                            "--steps", str(N), "--warmup", str(W), "--", *args, "--steps", "1000"])
        print(r2.stdout[-4000:])
        from memtune.costmodel import build_sim, simulate
        from memtune.profile import Profile

        p = Profile.load(pj)
        acts = sum(b.activation_bytes * b.calls_per_step for b in p.blocks) + p.other_activation_bytes
        states = p.param_bytes + p.buffer_bytes + p.optimizer_state_bytes
        grads = p.grad_bytes
        accounted = states + acts + (grads if p.grads_persist else 0)
        sim_raw = simulate(build_sim(p, calibrate=False)).peak_bytes
        peak = p.peak.allocated_bytes
        gib = 2**30
        row = dict(case=name, command=" ".join(r2.args), peak_gib=peak / gib, reserved_gib=p.peak.reserved_bytes / gib,
                   phase=p.peak.phase, where=p.peak.where, params_gib=p.param_bytes / gib,
                   grads_gib=grads / gib, opt_state_gib=p.optimizer_state_bytes / gib, acts_gib=acts / gib,
                   states_plus_acts_gib=accounted / gib, remainder_gib=(peak - accounted) / gib,
                   remainder_pct=100 * (peak - accounted) / peak,
                   costmodel_raw_peak_gib=sim_raw / gib, costmodel_remainder_pct=100 * (peak - sim_raw) / peak,
                   step_s=p.step_s, fwd_s=p.fwd_s, bwd_s=p.bwd_s, optimizer_s=p.optimizer_s,
                   plain_wall_s=plain_s, profile_wall_s=prof_s, overhead_s=prof_s - plain_s,
                   blocks=len(p.blocks), repeated=len(p.repeated_blocks),
                   block_act_gib=[round(b.activation_bytes / gib, 4) for b in p.repeated_blocks][:3],
                   loss_transient_gib=p.loss_transient_bytes / gib, step_start_gib=p.step_start_bytes / gib,
                   other_act_gib=p.other_activation_bytes / gib, gpu=p.hardware.gpu_name, torch=p.torch_version,
                   h2d=p.hardware.h2d_gbps, d2h=p.hardware.d2h_gbps, tflops=p.hardware.matmul_tflops,
                   script_plain_out=r1.stdout[-300:])
        print(json.dumps(row, indent=1))
        results.append(row)
    (out / "measure.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
