"""Cost model rules on hand-built profiles: each expected number is worked out by hand from the rule."""

import copy
from dataclasses import dataclass

import pytest

from memtune import costmodel as cm
from memtune.costmodel import build as cm_build
from memtune.costmodel import build_sim, fit_batch, simulate
from memtune.costmodel import timeline as cm_timeline
from memtune.errors import InputError
from memtune.estimate import apply_plan_effects, estimate, max_batch_size
from memtune.plan import SectionConfig
from memtune.profile import BlockProfile, Hardware, OptimizerProfile, Peak, Profile
from memtune.strategies import base as sbase
from memtune.strategies import plan_from_dict

MB = 1_000_000


def make_profile(n=4, act=100 * MB, inp=10 * MB, fwd_tr=120 * MB, bwd_tr=30 * MB, block_params=20 * MB,
                 other_params=10 * MB, fwd_s=0.010, bwd_s=0.020, batch=8, measured_peak=None,
                 other_act=40 * MB, loss_tr=50 * MB, opt_s=0.005, step_s=None, autocast=None,
                 h2d=20.0, d2h=20.0, micro=1, device="cuda"):
    blocks = [BlockProfile(name="emb", cls="Embedding", kind="other", index=0,
                           param_bytes={"float32": other_params}, trainable_param_bytes=other_params)]
    for i in range(n):
        blocks.append(BlockProfile(
            name=f"blocks.{i}", cls="Block", index=i + 1, param_bytes={"float32": block_params},
            trainable_param_bytes=block_params, activation_bytes=act, input_bytes=inp,
            transient_bytes=fwd_tr, bwd_transient_bytes=bwd_tr, fwd_s=fwd_s, bwd_s=bwd_s))
    params = other_params + n * block_params
    p = Profile(
        device=device, hardware=Hardware(device=device, h2d_gbps=h2d, d2h_gbps=d2h), blocks=blocks,
        optimizers=[OptimizerProfile(cls="torch.optim.adamw.AdamW", kind="adamw", param_bytes=params,
                                     state_bytes=2 * params, step_s=opt_s)],
        param_bytes=params, trainable_param_bytes=params, grad_bytes=params, optimizer_state_bytes=2 * params,
        other_activation_bytes=other_act, loss_transient_bytes=loss_tr,
        step_start_bytes=3 * params, batch_size=batch, optimizer_s=opt_s, autocast=autocast,
        micro_batches_per_step=micro,
        peak=Peak(allocated_bytes=measured_peak or 0, measured=measured_peak is not None),
    )
    p.step_s = step_s if step_s is not None else micro * n * (fwd_s + bwd_s) + opt_s + 0.001
    return p


def states(p):
    return p.param_bytes + p.optimizer_state_bytes


def events(sim):
    return dict(simulate(sim).timeline)


# --- the baseline timeline -------------------------------------------------------------------------


def test_baseline_timeline_by_hand():
    p = make_profile()
    est = estimate(p)
    tl = dict(est.timeline)
    s = states(p)  # 90 MB params + 180 MB state
    assert tl["fwd:blocks.0"] == s + 120 * MB  # its transient, nothing kept yet
    assert tl["fwd:blocks.3"] == s + 3 * 100 * MB + 120 * MB
    assert tl["loss"] == s + 4 * 100 * MB + 40 * MB + 50 * MB
    # backward of the last block: all kept activations live + the larger of its working set (30 MB) and
    # the gradients it creates (20 MB)
    assert tl["bwd:blocks.3"] == s + 4 * 100 * MB + 30 * MB
    assert tl["bwd:blocks.0"] == s + 100 * MB + 3 * 20 * MB + 30 * MB
    # optimizer: all gradients + one fp32 temporary per parameter (foreach AdamW on CUDA)
    assert tl["optimizer"] == s + p.grad_bytes + p.param_bytes
    assert est.peak_bytes == tl["loss"]
    assert est.peak_phase == "loss"
    assert est.breakdown["activations kept"] == 440 * MB
    assert sum(est.breakdown.values()) == pytest.approx(est.peak_bytes)


def test_saved_before_the_blocks_stay_to_the_end_of_backward():
    # of the 40 MB saved outside the blocks, 30 MB were saved before them (a stem's pooling): the loss's 10 MB
    # go with the loss's backward, the stem's stay through every block's backward
    p = make_profile()
    p.other_activation_before_bytes = 30 * MB
    tl = dict(estimate(p).timeline)
    s = states(p)
    assert tl["loss"] == s + 4 * 100 * MB + 40 * MB + 50 * MB
    assert tl["bwd:blocks.3"] == s + 4 * 100 * MB + 30 * MB + 30 * MB
    assert tl["bwd:blocks.0"] == s + 100 * MB + 30 * MB + 3 * 20 * MB + 30 * MB


def test_peak_is_max_of_timeline_not_sum_of_maxima():
    p = make_profile()
    est = estimate(p)
    assert est.peak_bytes == max(v for _, v in est.timeline)
    # gradients and activations never peak together in this step: the sum of maxima would be larger
    assert est.peak_bytes < states(p) + 440 * MB + 50 * MB + p.grad_bytes + p.param_bytes


def test_fused_optimizer_has_no_step_transient():
    p = make_profile()
    p.optimizers[0].hyperparams = {"fused": True}
    assert build_sim(p).opt_transient_bytes == 0
    p.optimizers[0].hyperparams = {}
    assert build_sim(p).opt_transient_bytes == p.param_bytes
    assert build_sim(make_profile(device="cpu")).opt_transient_bytes == 0  # per-tensor loop on CPU


def test_baseline_time_reproduces_profiled_step():
    p = make_profile(step_s=0.2)
    est = estimate(p)
    assert est.step_s == pytest.approx(0.2)
    assert est.time_breakdown["other"] == pytest.approx(0.2 - 4 * 0.03 - 0.005)
    assert est.throughput == pytest.approx(8 / 0.2)
    assert est.throughput_unit == "samples/s"
    p.batch_size = None
    assert estimate(p).throughput_unit == "steps/s"


def test_block_times_rescaled_to_clean_forward_and_backward():
    p = make_profile(step_s=0.2)
    p.fwd_s, p.bwd_s = 0.02, 0.06  # hooks inflated the per-block times (0.04 and 0.08 in all)
    sim = build_sim(p)
    assert sum(b.fwd_s for b in sim.blocks) == pytest.approx(0.02)
    assert sum(b.bwd_s for b in sim.blocks) == pytest.approx(0.06)
    assert simulate(sim).step_s == pytest.approx(0.2)


def test_glue_inside_the_model_scales_with_batch():
    p = make_profile(step_s=0.2)
    p.fwd_s, p.bwd_s = 0.05, 0.09  # blocks: 0.04 and 0.08; 10 ms each of glue inside the model
    outside = 0.2 - 0.14 - 0.005
    assert build_sim(p).other_s == pytest.approx(0.02 + outside)
    assert build_sim(p, 16).other_s == pytest.approx(0.04 + outside * (1 + cm_build.OUTSIDE_BATCH_SHARE))
    assert estimate(p).step_s == pytest.approx(0.2)


def test_model_output_is_live_at_the_loss_and_script_held_tensors_scale():
    p = make_profile()
    p.blocks[-1].output_bytes = 70 * MB  # logits
    p.step_start_bytes += 35 * MB  # the script still holds last step's logits
    tl = events(build_sim(p))
    assert tl["loss"] == states(p) + 35 * MB + 4 * 100 * MB + 40 * MB + 50 * MB + 70 * MB
    assert tl["bwd:blocks.0"] == states(p) + 35 * MB + 100 * MB + 3 * 20 * MB + 30 * MB
    s16 = build_sim(p, 16)
    assert s16.output_bytes == 140 * MB and s16.fixed_bytes == 70 * MB


# --- strategies' effects, as strategies/base.py documents them --------------------------------------


def checkpoint(sim, names):
    for b in sim.blocks:
        if b.name in names:
            b.mode = "recompute"
            b.kept_bytes = b.input_bytes
            b.bwd_extra_bytes = b.act_bytes
            b.recompute_s = b.fwd_s


def offload(sim, names):
    for b in sim.blocks:
        if b.name in names:
            b.mode = "offload"
            b.kept_bytes = 0
            b.d2h_bytes = b.h2d_bytes = b.act_bytes
            b.bwd_extra_bytes = b.act_bytes


def test_checkpointed_block_keeps_only_its_input():
    p = make_profile()
    base = events(build_sim(p))
    sim = build_sim(p)
    checkpoint(sim, {"blocks.1"})
    tl = events(sim)
    # after blocks.1's forward only its input (10 MB) stayed instead of its 100 MB of activations
    assert tl["fwd:blocks.2"] == base["fwd:blocks.2"] - 90 * MB
    assert tl["loss"] == base["loss"] - 90 * MB
    # its backward re-creates the activations: live again during its own backward
    assert tl["bwd:blocks.1"] == base["bwd:blocks.1"] - 90 * MB + 100 * MB
    est = simulate(sim)
    assert est.time_breakdown["recompute"] == pytest.approx(0.010)
    assert est.step_s == pytest.approx(estimate(p).step_s + 0.010)


def test_offloaded_block_keeps_nothing_and_transfer_hides_when_compute_covers_it():
    p = make_profile(h2d=1000.0, d2h=1000.0)  # 100 MB at 1000 GB/s: 0.1 ms, under a 10 ms forward
    base = events(build_sim(p))
    sim = build_sim(p)
    offload(sim, {"blocks.0"})
    tl = events(sim)
    assert tl["loss"] == base["loss"] - 100 * MB
    assert tl["fwd:blocks.1"] == base["fwd:blocks.1"] - 100 * MB
    est = simulate(sim)
    assert est.time_breakdown["exposed transfer"] == pytest.approx(0.0, abs=1e-12)
    assert est.step_s == pytest.approx(estimate(p).step_s)
    assert est.host_bytes == 100 * MB


def test_offload_exposes_transfer_when_compute_cannot_hide_it():
    p = make_profile(h2d=1.0, d2h=1.0)  # 100 MB at 1 GB/s = 100 ms per direction
    sim = build_sim(p)
    offload(sim, {"blocks.2"})
    est = simulate(sim)
    # d2h of blocks.2 starts at t=30 ms (end of its forward), done at 130 ms; the h2d is issued when the
    # backward of blocks.3 starts (40 ms), waits for the d2h, done at 230 ms; blocks.2's backward would
    # have started at 60 ms: 170 ms exposed.
    assert est.time_breakdown["exposed transfer"] == pytest.approx(0.170)
    assert est.step_s == pytest.approx(estimate(p).step_s + 0.170)


def test_offload_prefetch_one_block_ahead_overlaps_previous_backward():
    # 40 MB per direction at 2 GB/s = 20 ms = exactly one block's backward: fully hidden when the
    # offloaded block is not the last one and its d2h had forwards to hide behind
    p = make_profile(act=40 * MB, fwd_s=0.030, h2d=2.0, d2h=2.0)
    sim = build_sim(p)
    offload(sim, {"blocks.0"})
    assert simulate(sim).time_breakdown["exposed transfer"] == pytest.approx(0.0, abs=1e-12)
    sim = build_sim(p)
    offload(sim, {"blocks.3"})  # the last block: nothing before it in backward to hide its fetch
    assert simulate(sim).time_breakdown["exposed transfer"] > 0




def test_offload_self_fetch_starts_as_far_ahead_as_the_host_ran():
    # the last block before a slow head fetches itself at its first unpack: with the host measured ahead of
    # the GPU at the backward's end, that unpack comes while the head's backward still runs on the GPU
    p = make_profile(act=40 * MB, fwd_s=0.030, h2d=2.0, d2h=2.0)
    p.blocks.append(BlockProfile(name="head", cls="Linear", kind="other", index=9, activation_bytes=10 * MB,
                                 fwd_s=0.030, bwd_s=0.060))
    sim = build_sim(p)
    offload(sim, {"blocks.3"})
    alone = simulate(sim).time_breakdown["exposed transfer"]
    p.extra["backward_lag_s"] = 0.5
    sim = build_sim(p)
    assert sim.cpu_ahead_s == 0.5
    offload(sim, {"blocks.3"})
    ahead = simulate(sim).time_breakdown["exposed transfer"]
    assert alone == pytest.approx(0.020)  # its 20 ms copy back starts when the GPU reaches it
    assert ahead == pytest.approx(0.0, abs=1e-12)
    p.extra["compiled"] = {"step_s": 0.1}  # a compiled backward is one graph: no lead is taken
    assert build_sim(p).cpu_ahead_s == 0.0


def test_peak_phase_moves_to_optimizer_as_activations_shrink():
    p = make_profile(act=150 * MB, block_params=60 * MB, other_act=0, loss_tr=0, fwd_tr=0, bwd_tr=0)
    est = estimate(p)
    assert est.peak_phase in ("loss", "backward")
    sim = build_sim(p)
    checkpoint(sim, {b.name for b in sim.blocks if b.kind == "repeated"})
    est2 = simulate(sim)
    assert est2.peak_phase == "optimizer"
    assert est2.peak_bytes < est.peak_bytes
    assert est2.breakdown["gradients"] == p.grad_bytes


def test_peak_phase_forward_when_grads_persist_and_transient_is_large():
    p = make_profile(other_act=0, loss_tr=0, fwd_tr=900 * MB)
    p.grads_persist = True
    p.step_start_bytes = 4 * p.param_bytes
    est = estimate(p)
    assert est.peak_phase == "forward"
    assert est.peak_where == "blocks.3"
    assert est.breakdown["gradients"] == p.grad_bytes


def test_update_in_backward_frees_each_gradient():
    p = make_profile()
    sim = build_sim(p)
    sim.grads_freed_in_backward = True
    tl = events(sim)
    assert tl["optimizer"] == states(p) + p.param_bytes  # no gradients left for the step
    assert tl["bwd:blocks.0"] == states(p) + 100 * MB + 30 * MB


def test_gradient_accumulation_second_microbatch_carries_gradients():
    p = make_profile(micro=2, other_act=0, loss_tr=0)
    est = estimate(p)
    tl = dict(est.timeline)
    assert tl["mb1/loss"] - tl["mb0/loss"] == p.grad_bytes
    assert est.peak_bytes == tl["mb1/bwd:blocks.3"] == tl["mb1/loss"] + 30 * MB
    assert est.peak_where == "blocks.3"
    assert est.time_breakdown["forward"] == pytest.approx(2 * 4 * 0.010)
    assert est.throughput == pytest.approx(16 / est.step_s)


def test_optimizer_work_overlapping_backward_is_hidden_when_shorter():
    p = make_profile()
    sim = build_sim(p)
    sim.opt_s = 0.0
    sim.opt_overlap_s = 0.05  # backward is 4 x 20 ms = 80 ms
    assert simulate(sim).time_breakdown["optimizer"] == 0
    sim.opt_overlap_s = 0.1
    assert simulate(sim).time_breakdown["optimizer"] == pytest.approx(0.02)


# --- batch size --------------------------------------------------------------------------------------


def test_batch_scaling_one_profile_is_proportional_with_fixed_parts_constant():
    p = make_profile(batch=8, step_s=0.2)
    s16 = build_sim(p, 16)
    b = s16.blocks[1]
    assert b.act_bytes == 200 * MB and b.input_bytes == 20 * MB and b.fwd_transient == 240 * MB
    k = cm_build.BLOCK_TIME_FIXED_SHARE  # that share of a block's time stays, the rest doubles
    assert b.fwd_s == pytest.approx(0.010 * (k + 2 * (1 - k))) and b.bwd_s == pytest.approx(0.020 * (k + 2 * (1 - k)))
    assert s16.param_bytes == p.param_bytes and s16.opt_state_bytes == p.optimizer_state_bytes
    assert s16.opt_s == p.optimizer_s
    # outside the model: half held constant (clipping, zero_grad), half with the batch (the loss)
    outside = build_sim(p).other_s
    assert s16.other_s == pytest.approx(outside * (1 - cm_build.OUTSIDE_BATCH_SHARE) + outside * cm_build.OUTSIDE_BATCH_SHARE * 2)
    assert estimate(p, batch_size=16).throughput > estimate(p).throughput


def test_autocast_weight_copies_do_not_scale_with_batch():
    p = make_profile(batch=8, autocast="bfloat16")
    # 20 MB of fp32 weights -> 10 MB of bf16 copies saved by the matmuls, the other 90 MB per sample
    assert build_sim(p, 16).blocks[1].act_bytes == 10 * MB + 180 * MB
    assert build_sim(p, 16).blocks[0].act_bytes == 0  # the embedding saves no weight copy


def test_batch_fit_through_two_profiles_is_linear():
    p8 = make_profile(batch=8, act=100 * MB, measured_peak=900 * MB)
    p16 = make_profile(batch=16, act=180 * MB, fwd_s=0.018, measured_peak=1400 * MB)
    fitted = fit_batch(p8, p16)
    for bs, act in ((8, 100), (16, 180), (32, 340), (4, 60)):
        assert build_sim(fitted, bs).blocks[1].act_bytes == pytest.approx(act * MB)
    assert build_sim(fitted, 32).blocks[1].fwd_s == pytest.approx(0.010 + 0.001 * 24)  # the line, no share
    # both measured peaks are reproduced: the remainder is fitted through both
    assert estimate(fitted, batch_size=8).peak_bytes == pytest.approx(900 * MB)
    assert estimate(fitted, batch_size=16).peak_bytes == pytest.approx(1400 * MB)
    assert estimate(fitted).peak_bytes == pytest.approx(900 * MB)


def test_batch_fit_refusals():
    p = make_profile(batch=8)
    with pytest.raises(InputError, match="both profiles have batch size 8"):
        fit_batch(p, make_profile(batch=8))
    with pytest.raises(InputError, match="different blocks"):
        fit_batch(p, make_profile(batch=16, n=3))
    q = make_profile(batch=None)
    with pytest.raises(InputError, match="does not know its own batch size"):
        build_sim(q, 16)
    with pytest.raises(InputError, match="positive"):
        build_sim(p, 0)


def test_max_batch_size_is_the_largest_that_fits():
    p = make_profile(batch=8)
    budget = 2000 * MB
    b = max_batch_size(p, None, budget)
    assert estimate(p, batch_size=b).peak_bytes <= budget < estimate(p, batch_size=b + 1).peak_bytes
    assert max_batch_size(p, None, 10 * MB) == 0
    q = make_profile(batch=None)
    with pytest.raises(InputError, match="batch size"):
        max_batch_size(q, None, budget)


# --- calibration --------------------------------------------------------------------------------------


def test_calibration_reproduces_measured_baseline_peak():
    p = make_profile(measured_peak=1_000 * MB)
    raw = simulate(build_sim(p, calibrate=False)).peak_bytes
    est = estimate(p)
    assert est.peak_bytes == pytest.approx(1_000 * MB)
    assert est.breakdown["allocator overhead"] == pytest.approx(1_000 * MB - raw)
    # the same remainder is carried to another plan (additive)
    sim = build_sim(p)
    checkpoint(sim, {"blocks.0"})
    raw_sim = build_sim(p, calibrate=False)
    checkpoint(raw_sim, {"blocks.0"})
    assert simulate(sim).peak_bytes - simulate(raw_sim).peak_bytes == pytest.approx(1_000 * MB - raw)


def test_calibration_in_the_loss_region_grows_with_the_batch():
    # the allocator saw its peak in the loss's backward (a transformers model computing its own loss):
    # the shortfall is logit-sized working memory, so it doubles with the batch; the rest is constant
    p = make_profile(measured_peak=1_000 * MB)
    p.peak.phase, p.peak.where = "backward", None
    raw = simulate(build_sim(p, calibrate=False))
    at_loss = dict(raw.timeline)["loss"]
    est = estimate(p)
    assert est.peak_bytes == pytest.approx(1_000 * MB)
    assert est.breakdown["allocator overhead"] == pytest.approx(0.0, abs=1)
    assert build_sim(p).loss_transient_bytes == pytest.approx(50 * MB + 1_000 * MB - at_loss)
    raw16 = dict(simulate(build_sim(p, 16, calibrate=False)).timeline)["loss"]
    assert estimate(p, batch_size=16).peak_bytes == pytest.approx(raw16 + 2 * (1_000 * MB - at_loss))
    # a peak measured inside a block is explained by a constant instead
    p.peak.phase, p.peak.where = "backward", "blocks.3"
    assert build_sim(p).loss_transient_bytes == 50 * MB
    assert build_sim(p).calib_bytes == pytest.approx(1_000 * MB - raw.peak_bytes)


def test_proportional_calibration(monkeypatch):
    monkeypatch.setattr(cm_build, "CALIBRATION", "proportional")
    p = make_profile(measured_peak=1_100 * MB)
    raw = simulate(build_sim(p, calibrate=False)).peak_bytes
    assert estimate(p).peak_bytes == pytest.approx(1_100 * MB)
    raw16 = simulate(build_sim(p, 16, calibrate=False)).peak_bytes
    assert estimate(p, batch_size=16).peak_bytes == pytest.approx(raw16 * 1_100 * MB / raw)


def test_cpu_profile_gets_no_calibration():
    p = make_profile(measured_peak=None)
    p.peak = Peak(allocated_bytes=5_000 * MB, measured=False)
    sim = build_sim(p)
    assert sim.calib_bytes == 0
    assert any("CPU profile" in n for n in sim.notes)


# --- plans through registered strategies ---------------------------------------------------------------


@dataclass(frozen=True)
class _OrderConfig(SectionConfig):
    blocks: tuple = ()
    changes_numbers: bool = False

    @property
    def lossy(self):
        return self.changes_numbers


class _Order(sbase.Strategy):
    """Records the order effects run in; checkpoints the blocks its section names."""

    seen: list = []

    def validate(self, section):
        section = dict(section or {})
        return _OrderConfig(tuple(section.get("blocks", ())), bool(section.get("lossy")))

    def effect(self, profile, config, sim):
        _Order.seen.append(self.name)
        checkpoint(sim, set(config.blocks))
        if config.lossy:
            sim.notes.append("changes the numbers")


@pytest.fixture
def fake_strategies(monkeypatch):
    first = type("First", (_Order,), {"name": "zz_first", "order": 1})()
    last = type("Last", (_Order,), {"name": "aa_last", "order": 999})()
    monkeypatch.setitem(sbase._REGISTRY, "zz_first", first)
    monkeypatch.setitem(sbase._REGISTRY, "aa_last", last)
    _Order.seen = []
    return first, last


def test_estimate_applies_sections_in_strategy_order(fake_strategies):
    p = make_profile()
    plan = plan_from_dict({"aa_last": {"blocks": ["blocks.0"], "lossy": True}, "zz_first": {}})
    est = estimate(p, plan)
    assert _Order.seen == ["zz_first", "aa_last"]
    assert est.lossy == ["aa_last"]
    assert est.peak_bytes == estimate(p).peak_bytes - 90 * MB


def test_plan_knob_sets_batch_size(fake_strategies):
    p = make_profile(batch=8)
    plan = plan_from_dict({"run": {"knobs": {"--batch-size": 16}}, "zz_first": {}})
    assert estimate(p, plan).peak_bytes == estimate(p, batch_size=16).peak_bytes
    assert estimate(p, plan, batch_size=8).peak_bytes == estimate(p).peak_bytes


def test_estimate_does_not_change_the_profile():
    p = make_profile(measured_peak=1_000 * MB)
    before = copy.deepcopy(p.to_dict())
    estimate(p, batch_size=32)
    fit_batch(p, make_profile(batch=16, measured_peak=1_500 * MB))
    assert p.to_dict() == before


def test_profile_round_trip_gives_same_estimate(tmp_path):
    p = make_profile(measured_peak=1_000 * MB, autocast="bfloat16")
    p.save(tmp_path / "p.json")
    q = Profile.load(tmp_path / "p.json")
    assert estimate(q).to_dict() == estimate(p).to_dict()


# --- through the real strategies ---------------------------------------------------------------------------


def test_real_checkpoint_strategy_keeps_only_the_input():
    p = make_profile()
    base = dict(estimate(p).timeline)
    tl = dict(estimate(p, plan_from_dict({"checkpoint": {"blocks": [1]}})).timeline)
    assert tl["loss"] == base["loss"] - (100 - 10) * MB
    assert tl["bwd:blocks.1"] == base["bwd:blocks.1"] - 90 * MB + 100 * MB
    est = estimate(p, plan_from_dict({"checkpoint": {"blocks": "all"}}))
    assert est.time_breakdown["recompute"] == pytest.approx(4 * 0.010)
    assert est.breakdown["activations kept"] <= 4 * 10 * MB


def test_real_offload_strategy_moves_activations_to_the_host():
    p = make_profile(h2d=1.0, d2h=1.0)
    base = estimate(p)
    est = estimate(p, plan_from_dict({"offload": {"activations": [0, 1]}}))
    assert dict(est.timeline)["loss"] == dict(base.timeline)["loss"] - 200 * MB
    assert est.host_bytes == 200 * MB
    assert est.time_breakdown["exposed transfer"] > 0  # 1 GB/s cannot hide 100 MB behind 10-20 ms blocks


def test_drop_autocast_copies_for_16bit_weights():
    p = make_profile(autocast="bfloat16")
    sim = build_sim(p, 16)
    assert sim.blocks[1].autocast_copy_bytes == 10 * MB and sim.blocks[0].autocast_copy_bytes == 0
    before = simulate(sim).peak_bytes
    cm.drop_autocast_copies(sim)
    assert sim.blocks[1].act_bytes == 180 * MB
    assert simulate(sim).peak_bytes == pytest.approx(before - 4 * 10 * MB)


def test_offload_fetch_queue_runs_one_offloaded_block_ahead():
    # blocks.0 and blocks.1 offloaded, 20 MB each at 1 GB/s = 20 ms per copy; forward 10 ms per block.
    # d2h: blocks.0 10->30 ms, blocks.1 30->50 ms. Backward starts at 40 ms: blocks.3's start fetches
    # blocks.1 (50->70); blocks.2's start asks for nothing (the newest offloaded block before it is being
    # fetched); blocks.1 starts at 80 (ready at 70) and fetches blocks.0 (80->100), which starts at 100:
    # nothing exposed.
    p = make_profile(act=20 * MB, h2d=1.0, d2h=1.0)
    sim = build_sim(p)
    offload(sim, {"blocks.0", "blocks.1"})
    assert simulate(sim).time_breakdown["exposed transfer"] == pytest.approx(0.0, abs=1e-12)
    # copies of 40 ms each fall behind the 20 ms backwards
    p = make_profile(act=40 * MB, h2d=1.0, d2h=1.0)
    sim = build_sim(p)
    offload(sim, {"blocks.0", "blocks.1"})
    assert simulate(sim).time_breakdown["exposed transfer"] > 0


def test_offload_fetches_only_the_block_that_ran_just_before():
    # as the runtime does (activations.py `prefetch_before`): a block's backward start fetches the repeated
    # block before it, and only if that one is offloaded, though the copy engine is idle earlier. 30 MB at
    # 1 GB/s back (30 ms), 10 GB/s down, backward from 40 ms, 20 ms a block: blocks.3 (40-60) fetches
    # nothing; blocks.2's start fetches blocks.1 (60->90); blocks.1 waits 80->90 and fetches blocks.0
    # (90->120); blocks.0 waits 110->120.
    p = make_profile(act=30 * MB, h2d=1.0, d2h=10.0)
    sim = build_sim(p)
    offload(sim, {"blocks.0", "blocks.1"})
    assert simulate(sim).time_breakdown["exposed transfer"] == pytest.approx(0.020)


def test_bf16_params_use_the_profiled_probe_and_scale_it_with_the_batch():
    # blocks of 100 MB saved at batch 8 under bf16 autocast, 10 MB of it autocast's copies of the 20 MB of
    # fp32 weights (fixed); the probe measured 60 MB with bf16 weights (no copies) for blocks.0-2
    p = make_profile(autocast="bfloat16")
    for b in p.repeated_blocks[:3]:
        b.activation_bytes_bf16_params = 60 * MB
    plan = plan_from_dict({"precision": {"params": "bf16"}})
    for batch, probed, other in ((8, 60, 90), (16, 120, 180)):
        sim = apply_plan_effects(p, plan, build_sim(p, batch))
        acts = {b.name: b.act_bytes for b in sim.blocks}
        assert [acts[f"blocks.{i}"] for i in range(3)] == [pytest.approx(probed * MB)] * 3
        assert acts["blocks.3"] == pytest.approx(other * MB)  # no probe: only the copies dropped
        assert all(b.autocast_copy_bytes == 0 for b in sim.blocks)
    base = estimate(p)
    est = estimate(p, plan)
    # at the loss: 3 x 40 + 10 MB fewer activations, half the block and other parameters
    drop = (3 * 40 + 10) * MB + p.param_bytes / 2
    assert dict(est.timeline)["loss"] == pytest.approx(dict(base.timeline)["loss"] - drop + p.param_bytes)


def test_bf16_params_probe_carries_to_a_block_that_saves_more_by_dtype():
    # the probe ran on blocks.0 (the first of its class); blocks.1 saves 20 MB more fp32 and 10 MB more bool
    # (a frozen base's first block, whose input needs no gradient, saves less): those 20 MB become 10 in bf16,
    # the bool stays
    p = make_profile(autocast="bfloat16")
    for b in p.repeated_blocks:
        b.activation_bytes_by_dtype = {"float32": 60 * MB, "bfloat16": 40 * MB}
        b.activation_bytes_bf16_params = 60 * MB
    b1 = p.repeated_blocks[1]
    b1.activation_bytes += 30 * MB
    b1.activation_bytes_by_dtype = {"float32": 80 * MB, "bfloat16": 40 * MB, "bool": 10 * MB}
    plan = plan_from_dict({"precision": {"params": "bf16"}})
    for batch, k in ((8, 1), (16, 2)):
        acts = {b.name: b.act_bytes for b in apply_plan_effects(p, plan, build_sim(p, batch)).blocks}
        assert acts["blocks.0"] == pytest.approx(60 * MB * k)
        assert acts["blocks.1"] == pytest.approx(80 * MB * k)


def test_a_compiled_model_takes_its_measured_peak_and_time_where_its_blocks_stay_compiled():
    # profiled eagerly at 1000 MB; compiled, the step peaked 160 MB lower and ran 20 ms faster: the blocks'
    # 4 x 100 MB of saved activations are 0.6 of the eager ones, their 120 ms of time 5/6
    p = make_profile(measured_peak=1_000 * MB)
    eager = estimate(p)
    p.extra["compiled"] = {"step_s": p.step_s - 0.020, "steps": 2, "peak_bytes": 840 * MB}
    est = estimate(p)
    assert est.peak_bytes == pytest.approx(840 * MB)
    assert est.step_s == pytest.approx(eager.step_s - 0.020)
    assert "torch.compile" in est.sources
    # two blocks checkpointed: the two kept compiled save 40 MB less each than eager
    ckpt = {"checkpoint": {"blocks": [0, 1]}}
    eager_ckpt = dict(estimate(make_profile(measured_peak=1_000 * MB), ckpt).timeline)["loss"]
    assert dict(estimate(p, ckpt).timeline)["loss"] == pytest.approx(eager_ckpt - 2 * 40 * MB)
    # a block offloaded is dynamo-disabled: the graph breaks and the model runs as eager code
    off = {"offload": {"activations": [0]}}
    assert estimate(p, off).peak_bytes == pytest.approx(estimate(make_profile(measured_peak=1_000 * MB), off).peak_bytes)


# --- the loss's forward: autocast's weight copies outlive checkpointed blocks' saved tensors ------------


def _with_forward_peak(gap, **kw):
    p = make_profile(autocast="bfloat16", measured_peak=1_000 * MB, **kw)
    at_loss = dict(estimate(p).timeline)["loss"]
    p.extra["forward_peak_bytes"] = int(at_loss - gap)  # as the profiler measures it: before backward
    return p, at_loss


def test_loss_forward_event_reproduces_the_measured_forward_peak():
    p, at_loss = _with_forward_peak(30 * MB)
    tl = dict(estimate(p).timeline)
    assert tl["loss forward"] == pytest.approx(at_loss - 30 * MB)  # unchanged step: the measured number
    assert estimate(p).peak_bytes == pytest.approx(1_000 * MB)
    # twice the batch: the gap is logit-sized and doubles
    tl16 = dict(estimate(p, batch_size=16).timeline)
    assert tl16["loss forward"] == pytest.approx(tl16["loss"] - 60 * MB)


def test_checkpointed_blocks_weight_copies_stay_until_the_loss_forward_ends():
    # 4 blocks of 20 MB fp32 weights: 10 MB of bf16 copies each, held by autocast's cache
    plan = plan_from_dict({"checkpoint": {"blocks": "all"}})
    p, _ = _with_forward_peak(30 * MB)
    est = estimate(p, plan)
    tl = dict(est.timeline)
    assert tl["loss forward"] == pytest.approx(tl["loss"] - 30 * MB + 40 * MB)
    sim = build_sim(p)
    checkpoint(sim, {f"blocks.{i}" for i in range(4)})
    comp = next(c for name, _, _, c in cm_timeline._memory(sim)[0] if name == "loss forward")
    assert comp["autocast weight copies"] == pytest.approx(40 * MB)
    # a gap wider than the copies (the loss's backward is the larger, as in a script's own loss): no change
    wide, _ = _with_forward_peak(50 * MB)
    tlw = dict(estimate(wide, plan).timeline)
    assert tlw["loss forward"] < tlw["loss"]
    # a profile that did not measure the forward's peak has no such event
    assert "loss forward" not in dict(estimate(make_profile(autocast="bfloat16", measured_peak=1_000 * MB),
                                               plan).timeline)


def test_16bit_weights_leave_no_copies_at_the_loss_forward():
    p, _ = _with_forward_peak(30 * MB)
    tl = dict(estimate(p, plan_from_dict({"checkpoint": {"blocks": "all"},
                                          "precision": {"params": "bf16"}})).timeline)
    assert tl["loss forward"] == pytest.approx(tl["loss"] - 30 * MB)


def test_the_block_after_an_offloaded_one_holds_it_in_its_backward():
    # the runtime fetches an offloaded block when the backward of the block that ran after it starts
    p = make_profile()
    sim = apply_plan_effects(p, plan_from_dict({"offload": {"activations": [0, 1]}}), build_sim(p))
    extra = {b.name: b.bwd_extra_bytes for b in sim.blocks}
    assert extra["blocks.3"] == 0 and extra["blocks.2"] == pytest.approx(100 * MB)  # blocks.1, every saved byte
    assert extra["blocks.1"] == pytest.approx(200 * MB) and extra["blocks.0"] == pytest.approx(100 * MB)
