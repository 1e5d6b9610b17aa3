"""patcher: apply order, undo, argv knobs, and the optimizer-step helpers the strategies share."""

import sys
from pathlib import Path

import pytest
import torch

import memtune
from memtune.errors import InputError, PlanError
from memtune.optim.stepping import raw_step, step_on, wrap_step
from memtune.patcher import apply_knobs, resolve_run
from memtune.strategies import load_plan, plan_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from gpt import GPT  # noqa: E402


def test_apply_plan_accepts_dict_yaml_and_plan(tmp_path):
    p = tmp_path / "plan.yaml"
    p.write_text("checkpoint: {blocks: [0]}\n")
    for plan in ({"checkpoint": {"blocks": [0]}}, str(p), load_plan(p)):
        m = GPT(2, 32, 4, 16, 64)
        undo = memtune.apply_plan(m, torch.optim.SGD(m.parameters(), lr=0.1), plan)
        assert "forward" in m.blocks[0].__dict__ and "forward" not in m.blocks[1].__dict__
        undo()
        assert "forward" not in m.blocks[0].__dict__


def test_blocks_glob_overrides_detection():
    m = GPT(2, 32, 4, 16, 64)
    memtune.apply_plan(m, None, {"checkpoint": {"blocks": "all"}}, blocks="blocks.*.mlp")
    assert "forward" in m.blocks[1].mlp.__dict__ and "forward" not in m.blocks[1].__dict__


def test_failure_midway_undoes_what_was_applied():
    m = GPT(2, 32, 4, 16, 64)
    opt = torch.optim.AdamW(m.parameters())
    # precision applies (order 20), then checkpoint fails on a missing block: precision must be undone
    with pytest.raises(PlanError, match="no block 'nope'"):
        memtune.apply_plan(m, opt, {"precision": {"params": "bf16"}, "checkpoint": {"blocks": ["nope"]}})
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert "step" not in opt.__dict__


def test_strategy_order_is_fixed():
    m = GPT(2, 32, 4, 16, 64)
    undo = memtune.apply_plan(m, torch.optim.AdamW(m.parameters()),
                              {"checkpoint": {"blocks": [1]}, "precision": {"autocast": "bf16"}})
    assert [s for s, _ in undo.notes] == ["precision", "checkpoint"]


def test_step_hooks_fire_once_per_step_and_scheduler_sees_it():
    m = GPT(2, 32, 4, 16, 64)
    opt = torch.optim.AdamW(m.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)  # created BEFORE the patch
    seen = []
    from torch.optim.optimizer import register_optimizer_step_post_hook

    h = register_optimizer_step_post_hook(lambda *a: seen.append(1))
    try:
        memtune.apply_plan(m, opt, {"precision": {"params": "bf16"}})
        m(torch.randint(64, (2, 8))).float().sum().backward()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
            opt.step()
            sched.step()
    finally:
        h.remove()
    assert seen == [1]
    assert opt.param_groups[0]["lr"] == 0.5


def test_step_on_keeps_state_keyed_by_real_params():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=0.1)
    sub = torch.ones(3)
    sub.grad = torch.ones(3)
    step_on(opt, {id(p): sub})
    assert p in opt.state and opt.state[p]["exp_avg"].shape == (3,)
    assert torch.equal(p.detach(), torch.ones(3)) and not torch.equal(sub, torch.ones(3))
    assert opt.param_groups[0]["params"][0] is p
    assert raw_step(opt) is not type(opt).step  # the hook layer is skipped


def test_wrap_step_undo_restores_previous():
    p = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=0.1)
    calls = []
    undo = wrap_step(opt, lambda o, closure=None: calls.append(1))
    opt.step()
    undo()
    p.grad = torch.ones(1)
    opt.step()
    assert calls == [1] and torch.allclose(p.detach(), torch.tensor([0.9]))


@pytest.mark.parametrize("argv,knobs,want", [
    (["--batch-size", "8", "--steps", "3"], {"--batch-size": 16}, ["--batch-size", "16", "--steps", "3"]),
    (["--batch-size=8"], {"--batch-size": 16}, ["--batch-size=16"]),
    ([], {"--seq-len": 128}, ["--seq-len", "128"]),
    (["--compile"], {"--compile": False, "--amp": True}, ["--amp"]),
])
def test_knobs_replace_argv(argv, knobs, want):
    assert apply_knobs(argv, knobs) == want


def test_knob_must_be_a_flag():
    with pytest.raises(PlanError, match="not a flag"):
        apply_knobs([], {"batch_size": 4})


def test_resolve_run_order():
    plan = plan_from_dict({"run": {"script": "a.py", "argv": ["--x", "1"], "knobs": {"--x": 2}}})
    assert resolve_run(plan, None, None) == ("a.py", None, ["--x", "2"])
    assert resolve_run(plan, "b.py", ["--y"]) == ("b.py", None, ["--y", "--x", "2"])
    with pytest.raises(InputError, match="names no script"):
        resolve_run(plan_from_dict({}), None, None)


def test_unknown_section_lists_strategies():
    with pytest.raises(PlanError, match="unknown section 'chekpoint'.*checkpoint"):
        plan_from_dict({"chekpoint": {"blocks": "all"}})


def _profile_and_sim(n=4):
    from memtune.costmodel import BlockSim, SimStep
    from memtune.profile import BlockProfile, OptimizerProfile, Profile

    blocks = [BlockProfile(name=f"blocks.{i}", cls="Block", index=i + 1, param_bytes={"float32": 400},
                           activation_bytes=1000, input_bytes=100, fwd_s=1.0, bwd_s=2.0) for i in range(n)]
    blocks = [BlockProfile(name="tok", cls="Embedding", kind="other", param_bytes={"float32": 400}), *blocks]
    prof = Profile(blocks=blocks, trainable_param_bytes=2000, param_bytes=2000,
                   optimizers=[OptimizerProfile(cls="torch.optim.adamw.AdamW", kind="adamw", n_params=500)])
    sim = SimStep(blocks=[BlockSim(name=b.name, kind=b.kind, act_bytes=b.activation_bytes, input_bytes=b.input_bytes,
                                   fwd_s=b.fwd_s, bwd_s=b.bwd_s, param_bytes=400, grad_bytes=400) for b in blocks],
                  param_bytes=2000, grad_bytes=2000, opt_state_bytes=4000, h2d_gbps=50, d2h_gbps=50)
    return prof, sim


def test_effects_set_the_simulator_fields():
    from memtune.strategies import get_strategy

    prof, sim = _profile_and_sim()
    get_strategy("precision").effect(prof, get_strategy("precision").validate({"autocast": "none", "params": "bf16", "master_weights": True}), sim)
    get_strategy("checkpoint").effect(prof, get_strategy("checkpoint").validate({"blocks": [3], "mode": "full"}), sim)
    get_strategy("offload").effect(prof, get_strategy("offload").validate({"activations": ["0-1"], "optimizer_state": True}), sim)
    by = {b.name: b for b in sim.blocks}
    assert (by["blocks.3"].mode, by["blocks.3"].kept_bytes, by["blocks.3"].recompute_s) == ("recompute", 100, 1.0)
    assert (by["blocks.0"].mode, by["blocks.0"].kept_bytes, by["blocks.0"].d2h_bytes) == ("offload", 0, 1000)
    assert by["blocks.2"].mode == "keep" and by["tok"].mode == "keep"
    assert sim.param_bytes == 1000 and sim.grad_bytes == 1000
    assert sim.opt_state_bytes == 0 and sim.master_bytes == 0 and sim.opt_state_host_bytes == 4000 + 2000
    assert sim.opt_s > 0 and "precision" in sim.lossy


def test_search_spaces_make_valid_plans():
    optuna = pytest.importorskip("optuna")
    from memtune.strategies import SearchOptions, get_strategy
    from memtune.tune.space import propose_plan

    prof, _ = _profile_and_sim(6)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        try:
            plan, _ = propose_plan(trial, prof, SearchOptions(device="cuda"), {}, None, [])  # validated
        except PlanError as e:  # rules between other sections (e.g. inbackward vs master weights) may refuse
            assert "given two modes" not in str(e), e  # never the per-block layout: one layout per trial
            study.tell(trial, 0.0)
            continue
        for name in ("checkpoint", "offload", "compress"):
            cfg = plan.get(name)
            if cfg is not None and (name != "offload" or cfg.activations):
                # each block strategy took its blocks from the trial's one layout
                assert get_strategy(name).block_modes(cfg)
        study.tell(trial, 0.0)
    cpu = study.ask()
    assert get_strategy("offload").space(cpu, prof, None, SearchOptions(device="cpu")) is None
    assert get_strategy("precision").space(cpu, prof, None, SearchOptions(lossless_only=True)) is None


def test_lbfgs_refused_for_stand_in_updates():
    from memtune.strategies.offload import simulate_host

    m = GPT(2, 32, 4, 16, 64)
    opt = torch.optim.LBFGS(m.parameters())
    with simulate_host(), pytest.raises(PlanError, match="cannot drive torch.optim.lbfgs.LBFGS"):
        memtune.apply_plan(m, opt, {"offload": {"optimizer_state": True}})
    assert "step" not in opt.__dict__
    with pytest.raises(PlanError, match="precision.master_weights cannot drive"):
        memtune.apply_plan(m, opt, {"precision": {"params": "bf16"}})
    assert all(p.dtype == torch.float32 for p in m.parameters())  # undone
