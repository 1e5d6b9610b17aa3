"""Effects measured on the user's own blocks win over formulas: hand-built what-ifs, numbers worked by hand."""

import pytest
from test_costmodel import MB, make_profile

from memtune.costmodel import build_sim, simulate
from memtune.estimate import apply_plan_effects, estimate
from memtune.profile import WhatIf
from memtune.strategies import plan_from_dict
from memtune.tune.evaluate import Tuner
from memtune.tune.records import Candidate, Corrections, rank


def with_what_ifs(p, **modes):
    keep = WhatIf(kept_bytes=90 * MB, fwd_peak_bytes=150 * MB, bwd_peak_bytes=30 * MB, fwd_s=0.008, bwd_s=0.016)
    for b in p.repeated_blocks:
        b.what_ifs = {"keep": keep, **modes}
    return p


def sim_of(p, plan):
    return apply_plan_effects(p, plan_from_dict(plan), build_sim(p))


def test_recompute_uses_the_measured_working_set_and_time():
    # measured: recomputing re-creates 110 MB on top of the 30 MB backward working set, and the block's
    # backward takes 0.012 s more alone (0.008 s forward alone): in this block's own time, 0.010 * 1.5
    p = with_what_ifs(make_profile(), recompute=WhatIf(kept_bytes=0, bwd_peak_bytes=140 * MB, fwd_s=0.008, bwd_s=0.028))
    sim = sim_of(p, {"checkpoint": {"blocks": [0]}})
    b = sim.blocks[1]
    assert b.mode == "recompute" and b.kept_bytes == pytest.approx(10 * MB)  # its inputs, as the formula says
    assert b.bwd_extra_bytes == pytest.approx(110 * MB)
    assert b.recompute_s == pytest.approx(0.012 * 0.010 / 0.008)  # a forward again: by the forward's ratio
    assert "measured" in sim.sources["checkpoint (recompute)"]
    # without the what-if: the formula, and the estimate says so
    sim2 = sim_of(make_profile(), {"checkpoint": {"blocks": [0]}})
    assert sim2.blocks[1].bwd_extra_bytes == pytest.approx(100 * MB) and sim2.blocks[1].recompute_s == 0.010
    assert sim2.sources["checkpoint (recompute)"].startswith("formula")
    est = estimate(p, plan_from_dict({"checkpoint": {"blocks": [0]}}))
    assert "checkpoint (recompute)" in est.sources


def test_measured_deltas_scale_with_the_batch():
    p = with_what_ifs(make_profile(batch=8), recompute=WhatIf(bwd_peak_bytes=140 * MB, fwd_s=0.008, bwd_s=0.028))
    s8 = apply_plan_effects(p, plan_from_dict({"checkpoint": {"blocks": [0]}}), build_sim(p, 8))
    s16 = apply_plan_effects(p, plan_from_dict({"checkpoint": {"blocks": [0]}}), build_sim(p, 16))
    assert s16.blocks[1].bwd_extra_bytes == pytest.approx(2 * s8.blocks[1].bwd_extra_bytes)


def test_block_time_above_the_profiled_batch_grows_between_the_secant_and_the_origin_line():
    # half the batch measured at 3/4 of the time: half of it does not scale below the profiled batch; above it
    # the slope is the middle of the secant's (v/2 per batch) and the origin line's (v per batch)
    p = with_what_ifs(make_profile(batch=8), half=WhatIf(fwd_s=0.006, bwd_s=0.012))
    v = build_sim(p, 8).blocks[1].fwd_s
    assert build_sim(p, 4).blocks[1].fwd_s == pytest.approx(0.75 * v)
    assert build_sim(p, 16).blocks[1].fwd_s == pytest.approx(1.75 * v)
    plain = make_profile(batch=8)  # no half-batch measurement: the fixed share's line on both sides
    w = build_sim(plain, 8).blocks[1].fwd_s
    assert build_sim(plain, 16).blocks[1].fwd_s == pytest.approx(w * (0.4 + 0.6 * 2))


def test_block_time_at_batch_one_scales_as_the_doubled_batch_measured():
    # a batch of one cannot be halved: twice the batch measured at 1.8x the time (keep: 0.008 s forward,
    # 0.016 s backward) leaves 0.2 of it fixed, so batch 14 reads 0.2 + 0.8 * 14 = 11.4x, not the formula's 8.8x
    p = with_what_ifs(make_profile(batch=1), double=WhatIf(fwd_s=0.0144, bwd_s=0.0304))
    v, vb = build_sim(p, 1).blocks[1].fwd_s, build_sim(p, 1).blocks[1].bwd_s
    assert build_sim(p, 14).blocks[1].fwd_s == pytest.approx(v * (0.2 + 0.8 * 14))
    assert build_sim(p, 14).blocks[1].bwd_s == pytest.approx(vb * (0.1 + 0.9 * 14))
    plain = make_profile(batch=1)
    w = build_sim(plain, 1).blocks[1].fwd_s
    assert build_sim(plain, 14).blocks[1].fwd_s == pytest.approx(w * (0.4 + 0.6 * 14))


def test_selective_keeps_what_was_measured():
    p = with_what_ifs(make_profile(), selective=WhatIf(kept_bytes=40 * MB, bwd_peak_bytes=80 * MB, fwd_s=0.008,
                                                       bwd_s=0.018))
    b = sim_of(p, {"checkpoint": {"blocks": [1], "mode": "selective"}}).blocks[2]
    assert b.mode == "selective" and b.kept_bytes == pytest.approx(10 * MB + 40 * MB)
    assert b.bwd_extra_bytes == pytest.approx(50 * MB)


def test_compress_keeps_what_the_codec_measured_and_costs_its_time():
    p = with_what_ifs(make_profile(), compress=WhatIf(kept_bytes=30 * MB, bwd_peak_bytes=50 * MB, fwd_s=0.010,
                                                      bwd_s=0.019))
    sim = sim_of(p, {"compress": {"blocks": [0]}})
    b = sim.blocks[1]
    # the probe kept 90 MB beside the 10 MB input it holds itself, and 30 MB compressed (the input encoded
    # too): 30% of the block's 100 MB profiled
    assert b.kept_bytes == pytest.approx(30 * MB)
    assert b.extra_fwd_s == pytest.approx(0.002 * 0.010 / 0.008)
    assert b.extra_bwd_s == pytest.approx(0.003 * 0.020 / 0.016)
    assert "measured" in sim.sources["compress"]


def test_offload_moves_what_the_transport_measured():
    p = with_what_ifs(make_profile(), offload=WhatIf(kept_bytes=5 * MB, moved_bytes=80 * MB, fwd_s=0.009,
                                                     bwd_s=0.016 + 80 * MB / 20e9 + 0.001))
    b = sim_of(p, {"offload": {"activations": [0]}}).blocks[1]
    # 80 of the probed block's 100 MB (90 kept + its 10 MB input) went to the host, 5 stayed
    assert b.d2h_bytes == pytest.approx(80 * MB) and b.kept_bytes == pytest.approx(5 * MB)
    # its time alone is not used (a block offloaded alone cannot hide its copies): the simulator's copies are
    assert b.extra_fwd_s == 0 and b.extra_bwd_s == 0


def test_offload_host_time_shows_beyond_the_hosts_lead_and_the_copies():
    """The probe timed the host issuing each mode: offload's pack and unpack hooks cost 3 ms more per block
    than keep mode. A host-bound script (no lead) pays all of it beyond the copies' exposed time (the host runs
    the hooks while the GPU waits on the copies); a host 4 ms ahead of the GPU hides that much of it; a profile
    without host times adds nothing."""
    keep = WhatIf(kept_bytes=90 * MB, fwd_peak_bytes=150 * MB, bwd_peak_bytes=30 * MB, fwd_s=0.008, bwd_s=0.016,
                  fwd_host_s=0.001, bwd_host_s=0.002)
    off = WhatIf(kept_bytes=5 * MB, moved_bytes=80 * MB, fwd_s=0.009, bwd_s=0.02, fwd_host_s=0.0025,
                 bwd_host_s=0.0035)
    p = make_profile()
    for b in p.repeated_blocks:
        b.what_ifs = {"keep": keep, "offload": off}
    plan = {"offload": {"activations": [0, 1]}}
    p.extra["backward_lag_s"] = 0.0
    sim = sim_of(p, plan)
    assert sim.host_hooks_s == pytest.approx(0.006)
    assert "6.0 ms of host time" in sim.sources["offload (host time)"]
    times = simulate(sim).time_breakdown
    assert times["strategy extra"] == pytest.approx(max(0.0, 0.006 - times["exposed transfer"]))
    p.extra["backward_lag_s"] = 0.004
    assert sim_of(p, plan).host_hooks_s == pytest.approx(0.002)
    # copies that hide nothing: the hooks show in full; copies exposed longer than the hooks: nothing more
    p.extra["backward_lag_s"] = 0.0
    fast = sim_of(p, plan)
    fast.d2h_gbps = fast.h2d_gbps = 1e6
    assert simulate(fast).time_breakdown["strategy extra"] == pytest.approx(0.006, rel=1e-3)
    slow = sim_of(p, plan)
    slow.d2h_gbps = slow.h2d_gbps = 1.0
    t = simulate(slow).time_breakdown
    assert t["exposed transfer"] > 0.006 and t["strategy extra"] == 0
    for b in p.repeated_blocks:
        b.what_ifs = {"keep": WhatIf(kept_bytes=90 * MB, fwd_s=0.008, bwd_s=0.016),
                      "offload": WhatIf(kept_bytes=5 * MB, moved_bytes=80 * MB, fwd_s=0.009, bwd_s=0.02)}
    sim = sim_of(p, plan)
    assert sim.host_hooks_s == 0 and "offload (host time)" not in sim.sources


def test_offload_moves_shared_storages_once_each():
    """Saved tensors that share a storage (a ReLU's output saved again by the next conv) go down and come back
    separately: the probe moved 1.3x what the block saved, and the run's block moves and fetches that much."""
    p = with_what_ifs(make_profile(), offload=WhatIf(kept_bytes=0, moved_bytes=130 * MB, fwd_s=0.009, bwd_s=0.02))
    sim = sim_of(p, {"offload": {"activations": [0, 1]}})
    b0, b1 = sim.blocks[1], sim.blocks[2]
    assert b0.d2h_bytes == pytest.approx(130 * MB) and b0.kept_bytes == 0
    assert b1.bwd_extra_bytes == pytest.approx(2 * 130 * MB)  # its own and the prefetched block's, fetched
    # a compressed block's codes are tensors of their own: no more than it keeps
    sim = sim_of(p, {"offload": {"activations": [0]}, "compress": {"blocks": [0], "dtype": "int8"}})
    assert sim.blocks[1].d2h_bytes <= sim.blocks[1].act_bytes


def test_optimizer_offload_uses_the_measured_host_rate():
    p = make_profile()
    p.optimizers[0].n_params = 10**9
    p.hardware.host_update_params_per_s = 2e9
    sim = sim_of(p, {"offload": {"optimizer_state": True}})
    assert sim.opt_s == pytest.approx(max(0.5, sim.param_bytes / 20e9))
    assert "measured on this host" in sim.sources["offload (optimizer state)"]


def test_offloaded_update_runs_beside_the_backward_the_script_queued():
    # 4 blocks of 100 MB of weights (25M params each) + a 4 MB embedding, 1G params/s on the host (101 ms),
    # 20 GB/s each way, 20 ms of backward a block. Without clipping each block's update starts once its
    # gradients are down (5 ms after its backward): blocks.3 25->50, .2 50->75, .1 75->100, .0 100->125, the
    # embedding 125->126: 46 ms after the backward's end (80 ms), + the last 64 MiB chunk up (3.4 ms)
    def opt_ms(lag, **extra):
        p = make_profile(block_params=100 * MB, other_params=4 * MB, fwd_s=0.01, bwd_s=0.02, h2d=20.0, d2h=20.0)
        p.optimizers[0].n_params = 101 * 10**6
        p.hardware.host_update_params_per_s = 1e9
        if lag is not None:
            p.extra["backward_lag_s"] = lag
        p.extra.update(extra)
        return estimate(p, {"offload": {"optimizer_state": True}}).time_breakdown["optimizer"] * 1e3

    tail = 64 * 2**20 / 20e9 * 1e3
    assert opt_ms(1.0) == pytest.approx(46 + tail, abs=0.01)
    assert opt_ms(0.0) == pytest.approx(101 + tail, abs=0.01)  # step() reached as the backward ends
    before = 101 + 404 / 20  # the update, then every weight up (the model without the measurement)
    assert opt_ms(None) == pytest.approx(before, abs=0.01)
    assert opt_ms(1.0, clip_grad_norm=1.0) == pytest.approx(before, abs=0.01)  # the norm needs every gradient


def test_optimizer_offload_writes_back_only_the_optimizers_parameters():
    # a frozen base: the optimizer holds a tenth of the weights, and only those come back after the update
    full = make_profile()
    lora = make_profile()
    lora.optimizers[0].param_bytes //= 10
    lora.optimizers[0].n_params //= 10
    plan = {"offload": {"optimizer_state": True}}
    assert sim_of(lora, plan).opt_h2d_bytes == pytest.approx(sim_of(full, plan).opt_h2d_bytes / 10)
    assert sim_of(full, plan).opt_h2d_bytes == pytest.approx(full.param_bytes)


def test_lossy_section_that_buys_nothing_is_not_proposed():
    """4-bit optimizer states for a few MB of adapters change nothing that matters: not proposed."""
    from test_search import opts

    p = make_profile(opt_s=0.0005)
    p.optimizers[0].n_params = 1000  # a tiny trainable part: its optimizer state is a rounding error
    p.optimizers[0].state_bytes = 8000
    tuner = Tuner(p, opts(budget_bytes=10**12))
    e = tuner.probe({"optimizer.name": "adamw4bit"})
    assert not e.valid and "buys nothing" in e.error
    assert tuner.probe({"optimizer.name": "adamw"}).valid


def test_a_lower_peak_buys_nothing_under_a_budget_with_room_but_does_for_objective_memory():
    """int8 compression of a block lowers the peak and slows the step a little: for throughput under a budget
    the plan fits without it, so it is not proposed; when it is what makes the plan fit, or the objective is
    the peak, it is."""
    from test_search import opts

    p = make_profile()
    plan = {"blocks.compress": 1, "compress.dtype": "int8"}
    base, comp = estimate(p), estimate(p, plan_from_dict({"compress": {"blocks": [0], "dtype": "int8"}}))
    assert comp.peak_bytes < base.peak_bytes / 1.02
    e = Tuner(p, opts(budget_bytes=10**12)).probe(plan)
    assert not e.valid and "buys nothing" in e.error
    assert Tuner(p, opts(budget_bytes=10**12, objective="memory")).probe(plan).valid
    tight = int((base.peak_bytes + comp.peak_bytes) / 2 / (1 - 0.03))  # fits with it, not without
    assert Tuner(p, opts(budget_bytes=tight)).probe(plan).valid


def test_each_lossy_section_counts_in_the_ranking():
    def c(n, thr, lossy):
        return Candidate(n, {}, str(n), "", 1.0, 1 / thr, thr, "steps/s", thr, True, lossy=lossy)

    one, two = ["weights"], ["weights", "optimizer"]
    assert rank([c(0, 1.015, two), c(1, 1.0, one)], "throughput")[0].number == 1
    assert rank([c(0, 1.05, two), c(1, 1.0, one)], "throughput")[0].number == 0


def test_lossless_wins_within_two_percent():
    def c(n, thr, lossy):
        return Candidate(n, {}, str(n), "", 1.0, 1 / thr, thr, "steps/s", thr, True, lossy=["optimizer"] if lossy else [])

    assert rank([c(0, 1.015, True), c(1, 1.0, False)], "throughput")[0].number == 1
    assert rank([c(0, 1.05, True), c(1, 1.0, False)], "throughput")[0].number == 0


def test_a_step_correction_passes_only_to_families_with_its_mechanisms():
    import json

    def fam(**secs):
        return json.dumps(secs, sort_keys=True)

    offload = fam(weights={"format": "nf4", "blocks": "*"}, compress={"blocks": "*", "dtype": "int8"},
                  offload={"activations": "*"})
    ckpt = fam(weights={"format": "nf4", "blocks": "*"}, checkpoint={"blocks": "*", "mode": "full"})
    more = fam(weights={"format": "nf4", "blocks": "*"}, compress={"blocks": "*", "dtype": "fp8"},
               offload={"activations": "*"}, checkpoint={"blocks": "*", "mode": "full"})
    corr = Corrections()
    corr.add(Candidate(0, {}, "a", "", 100.0, 1.0, 1.0, "steps/s", 1.0, True, family=offload),
             {"status": "ok", "peak_bytes": 100.0, "step_s": 1.8}, budget=110)
    assert corr.step_ratio(offload) == pytest.approx(1.8)
    assert corr.step_ratio(ckpt) == pytest.approx(1.0)  # no offload or compression in it: its own prediction
    assert corr.step_ratio(more) == pytest.approx(1.8)  # it has them all: their error is in it too
    assert corr.peak_ratio(ckpt) == pytest.approx(1.0)


def test_a_step_correction_passes_over_where_the_model_is_placed():
    import json

    streamed = {"checkpoint": {"blocks": "*", "mode": "full"}, "offload": {"gradients": True, "optimizer_state": True}}
    placed = json.dumps({**streamed, "placement": {"defer": True}}, sort_keys=True)
    corr = Corrections()
    corr.add(Candidate(0, {}, "a", "", 100.0, 1.0, 1.0, "steps/s", 1.0, True, family=placed),
             {"status": "ok", "peak_bytes": 100.0, "step_s": 1.42}, budget=110)
    assert corr.step_ratio(json.dumps(streamed, sort_keys=True)) == pytest.approx(1.42)
    state_only = {"checkpoint": streamed["checkpoint"], "offload": {"optimizer_state": True}}
    assert corr.step_ratio(json.dumps(state_only, sort_keys=True)) == pytest.approx(1.0)


def test_corrections_per_family_and_for_unmeasured_ones():
    corr = Corrections()
    a = Candidate(0, {}, "a", "", 100.0, 1.0, 1.0, "steps/s", 1.0, True, family="A")
    corr.add(a, {"status": "over budget", "peak_bytes": 120.0, "step_s": 1.5}, budget=110)
    b = Candidate(1, {}, "b", "", 100.0, 1.0, 1.0, "steps/s", 1.0, True, family="B")
    corr.apply([a, b], limit=110.0)
    assert a.peak_bytes == pytest.approx(120.0) and not a.feasible
    assert b.peak_bytes == pytest.approx(120.0)  # an unmeasured family takes the measured mean (>= 1)
    assert a.throughput == pytest.approx(1 / 1.5)
    corr.add(b, {"status": "oom"}, budget=110)  # ran out of memory: needed at least the budget
    assert corr.peak_ratio("B") == pytest.approx(1.1)


def test_a_stall_inside_a_block_does_not_grow_with_the_batch():
    # in the run the block took 50 ms, alone on the same inputs 8 ms: 42 ms of waiting on the host (a kernel
    # plan built for a new padded length) stays constant; only the kernels' 8 ms scale, as above
    p = with_what_ifs(make_profile(batch=8), half=WhatIf(fwd_s=0.006, bwd_s=0.012))
    b = p.blocks[1]
    b.fwd_s = 0.050
    assert build_sim(p, 8).blocks[1].fwd_s == pytest.approx(0.050)
    assert build_sim(p, 4).blocks[1].fwd_s == pytest.approx(0.042 + 0.75 * 0.008)
    assert build_sim(p, 16).blocks[1].fwd_s == pytest.approx(0.042 + 1.75 * 0.008)
    assert build_sim(p, 16).blocks[2].fwd_s == pytest.approx(1.75 * build_sim(p, 8).blocks[2].fwd_s)  # no stall
