"""Sharding strategy: plan validation, cost-model effect, DDP take-over, and every stage for real on CPU/gloo
through torchrun with 2 processes (tests/dist/sharding_worker.py) against the single-process run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from memtune.costmodel import BlockSim, SimStep
from memtune.errors import EnvironmentNotSupported, PlanError
from memtune.profile import Hardware, Profile
from memtune.strategies import SearchOptions, get_strategy, make_context, plan_from_dict

ROOT = Path(__file__).resolve().parents[1]
S = get_strategy("sharding")


# --- plan ----------------------------------------------------------------------------------------

def test_validate_normalizes_and_names_bad_keys():
    assert S.validate({"stage": 2}).to_dict() == {"stage": 2}
    assert S.validate(3).to_dict() == {"stage": 3}
    assert S.validate({"stage": 3, "offload": True}).to_dict() == {"stage": 3, "offload": True}
    assert plan_from_dict({"sharding": {"stage": 1}}).get("sharding").to_dict() == {"stage": 1}
    with pytest.raises(PlanError, match="unknown key 'stages'"):
        S.validate({"stages": 2})
    with pytest.raises(PlanError, match="`stage` is required"):
        S.validate({})
    with pytest.raises(PlanError, match="choose one of: 1, 2, 3"):
        S.validate({"stage": 4})
    with pytest.raises(PlanError, match="needs stage 2 or 3"):
        S.validate({"stage": 1, "offload": True})
    assert "ZeRO-3" in S.validate({"stage": 3}).describe()


# --- refusal without a process group ------------------------------------------------------------

def test_stage_without_process_group_is_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for stage in (1, 2, 3):
        ctx = make_context(model, [opt], [], torch.device("cpu"), plan_from_dict({"sharding": {"stage": stage}}))
        with pytest.raises(EnvironmentNotSupported, match="more than one rank.*torchrun --nproc-per-node"):
            S.apply(ctx, S.validate({"stage": stage}))
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(EnvironmentNotSupported, match="WORLD_SIZE=1"):
        S.install(S.validate({"stage": 2}), None)  # before the script even starts
    assert isinstance(opt, torch.optim.SGD) and type(opt) is torch.optim.SGD  # untouched


# --- DDP take-over (no process group needed: the stand-in returns before DDP's __init__) ----------

def test_install_replaces_the_scripts_ddp_wrapping(monkeypatch):
    import torch.nn.parallel as par

    from memtune.strategies.sharding import _INTERCEPTED

    real = par.DistributedDataParallel
    monkeypatch.setenv("WORLD_SIZE", "2")
    undo = S.install(S.validate({"stage": 1}), None)  # stage 1 keeps the real DDP, only records what it wraps
    assert issubclass(par.DistributedDataParallel, real) and par.DistributedDataParallel is not real
    undo()
    assert par.DistributedDataParallel is real
    undo = S.install(S.validate({"stage": 3}), None)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP  # as the script imports it

        model = nn.Linear(4, 4)
        wrapped = DDP(model, device_ids=None, find_unused_parameters=True)
        assert wrapped is model
        assert model.module is model  # scripts that reach for .module keep working
        assert "module" not in dict(model.named_modules()) and list(model.state_dict()) == ["weight", "bias"]
        with model.no_sync():
            pass
        assert model in _INTERCEPTED and _INTERCEPTED[model]["process_group"] is None
        assert isinstance(model, nn.Module) and not isinstance(model, real)
        assert issubclass(DDP, real)  # isinstance(x, DDP) in a script stays valid
    finally:
        undo()
    assert par.DistributedDataParallel is real
    assert torch.nn.parallel.distributed.DistributedDataParallel is real


def test_policies_follow_the_plans_offload_and_precision_sections():
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    from memtune.strategies.sharding import _policies

    model = nn.Linear(4, 4)
    plan = plan_from_dict({"sharding": {"stage": 3}, "precision": {"params": "bf16"},
                          "offload": {"optimizer_state": True}})
    ctx = make_context(model, [], [], torch.device("cuda"), plan)
    kwargs, said = _policies(ctx, plan.get("sharding"), 3)
    assert isinstance(kwargs["offload_policy"], CPUOffloadPolicy)
    assert isinstance(kwargs["mp_policy"], MixedPrecisionPolicy)
    assert kwargs["mp_policy"].param_dtype == torch.bfloat16 and kwargs["mp_policy"].reduce_dtype == torch.float32
    assert len(said) == 2
    model.to(torch.bfloat16)  # the precision section already cast the parameters: no second cast
    plan = plan_from_dict({"sharding": {"stage": 2, "offload": True}, "precision": {"params": "bf16"}})
    ctx = make_context(model, [], [], torch.device("cpu"), plan)
    kwargs, said = _policies(ctx, plan.get("sharding"), 2)
    assert kwargs == {} and any("already on the host" in s for s in said)


# --- cost model ------------------------------------------------------------------------------------

def _sim(n_blocks=4, p=1000.0, other=400.0, state=2000.0, fwd=1e-3):
    blocks = [BlockSim("emb", "other", param_bytes=other, grad_bytes=other, fwd_s=fwd, bwd_s=2 * fwd)]
    blocks += [BlockSim(f"blocks.{i}", param_bytes=p, grad_bytes=p, fwd_s=fwd, bwd_s=2 * fwd) for i in range(n_blocks)]
    total = n_blocks * p + other
    return SimStep(blocks=blocks, param_bytes=total, grad_bytes=total, opt_state_bytes=state,
                   opt_transient_bytes=100.0, opt_s=0.01)


def _profile(ws, gbps=100.0):
    return Profile(world_size=ws, hardware=Hardware(world_size=ws, allgather_gbps=gbps, reduce_scatter_gbps=gbps))


@pytest.mark.parametrize("ws", [2, 4, 8])
def test_effect_per_rank_model_states_follow_zero(ws):
    total, p, other = 4400.0, 1000.0, 400.0
    s1 = _sim()
    S.effect(_profile(ws), S.validate({"stage": 1}), s1)
    assert (s1.param_bytes, s1.grad_bytes) == (total, total)
    assert s1.opt_state_bytes == pytest.approx(2000 / ws) and s1.opt_s == pytest.approx(0.01 / ws)
    assert s1.comm_s == pytest.approx(total * (ws - 1) / ws / 100e9)  # post-step all-gather, not hidden
    s2 = _sim()
    S.effect(_profile(ws), S.validate({"stage": 2}), s2)
    assert s2.param_bytes == pytest.approx(total / ws + total)  # shards + gathered fwd->bwd
    assert s2.grad_bytes == pytest.approx(total / ws) and s2.opt_state_bytes == pytest.approx(2000 / ws)
    assert all(b.gather_bytes == 0 for b in s2.blocks)
    s3 = _sim()
    S.effect(_profile(ws), S.validate({"stage": 3}), s3)
    assert s3.param_bytes == pytest.approx(total / ws + other)  # shards + the root group kept gathered
    assert [b.gather_bytes for b in s3.blocks] == [0, 2 * p, 2 * p, 2 * p, p]  # own + the next prefetched
    assert s3.blocks[1].bwd_transient == p and s3.blocks[1].grad_bytes == pytest.approx(p / ws)
    assert s3.comm_s >= s2.comm_s > 0  # stage 3 gathers again for the backward


def test_effect_communication_hides_behind_compute_until_the_link_is_slow():
    fast, slow = _sim(), _sim()
    S.effect(_profile(2, gbps=100.0), S.validate({"stage": 3}), fast)
    S.effect(_profile(2, gbps=1e-3), S.validate({"stage": 3}), slow)
    # exposed on a fast link: the root's gather and reduce-scatter and the last block's backward gather
    # (nothing runs before them); bytes moved = (n - 1) / n of each
    assert fast.comm_s == pytest.approx((200 + 200 + 500) / 100e9)
    # 1 MB/s: a 1000-byte block gather (500 bytes moved) takes 0.5 ms < 1 ms forward -> still hidden in
    # forward; in backward gather + reduce-scatter (1 ms) hide behind 2 ms; so only edges are exposed
    assert slow.comm_s > fast.comm_s
    assert any("communication not hidden" in n for n in slow.notes)


def test_effect_world_size_one_and_unmeasured_bandwidth_say_so():
    sim = _sim()
    S.effect(Profile(), S.validate({"stage": 3}), sim)
    assert sim.param_bytes == 4400 and any("world size 1" in n for n in sim.notes)
    sim = _sim()
    S.effect(Profile(world_size=2, hardware=Hardware(world_size=2)), S.validate({"stage": 2}), sim)
    assert any("not measured" in n for n in sim.notes) and sim.comm_s > 0
    sim = _sim()
    S.effect(_profile(2), S.validate({"stage": 3, "offload": True}), sim)
    assert sim.opt_state_bytes == 0 and sim.opt_state_host_bytes == pytest.approx(1000)
    assert sim.param_bytes == pytest.approx(400) and sim.opt_h2d_bytes == pytest.approx(2200)


def test_estimate_per_rank_peak_falls_with_each_stage():
    """Through the real cost model (build_sim -> effect -> simulate) on a 4-rank AdamW profile."""
    from memtune.costmodel import build_sim, simulate
    from memtune.profile import BlockProfile, Peak

    mb = 2**20
    blocks = [BlockProfile("emb", "Embedding", "other", 0, {"float32": 50 * mb}, 50 * mb, activation_bytes=8 * mb,
                           fwd_s=1e-3, bwd_s=2e-3)]
    blocks += [BlockProfile(f"blocks.{i}", "Block", "repeated", i + 1, {"float32": 100 * mb}, 100 * mb,
                            activation_bytes=40 * mb, input_bytes=8 * mb, fwd_s=5e-3, bwd_s=1e-2) for i in range(8)]
    p = 850 * mb
    prof = Profile(blocks=blocks, param_bytes=p, trainable_param_bytes=p, grad_bytes=p, optimizer_state_bytes=2 * p,
                   world_size=4, peak=Peak(measured=False), step_s=0.2, batch_size=8,
                   hardware=Hardware(device="cuda", world_size=4, allgather_gbps=100.0, reduce_scatter_gbps=100.0))
    peaks, comm = [], []
    for stage in (None, 1, 2, 3):
        sim = build_sim(prof)
        if stage:
            S.effect(prof, S.validate({"stage": stage}), sim)
        est = simulate(sim)
        peaks.append(est.peak_bytes)
        comm.append(est.time_breakdown.get("communication", 0.0))
    assert peaks[0] > peaks[1] > peaks[2] > peaks[3]
    assert comm[0] == 0 and all(c > 0 for c in comm[1:])


def test_space_offers_stages_only_with_several_ranks():
    optuna = pytest.importorskip("optuna")
    assert S.space(optuna.trial.FixedTrial({"sharding.stage": 3}), Profile(), None, SearchOptions()) is None
    two = Profile(world_size=2)
    assert S.space(optuna.trial.FixedTrial({"sharding.stage": 0}), two, None, SearchOptions()) is None
    assert S.space(optuna.trial.FixedTrial({"sharding.stage": 1}), two, None, SearchOptions(device="cpu")) == {"stage": 1}
    got = S.space(optuna.trial.FixedTrial({"sharding.stage": 3, "sharding.offload": True}), Profile(), None,
                  SearchOptions(world_size=4))
    assert got == {"stage": 3, "offload": True}


# --- for real: torchrun, 2 processes, gloo ---------------------------------------------------------

def _torchrun(worker: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "tests" / "dist" / worker), str(out)],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def torchrun_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding")
    proc = _torchrun("sharding_worker.py", out)
    return json.loads((out / "results.json").read_text()), proc.stderr


@pytest.mark.parametrize("stage", ["1", "2", "3"])
def test_each_stage_trains_like_the_single_process_run(torchrun_results, stage):
    res, stderr = torchrun_results
    ref, got = res["reference"], res["stages"][stage]
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-6, atol=1e-6)
    assert got["steps_counted"] == 4  # the local optimizer's step is not counted as a second step
    assert got["lr"] == pytest.approx(ref["lr"])  # the script's scheduler drives the sharded optimizer
    assert "overridden after learning rate scheduler" not in stderr
    full = got["full_state"]  # gathered with get_model_state_dict(full_state_dict=True)
    assert set(full) == set(ref["full_state"])
    for k, v in ref["full_state"].items():  # Adam turns summation-order noise in near-zero grads into
        # differences of ~3e-6 (lr 1e-2); losses agree to 1e-6
        torch.testing.assert_close(torch.tensor(full[k]), torch.tensor(v), rtol=1e-5, atol=1e-5)
    assert got["sharded_checkpoint_loads_unsharded"] is True


def test_ddp_wrapping_replaced_for_fsdp_stages_kept_for_zero1(torchrun_results):
    st = torchrun_results[0]["stages"]
    assert not st["1"]["ddp_replaced"] and st["1"]["model_is_ddp"] == "DistributedDataParallel"
    assert st["1"]["optimizer_class"] == "ZeroRedundancyOptimizer"  # the script's optimizer object, swapped
    for s in ("2", "3"):
        assert st[s]["ddp_replaced"] and st[s]["model_is_ddp"].startswith("FSDP")
        assert st[s]["optimizer_class"] == "AdamW"
        assert any("re-pointed" in text for _, text in st[s]["notes"])


@pytest.mark.parametrize("stage", ["1", "2", "3"])
def test_predicted_per_rank_model_states_match_the_run(torchrun_results, stage):
    got = torchrun_results[0]["stages"][stage]
    pred = got["predicted"]
    for mem in got["mem"]:  # each rank
        assert mem["param_bytes_at_fwd_end"] == pred["param_bytes"]
        assert mem["grad_bytes"] == pred["grad_bytes"]
        # per-parameter `step` scalars are replicated, not sharded (68 bytes here); ZeRO-1 partitions whole
        # parameters greedily, so its ranks differ slightly
        assert mem["opt_state_bytes"] == pytest.approx(pred["opt_state_bytes"], rel=1e-3)
    if stage == "1":
        full_state = 2 * pred["opt_state_bytes"]
        assert sum(m["opt_state_bytes"] for m in got["mem"]) == pytest.approx(full_state)
    if stage == "3":  # inside a block: its own parameters gathered (the prefetched next one is GPU-only)
        # pred["gather_bytes"][3] is the last block's: nothing is prefetched after it
        assert got["mem"][0]["max_gathered_in_block"] == pred["gather_bytes"][3]


def test_collective_bandwidth_is_measured(torchrun_results):
    coll = torchrun_results[0]["collectives"]
    assert coll["allgather_gbps"] > 0 and coll["reduce_scatter_gbps"] > 0


def test_unchanged_ddp_script_through_the_patcher(torchrun_results, tmp_path):
    """tests/dist/ddp_train.py (its own init_process_group, DDP(model), AdamW, scheduler) run by
    memtune.patcher.run_apply under torchrun, as `memtune apply` does: same losses, 4 steps counted."""
    _torchrun("apply_worker.py", tmp_path)
    res = json.loads((tmp_path / "apply.json").read_text())
    ref = torchrun_results[0]["reference"]["losses"]
    for stage, want_model, want_opt in (("1", "DistributedDataParallel", "ZeroRedundancyOptimizer"),
                                        ("2", "FSDPTiny", "AdamW"), ("3", "FSDPTiny", "AdamW")):
        got = res[stage]
        assert got["failure"] is None and got["steps"] == 4
        assert (got["script"]["model"], got["script"]["optimizer"]) == (want_model, want_opt)
        torch.testing.assert_close(torch.tensor(got["script"]["losses"]), torch.tensor(ref), rtol=1e-6, atol=1e-6)
        assert got["notes"][0][0] == "sharding"
