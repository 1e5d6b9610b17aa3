"""compress strategy: plan section, conflicts, cost-model effect, and a live model that still converges."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from memtune.blocks import BlockRef
from memtune.costmodel import BlockSim, SimStep
from memtune.errors import PlanError
from memtune.kernels import activation_quant as aq
from memtune.profile import BlockProfile, Hardware, Profile
from memtune.strategies import get_strategy, make_context, plan_from_dict
from memtune.strategies.compress import make_codec


def _gpt_module(examples_dir):
    spec = importlib.util.spec_from_file_location("gpt_example", examples_dir / "gpt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_validate_and_conflicts():
    s = get_strategy("compress")
    assert s.validate({"blocks": "all"}).to_dict() == {"blocks": "all", "dtype": "int8"}
    assert s.validate({"blocks": [1, "2-3"], "dtype": "fp8", "min_size": "4KiB"}).min_size == 4096
    with pytest.raises(PlanError, match="unknown key 'bits'"):
        s.validate({"blocks": [0], "bits": 8})
    with pytest.raises(PlanError, match="choose one of: int8, fp8"):
        s.validate({"blocks": [0], "dtype": "int4"})
    assert s.validate({"blocks": [0]}).lossy
    with pytest.raises(PlanError, match="recomputed|checkpoint"):
        plan_from_dict({"compress": {"blocks": [2]}, "checkpoint": {"blocks": "1-3"}})
    plan_from_dict({"compress": {"blocks": [0]}, "checkpoint": {"blocks": [1]}})  # disjoint: fine


def test_effect_keeps_compressed_bytes():
    prof = Profile(hardware=Hardware(device="cuda", d2d_gbps=3000.0), blocks=[
        BlockProfile(name="blocks.0", cls="Block", activation_bytes=1000 * 2**20,
                     activation_bytes_by_dtype={"bfloat16": 990 * 2**20, "int64": 10 * 2**20}),
        BlockProfile(name="blocks.1", cls="Block", index=1, activation_bytes=1000 * 2**20)])
    sim = SimStep(blocks=[BlockSim(name="blocks.0", act_bytes=1000 * 2**20), BlockSim(name="blocks.1", act_bytes=1000 * 2**20)])
    s = get_strategy("compress")
    s.effect(prof, s.validate({"blocks": [0], "dtype": "int8"}), sim)
    b0, b1 = sim.blocks
    assert b0.mode == "compress" and b1.mode == "keep"
    assert b0.kept == pytest.approx((990 * aq.ratio("int8", 2) + 10) * 2**20)
    assert 0 < b0.extra_fwd_s < 3e-3 and b0.extra_bwd_s > 0 and "compress" in sim.lossy


def _train(model, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        start = torch.randint(64, (8, 1), generator=gen)
        data = (start + torch.arange(17)) % 64
        loss = F.cross_entropy(model(data[:, :-1]).reshape(-1, 64), data[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_small_gpt_converges_with_compressed_activations(examples_dir):
    g = _gpt_module(examples_dir)
    torch.manual_seed(0)
    ref_model = g.GPT(2, 32, 2, 16, 64)
    torch.manual_seed(0)
    model = g.GPT(2, 32, 2, 16, 64)
    blocks = [BlockRef(f"blocks.{i}", b, "repeated", i + 2) for i, b in enumerate(model.blocks)]
    plan = plan_from_dict({"compress": {"blocks": "all", "dtype": "int8", "min_size": 1}})
    ctx = make_context(model, [], blocks, torch.device("cpu"), plan)
    undo = get_strategy("compress").apply(ctx, plan.get("compress"))
    assert set(ctx.saved_tensors.codecs) == {"blocks.0", "blocks.1"}

    packed = []
    orig = aq.pack
    aq.pack = lambda *a, **k: packed.append(1) or orig(*a, **k)
    try:
        losses = _train(model, 20)
    finally:
        aq.pack = orig
    ref = _train(ref_model, 20)
    assert packed, "nothing was compressed"
    assert losses[-1] < 0.6 * losses[0]  # it learns
    assert abs(losses[-1] - ref[-1]) < 0.15 * ref[-1]  # about as well as without compression
    assert losses != ref  # and it is lossy
    undo()
    assert "forward" not in model.blocks[0].__dict__ and not ctx.saved_tensors.codecs


class _SpyTransport:
    """The CPU stand-in transport, recording what it is asked to copy to the "host"."""

    def __init__(self):
        from memtune.strategies.offload.transport import CloneTransport

        self.inner = CloneTransport()
        self.cuda, self.min_bytes = False, 0
        self.sent: list[tuple[torch.dtype, int]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def d2h(self, dst, src):
        self.sent.append((src.dtype, src.numel() * src.element_size()))
        return self.inner.d2h(dst, src)


def _run_plan(g, plan_dict, monkeypatch, steps=12):
    from memtune.patcher import apply_plan
    from memtune.strategies.offload import simulate_host

    torch.manual_seed(0)
    model = g.GPT(2, 32, 2, 16, 64)
    spy = _SpyTransport()
    monkeypatch.setattr("memtune.strategies.offload.make_transport", lambda device: spy)
    with simulate_host():
        undo = apply_plan(model, None, plan_dict)
        stages = {b: undo.ctx.saved_tensors.stages(b) for b in undo.ctx.repeated}
        try:
            losses = _train(model, steps)
        finally:
            undo()
    assert "forward" not in model.blocks[1].__dict__  # the undo removed the pipeline's wrapper
    return losses, spy, stages


def test_compress_and_offload_on_one_block_send_compressed_bytes_to_the_host(examples_dir, monkeypatch):
    """compress + offload of one block: the codec runs first, then the transport moves the codes (int8) and
    scales to the host; the losses are the compress-only run's (offload is exact), within the codec's bound
    of the plain run's."""
    g = _gpt_module(examples_dir)
    both = {"compress": {"blocks": [1], "dtype": "int8", "min_size": 1}, "offload": {"activations": [1]}}
    losses, spy, stages = _run_plan(g, both, monkeypatch)
    assert stages == {"blocks.0": [], "blocks.1": ["codec", "transport"]}
    sent = {dt for dt, _ in spy.sent}
    assert torch.int8 in sent, sent  # the compressed codes travel ...
    # ... and of the floats only the per-group scales (1 fp32 per 64 values) and tensors under min_size
    only_compress, _, _ = _run_plan(g, {"compress": {"blocks": [1], "dtype": "int8", "min_size": 1}}, monkeypatch)
    assert losses == only_compress
    torch.manual_seed(0)
    ref = _train(g.GPT(2, 32, 2, 16, 64), 12)
    assert losses != ref and all(abs(a - b) < 0.1 * b for a, b in zip(losses, ref, strict=True))
    # offload alone sends the full-width tensors
    off_losses, spy_off, _ = _run_plan(g, {"offload": {"activations": [1]}}, monkeypatch)
    assert off_losses == ref and torch.int8 not in {dt for dt, _ in spy_off.sent}
    assert sum(n for _, n in spy.sent) < 0.4 * sum(n for _, n in spy_off.sent)  # fp32 -> int8 + scales


def test_codec_skips_parameters_and_autocast_copies():
    lin = torch.nn.Linear(256, 256)
    pack, _ = make_codec("int8", 1, {p.data_ptr() for p in lin.parameters()})
    seen = []
    x = torch.randn(8, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(pack(t)) or t, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        lin(x * 2)  # an activation (MulBackward), then the weight's autocast copy
    kinds = [isinstance(p, aq.Packed) for p in seen]
    assert kinds.count(False) == 1 and kinds.count(True) >= 1  # the weight's bf16 copy stays
