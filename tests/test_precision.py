"""precision strategy: the same numbers as the recipe written by hand (torch.equal), state_dict round trip."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import memtune
from memtune.errors import PlanError
from memtune.strategies import plan_from_dict
from memtune.strategies.offload import simulate_host

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from gpt import GPT, synthetic_batch  # noqa: E402


def batches(n):
    gen = torch.Generator().manual_seed(0)
    return [synthetic_batch(4, 17, 64, gen) for _ in range(n)]


def loss_of(m, d, autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = m(d[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, 64), d[:, 1:].reshape(-1))


def by_hand(steps=3, autocast=False):
    """bf16 params, fp32 masters in AdamW, grads upcast, weights copied back: the recipe, written out."""
    torch.manual_seed(0)
    m = GPT(2, 32, 4, 16, 64)
    masters = [p.detach().clone() for p in m.parameters()]
    for p in m.parameters():
        p.data = p.data.to(torch.bfloat16)
    opt = torch.optim.AdamW(masters, lr=1e-2)
    losses = []
    for d in batches(steps):
        loss = loss_of(m, d, autocast)
        loss.backward()
        for p, w in zip(m.parameters(), masters, strict=True):
            w.grad = p.grad.float()
        opt.step()
        with torch.no_grad():
            for p, w in zip(m.parameters(), masters, strict=True):
                p.copy_(w)
        m.zero_grad()
        losses.append(loss.detach())
    return losses, m


def with_plan(plan, steps=3):
    torch.manual_seed(0)
    m = GPT(2, 32, 4, 16, 64)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    undo = memtune.apply_plan(m, opt, plan)
    sched = torch.optim.lr_scheduler.StepLR(opt, 100)  # created after: wraps the patched step
    losses = []
    for d in batches(steps):
        loss = loss_of(m, d)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses, m, opt, undo


def test_bf16_params_master_weights_match_recipe():
    ref_losses, ref = by_hand()
    losses, m, opt, undo = with_plan({"precision": {"params": "bf16"}})
    assert all(torch.equal(a, b) for a, b in zip(ref_losses, losses, strict=True))
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), m.parameters(), strict=True))
    assert opt.state[next(iter(m.parameters()))]["exp_avg"].dtype == torch.float32  # state stays fp32
    assert any("master weights" in n for _, n in undo.notes)


def test_bf16_params_with_offloaded_optimizer_match_recipe():
    ref_losses, ref = by_hand()
    with simulate_host():
        losses, m, _, undo = with_plan({"precision": {"params": "bf16"}, "offload": {"optimizer_state": True}})
    assert all(torch.equal(a, b) for a, b in zip(ref_losses, losses, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), m.parameters(), strict=True))
    assert any("on the host" in n for _, n in undo.notes)
    undo()  # the offload's global clip_grad_norm_ patch must not leak into later tests


def test_autocast_matches_script_autocast():
    torch.manual_seed(0)
    a = GPT(2, 32, 4, 16, 64)
    b = GPT(2, 32, 4, 16, 64)
    b.load_state_dict(a.state_dict())
    memtune.apply_plan(b, None, {"precision": {"autocast": "bf16"}})
    d = batches(1)[0]
    la, lb = loss_of(a, d, autocast=True), loss_of(b, d)
    la.backward()
    lb.backward()
    assert torch.equal(la, lb)
    assert all(torch.equal(x.grad, y.grad) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_state_dict_loads_without_memtune_and_undo_restores_fp32():
    _, m, opt, undo = with_plan({"precision": {"params": "bf16"}}, steps=1)
    keys = list(m.state_dict())
    fresh = GPT(2, 32, 4, 16, 64)
    fresh.load_state_dict(m.state_dict())  # bf16 values cast into the fp32 model
    assert list(fresh.state_dict()) == keys
    plain = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    plain.load_state_dict(opt.state_dict())
    undo()
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert "step" not in opt.__dict__


def test_no_master_weights_casts_state():
    losses, m, opt, _ = with_plan({"precision": {"params": "bf16", "master_weights": False}}, steps=2)
    assert opt.state[next(iter(m.parameters()))]["exp_avg"].dtype == torch.bfloat16


def test_lossy_label():
    assert plan_from_dict({"precision": {"params": "bf16"}}).lossy == ["precision"]
    assert plan_from_dict({"precision": {}}).lossy == []


@pytest.mark.parametrize("bad,msg", [
    ({"precision": {"autocast": "fp8"}}, "'fp8' is not allowed; choose one of: none, bf16, fp16"),
    ({"precision": {"params": "fp16"}}, "'fp16' is not allowed; choose one of: fp32, bf16"),
    ({"precision": {"dtype": "bf16"}}, "unknown key 'dtype'; allowed: autocast, params, master_weights"),
    ({"precision": {"params": "bf16", "master_weights": "yes"}}, "choose one of: true, false"),
    ({"precision": {"params": "bf16"}, "optimizer": {"name": "inbackward"}}, "optimizer inbackward updates the bf16"),
])
def test_validation_errors(bad, msg):
    with pytest.raises(PlanError, match=msg):
        plan_from_dict(bad)


def test_frozen_weights_get_no_master_copies():
    """A LoRA-style model: the frozen base is cast to bf16 without fp32 masters (only the adapters, which an
    optimizer trains, get them), and the cost model counts masters for trainable weights only."""
    import memtune
    from memtune.estimate import estimate
    from memtune.profilers.runner import profile_script  # noqa: F401  (the same package the CLI profiles with)

    torch.manual_seed(0)
    base = torch.nn.Linear(64, 64)
    base.requires_grad_(False)
    adapter = torch.nn.Sequential(torch.nn.Linear(64, 4, bias=False), torch.nn.Linear(4, 64, bias=False))
    model = torch.nn.ModuleDict({"base": base, "adapter": adapter})
    opt = torch.optim.AdamW(list(model.parameters()), lr=1e-3)  # frozen params passed in too, as scripts do
    undo = memtune.apply_plan(model, opt, {"precision": {"params": "bf16"}})
    masters = undo.ctx.notes
    assert base.weight.dtype == torch.bfloat16 and adapter[0].weight.dtype == torch.bfloat16
    wrapped = [v for k, v in opt.__dict__.items() if k == "step"]
    assert wrapped, "the trained weights' update runs on fp32 masters"
    assert any("frozen ones without masters" in t for _, t in masters)
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    (model["base"](x) + model["adapter"](x)).float().pow(2).mean().backward()
    opt.step()
    assert base.weight.grad is None
    undo()
    assert base.weight.dtype == torch.float32
    # the cost model: masters for the trainable bytes only
    from test_costmodel import make_profile

    p = make_profile()
    p.trainable_param_bytes = p.param_bytes // 10
    sim = estimate(p, {"precision": {"params": "bf16"}})
    assert sim.breakdown["master weights"] == pytest.approx(p.trainable_param_bytes)


class _RNNLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.rnn = torch.nn.LSTM(16, 16, 2)
        self.head = torch.nn.Linear(16, 50)

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0])


def test_cpu_autocast_of_an_rnn_is_refused_in_one_line():
    # torch's CPU autocast leaves an LSTM's hidden state fp32 and oneDNN refuses the mix: the plan says so
    # instead of the script's forward failing inside torch
    model = _RNNLM()
    with pytest.raises(PlanError, match="cannot run this model's LSTM"):
        memtune.apply_plan(model, None, {"precision": {"autocast": "bf16"}})
    assert model(torch.randint(50, (5, 2))).dtype == torch.float32  # nothing left applied


def test_tune_does_not_propose_cpu_autocast_for_an_rnn():
    import optuna

    from memtune.strategies.context import SearchOptions
    from memtune.strategies.precision import Precision

    class _P:
        autocast = None
        blocks = [type("B", (), {"cls": "LSTM"})()]

    seen = set()
    for i in range(20):
        trial = optuna.trial.FixedTrial({"precision.autocast": "bf16", "precision.params": ["fp32", "bf16"][i % 2]})
        got = Precision().space(trial, _P(), None, SearchOptions(device="cpu"))
        seen.add(None if got is None else got["autocast"])
    assert "bf16" not in seen


def test_measured_slow_16bit_matmuls_are_charged_and_fast_ones_under_autocast_only():
    """A CPU without bf16 units measured 16-bit matmuls 25x slower than fp32 (the CI host): bf16 autocast and
    bf16 weights are charged that; a GPU's faster bf16 speeds up autocast and leaves bf16 weights alone."""
    from test_costmodel import make_profile

    from memtune.estimate import estimate
    from memtune.strategies import plan_from_dict

    def step(p, plan):
        return estimate(p, plan_from_dict(plan)).step_s

    cpu = make_profile(device="cpu")
    cpu.hardware.matmul_tflops = {"fp32": 0.033, "bf16": 0.0013}
    base = step(cpu, {})
    assert step(cpu, {"precision": {"autocast": "bf16"}}) > 10 * base
    assert step(cpu, {"precision": {"params": "bf16"}}) > 10 * base
    gpu = make_profile()
    gpu.hardware.matmul_tflops = {"fp32": 50.0, "bf16": 700.0}
    base = step(gpu, {})
    assert step(gpu, {"precision": {"autocast": "bf16"}}) < 0.5 * base
    assert step(gpu, {"precision": {"params": "bf16"}}) == pytest.approx(base, rel=0.05)


def test_bf16_params_leave_batch_norms_fp32_so_a_cpu_convnet_trains_under_autocast():
    """bf16 weights beside fp32 running statistics: torch's CPU batch_norm refuses the mix (the zoo's GAN,
    tuned with bf16 weights + autocast, crashed in apply). The norms keep fp32 weights; the convs go bf16."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.LeakyReLU(0.2),
                            torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 1))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    undo = memtune.apply_plan(m, opt, {"precision": {"autocast": "bf16", "params": "bf16"}})
    try:
        assert m[0].weight.dtype == torch.bfloat16 and m[1].weight.dtype == torch.float32
        x = torch.randn(4, 3, 8, 8)
        for _ in range(2):
            loss = m(x).float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        assert torch.isfinite(loss)
    finally:
        undo()
    assert m[0].weight.dtype == torch.float32
