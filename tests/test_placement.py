"""placement: the script's `model.to("cuda")` waits until the plan placed each tensor.

This machine's torch has no CUDA, so an unpatched `.to("cuda")` raises; the tests show the patch takes the
call instead, and they map the final move onto the CPU (`placement._resolve`) to watch what it moves: the
16-bit weights and fp32 rest only, never the fp32 matmul weights (they became the host masters, the very
tensors the script built), never a streamed block's weights. The training gives the unpatched run's numbers.
"""

import json
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import memtune
from memtune.blocks import find_blocks
from memtune.patcher import apply_to_context, run_apply, run_device
from memtune.strategies import get_strategy, make_context, plan_from_dict
from memtune.strategies import placement as pl
from memtune.strategies.offload import simulate_host

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from gpt import GPT  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def on_cpu(monkeypatch):
    """Deferred moves to "cuda" end on the CPU; records (dtype, storage pointer) of what each move carried."""
    moved = []
    real = pl._move

    def move(module, device, non_blocking=False):
        moved.append([(n, p.dtype, p.numel(), p.untyped_storage().data_ptr()) for n, p in module.named_parameters()])
        return real(module, device, non_blocking)

    monkeypatch.setattr(pl, "_resolve", lambda d: torch.device("cpu"))
    monkeypatch.setattr(pl, "_move", move)
    yield moved


def install(plan, ready=False):
    session = types.SimpleNamespace(ready=ready)
    return get_strategy("placement").install(plan.get("placement"), session), session


PLAN = {"placement": {"defer": True, "min_mib": 0}, "precision": {"params": "bf16", "cast": "autocast"},
        "checkpoint": {"blocks": "all"},
        "offload": {"optimizer_state": True, "gradients": True, "params": [1, 2]}}


@pytest.mark.skipif(HAS_CUDA, reason="shows the interception through a CUDA-less torch's error")
def test_to_cuda_is_taken_and_the_plan_places_each_tensor(on_cpu):
    plan = plan_from_dict(PLAN)
    undo, session = install(plan)
    try:
        torch.manual_seed(0)
        m = GPT(3, 32, 4, 16, 64)
        built = {n: p.untyped_storage().data_ptr() for n, p in m.named_parameters()}
        assert m.to("cuda") is m and m.cuda() is m  # without the patch: "Torch not compiled with CUDA"
        assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in m.parameters())
        assert pl.target_device_of(m) == torch.device("cpu")  # (cuda, mapped)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        session.ready = True
        with simulate_host():
            dev = run_device(plan, m)
            ctx = make_context(m, [opt], find_blocks(m), dev, plan)
            applied = apply_to_context(ctx)
        # the host masters are the script's own fp32 tensors (no copy of 4 bytes per weight)
        masters = ctx.master_params
        qkv = m.blocks[0].attn.qkv.weight
        assert masters[id(qkv)].untyped_storage().data_ptr() == built["blocks.0.attn.qkv.weight"]
        # one deferred move: 16-bit matmul weights, fp32 embeddings and norms, placeholders for streamed blocks
        (carried,) = on_cpu
        kinds = {n: (dt, numel) for n, dt, numel, _ in carried}
        assert kinds["blocks.0.attn.qkv.weight"][0] == torch.bfloat16
        assert kinds["tok.weight"][0] == torch.float32 and kinds["blocks.0.ln1.weight"][0] == torch.float32
        assert kinds["blocks.1.attn.qkv.weight"][1] == 0 and kinds["blocks.2.mlp.fc.weight"][1] == 0
        assert not any(dt == torch.float32 and numel and "attn" in n for n, (dt, numel) in kinds.items())
        assert any("deferred" in t for s, t in applied.notes if s == "placement")
        applied()
    finally:
        undo()
    assert nn.Module.to.__qualname__ == "Module.to" and not hasattr(nn.Module.to, "__wrapped__")


class _Wrapper(nn.Module):
    """What peft's get_peft_model does after the script's move: a module around the model, adapters inside."""

    def __init__(self, model):
        super().__init__()
        self.base_model = model
        self.head_adapter = nn.Linear(4, 4)
        model.blocks[0].attn.adapter = nn.Linear(32, 4)


@pytest.mark.skipif(HAS_CUDA, reason="shows the interception through a CUDA-less torch's error")
def test_a_wrapper_built_around_the_deferred_model_is_placed_with_it(on_cpu):
    plan = plan_from_dict({"placement": {"defer": True, "min_mib": 0}})
    undo, session = install(plan)
    try:
        m = GPT(2, 32, 4, 16, 64)
        m.to("cuda", torch.bfloat16)
        wrapped = _Wrapper(m)
        assert pl.target_device_of(wrapped) == torch.device("cpu")  # (cuda, mapped): found from the wrapper
        opt = torch.optim.AdamW([p for n, p in wrapped.named_parameters() if "adapter" in n], lr=1e-2)
        session.ready = True
        ctx = make_context(wrapped, [opt], find_blocks(wrapped), run_device(plan, wrapped), plan)
        applied = apply_to_context(ctx)
        (carried,) = on_cpu  # one move, of the wrapper: the base and both adapters
        names = {n for n, *_ in carried}
        assert {"head_adapter.weight", "base_model.blocks.0.attn.adapter.weight"} <= names
        assert any("deferred" in t for s, t in applied.notes if s == "placement")
        applied()
    finally:
        undo()


@pytest.mark.skipif(HAS_CUDA, reason="needs the CUDA-less error to tell a real move")
def test_small_modules_and_moves_after_the_plan_go_through(on_cpu):
    plan = plan_from_dict({"placement": {"defer": True, "min_mib": 1}})
    undo, session = install(plan)
    try:
        small = nn.Linear(4, 4)
        with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
            small.to("cuda")  # below min_mib: moved as written (and this torch cannot)
        big = nn.Linear(1024, 1024)  # 4 MiB
        assert big.to("cuda") is big and pl.target_device_of(big) is not None
        assert big.to(torch.float64) is big and big.weight.dtype == torch.float64  # not a move: as written
        big.to("cuda", torch.float16)  # a move with a dtype: the dtype now, on the host
        assert big.weight.dtype == torch.float16 and big.weight.device.type == "cpu"
        session.ready = True
        other = nn.Linear(1024, 1024)
        with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
            other.to("cuda")  # after the plan: untouched
    finally:
        undo()


def test_a_deferred_module_used_before_the_plan_is_moved_then(on_cpu):
    plan = plan_from_dict({"placement": {"defer": True, "min_mib": 0}})
    undo, _ = install(plan)
    try:
        m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        m.to("cuda")
        assert pl.target_device_of(m) is not None
        m(torch.randn(3, 8))  # a forward before any optimizer: moved as the script asked
        assert len(on_cpu) == 1 and pl.target_device_of(m) is None
    finally:
        undo()


SCRIPT = '''
import json, sys, torch
import torch.nn.functional as F
sys.path.insert(0, {examples!r})
from gpt import GPT, synthetic_batch
move = "--move" in sys.argv
torch.manual_seed(0)
m = GPT(3, 32, 4, 16, 64)
if move:
    m.to("cuda")  # the usual script; here (no CUDA) only placement can make it work
opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
gen = torch.Generator().manual_seed(0)
losses = []
for step in range(20):
    for _ in range(2):
        d = synthetic_batch(4, 17, 64, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(m(d[:, :-1]).float().reshape(-1, 64), d[:, 1:].reshape(-1))
        (loss / 2).backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1)
    opt.step()
    sched.step()
    opt.zero_grad()
    losses.append(loss.item())
json.dump(losses, open({out!r}, "w"))
'''


@pytest.mark.skipif(HAS_CUDA, reason="the script's .to('cuda') must be the one placement takes")
def test_memtune_apply_runs_the_usual_script_with_its_to_cuda(tmp_path, on_cpu):
    """`memtune apply` of a script that builds fp32 weights and calls model.to("cuda"): 20 steps with
    accumulation, clipping and a scheduler give the unpatched run's losses (the run without the move)."""
    examples = str(Path(__file__).resolve().parents[1] / "examples")
    out_base, out_plan = tmp_path / "base.json", tmp_path / "plan.json"
    (tmp_path / "base.py").write_text(SCRIPT.format(examples=examples, out=str(out_base)))
    (tmp_path / "plan.py").write_text(SCRIPT.format(examples=examples, out=str(out_plan)))
    with simulate_host():
        run_apply({}, str(tmp_path / "base.py"), [])
        res = run_apply(PLAN, str(tmp_path / "plan.py"), ["--move"])
    assert res.failure is None, res.failure
    assert json.loads(out_plan.read_text()) == json.loads(out_base.read_text())
    assert len(on_cpu) == 1
    assert any(s == "placement" for s, _ in res.notes)
    assert nn.Module.to.__qualname__ == "Module.to"


def test_effect_counts_the_model_as_placed():
    from memtune.estimate import estimate

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llama7b_profile import llama7b_profile

    p = llama7b_profile()
    rest = {k: v for k, v in PLAN.items() if k != "placement"}
    rest = {**rest, "offload": {**rest["offload"], "params": "all"}, "loss": {"fused": True}}
    without = estimate(p, plan_from_dict(rest))
    with_ = estimate(p, plan_from_dict({**rest, "placement": {"defer": True}}))
    assert without.peak_phase == "load" and without.peak_bytes >= p.param_bytes  # fp32 weights, as built
    assert with_.peak_bytes < 0.25 * p.param_bytes and with_.peak_phase != "load"


def test_apply_plan_api_without_a_deferred_move_notes_it():
    m = GPT(2, 32, 4, 16, 64)
    opt = torch.optim.AdamW(m.parameters())
    applied = memtune.apply_plan(m, opt, {"placement": {"defer": True}})
    assert any("nothing deferred" in t for s, t in applied.notes if s == "placement")
