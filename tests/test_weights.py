"""weights strategy: the plan section, its cost-model effect by hand, apply + undo on a hand-written LoRA and
on peft's LoRA around a transformers Llama, and the tuner proposing a quantized base only when the budget
needs it."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import memtune.tune as tuning
from memtune.blocks import find_blocks
from memtune.costmodel import BlockSim, SimStep
from memtune.errors import PlanError
from memtune.estimate import estimate
from memtune.kernels import nf4
from memtune.patcher import apply_plan
from memtune.profile import BlockProfile, Hardware, OptimizerProfile, Peak, Profile
from memtune.strategies import describe_plan, get_strategy, make_context, plan_from_dict

MiB = 2**20


# --- the section ------------------------------------------------------------------------------------------


def test_validate_describe_lossy_and_round_trip():
    s = get_strategy("weights")
    c = s.validate({"format": "nf4"})
    assert c.blocks == (("all", "nf4"),) and c.double_quant and c.lossy
    assert c.to_dict() == {"blocks": "all", "format": "nf4"}
    assert "nf4 (8-bit scales) in blocks all" in c.describe()
    assert s.validate("int8").blocks == (("all", "int8"),)  # `weights: int8` shorthand
    many = s.validate({"blocks": {"all": "nf4", "lm_head": "int8", 0: "keep"}, "classes": {"LlamaMLP": "bf16"},
                       "double_quant": False, "kernel": "fused"})
    assert many.blocks == (("all", "nf4"), (("lm_head",), "int8"), ((0,), "keep")) and not many.double_quant
    assert s.validate(many.to_dict()) == many
    listed = s.validate({"blocks": [0, "2-3"], "format": "int8"})
    assert listed.blocks == (((0, "2-3"), "int8"),) and s.validate(listed.to_dict()) == listed
    assert not s.validate({"format": "keep"}).lossy and s.validate({"format": "keep"}).describe() == "unchanged"
    only_classes = s.validate({"classes": {"LlamaDecoderLayer": "nf4"}})
    assert only_classes.blocks == () and s.validate(only_classes.to_dict()) == only_classes
    with pytest.raises(PlanError, match="unknown key 'bits'"):
        s.validate({"bits": 4})
    with pytest.raises(PlanError, match="choose one of: keep, bf16, int8, nf4"):
        s.validate({"format": "int4"})
    with pytest.raises(PlanError, match="not both"):
        s.validate({"blocks": {"all": "nf4"}, "format": "int8"})
    with pytest.raises(PlanError, match="choose one of: dequant, fused"):
        s.validate({"kernel": "cutlass"})
    with pytest.raises(PlanError, match="class name"):
        s.validate({"classes": {"a.b": "nf4"}})
    plan = plan_from_dict({"weights": {"format": "nf4"}})
    assert plan.lossy == ["weights"] and "[LOSSY]" in describe_plan(plan)


def test_composes_with_block_modes_and_refuses_fsdp():
    # not a layout mode: composes with recompute, compress and offload of the same blocks
    plan_from_dict({"weights": {"format": "nf4"}, "checkpoint": {"blocks": "all"}})
    plan_from_dict({"weights": {"format": "nf4"}, "compress": {"blocks": "all"}})
    with pytest.raises(PlanError, match="sharding stage 2"):
        plan_from_dict({"weights": {"format": "nf4"}, "sharding": {"stage": 2}})
    with pytest.raises(PlanError, match="precision params: bf16 cannot be estimated together"):
        plan_from_dict({"weights": {"format": "nf4"}, "precision": {"params": "bf16"}})
    plan_from_dict({"weights": {"format": "nf4"}, "precision": {"autocast": "bf16"}})
    plan_from_dict({"weights": {"format": "keep"}, "precision": {"params": "bf16"}})  # nothing quantized


# --- the cost model ----------------------------------------------------------------------------------------


def _block(name, frozen, cls="LlamaDecoderLayer", kind="repeated", index=0, extra=None, trainable=0):
    pb = {"bfloat16": frozen, **(extra or {})}
    return BlockProfile(name=name, cls=cls, kind=kind, index=index, param_bytes=pb, frozen_param_bytes=frozen,
                        trainable_param_bytes=trainable, activation_bytes=10 * MiB)


def test_effect_by_hand():
    n = 12 * 4096**2  # one block's frozen parameters (bf16): in_features estimated sqrt(n / 12) = 4096
    prof = Profile(hardware=Hardware(device="cuda", gpu_name="Test GPU", d2d_gbps=2000.0), blocks=[
        _block("emb", 2 * 1000 * 64, cls="Embedding", kind="other"),
        _block("layers.0", 2 * n, index=1, extra={"float32": 4 * MiB}, trainable=4 * MiB),
        _block("layers.1", 2 * n, index=2),
        _block("lm_head", 2 * 4096 * 1000, cls="Linear", kind="other", index=3)], autocast="bfloat16")
    sim = SimStep(blocks=[BlockSim(name=b.name, kind=b.kind, param_bytes=sum(b.param_bytes.values()))
                          for b in prof.blocks])
    sim.param_bytes = sum(b.param_bytes for b in sim.blocks)
    start = sim.param_bytes
    s = get_strategy("weights")
    s.effect(prof, s.validate({"blocks": {"all": "nf4", "lm_head": "int8", "emb": "nf4"}}), sim)
    emb, l0, l1, head = sim.blocks
    nf4_bytes = n * (0.5 + 1 / 64 + 4 / (64 * 256))
    assert l0.param_bytes == pytest.approx(2 * n + 4 * MiB - (2 * n - nf4_bytes))  # adapters stay fp32
    assert l1.param_bytes == pytest.approx(nf4_bytes)
    assert head.param_bytes == pytest.approx(4096 * 1000 * (1 + 4 / 4096))
    assert emb.param_bytes == 2 * 1000 * 64  # an embedding is not a Linear
    workspace = n / 3 * 2  # a third of a block's weights, in bf16 (autocast)
    saved = 2 * (2 * n - nf4_bytes) + (2 * 4096 * 1000 - 4096 * 1000 * (1 + 4 / 4096))
    assert sim.param_bytes == pytest.approx(start - saved + workspace)
    # one dequantize pass in forward, one in backward: stored bytes + bf16 written, at 2000 GB/s x 0.8
    one = n * (nf4.bytes_per_param(True) + 2) / (2000e9 * 0.8)
    assert l1.extra_fwd_s == pytest.approx(one) and l1.extra_bwd_s == pytest.approx(one)
    assert "weights" in sim.lossy and sim.sources["weights"].startswith("formula")


def test_effect_uses_benchmark_results_for_the_same_gpu(tmp_path, monkeypatch):
    res = tmp_path / "weights_results.json"
    res.write_text('{"gpu": "Test GPU", "overhead_s_per_param": {"nf4": {"dequant": 1e-12}}}')
    monkeypatch.setenv("MEMTUNE_WEIGHTS_BENCH", str(res))
    n = 1_000_000
    prof = Profile(hardware=Hardware(device="cuda", gpu_name="Test GPU", d2d_gbps=2000.0),
                   blocks=[_block("layers.0", 2 * n)])
    sim = SimStep(blocks=[BlockSim(name="layers.0", param_bytes=2 * n)], param_bytes=2 * n)
    s = get_strategy("weights")
    s.effect(prof, s.validate({"format": "nf4"}), sim)
    assert sim.blocks[0].extra_fwd_s + sim.blocks[0].extra_bwd_s == pytest.approx(1e-12 * n)
    assert sim.sources["weights"].startswith("measured")
    prof.hardware.gpu_name = "Other GPU"  # measured elsewhere: the formula
    sim = SimStep(blocks=[BlockSim(name="layers.0", param_bytes=2 * n)], param_bytes=2 * n)
    s.effect(prof, s.validate({"format": "nf4"}), sim)
    assert sim.sources["weights"].startswith("formula")


# --- the live run: a hand-written LoRA ----------------------------------------------------------------------


class LoRALinear(nn.Module):
    def __init__(self, i, o, r=4):
        super().__init__()
        self.base = nn.Linear(i, o)
        self.base.requires_grad_(False)
        self.A = nn.Linear(i, r, bias=False)
        self.B = nn.Linear(r, o, bias=False)

    def forward(self, x):
        return self.base(x) + self.B(self.A(x))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = LoRALinear(d, d)
        self.mlp = LoRALinear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)
        self.out.requires_grad_(False)

    def forward(self, x):
        return x + self.out(F.gelu(self.mlp(self.attn(self.norm(x)))))


class Model(nn.Module):
    def __init__(self, vocab=64, d=32, layers=3, tied=True):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight
        self.emb.requires_grad_(False)
        self.head.requires_grad_(False)

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _setup(tied=True):
    torch.manual_seed(0)
    m = Model(tied=tied)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    return m, opt, torch.randint(64, (4, 9))


def test_apply_and_undo_on_a_handwritten_lora():
    m, opt, x = _setup()
    sd0 = m.state_dict()
    params0 = {n: p for n, p in m.named_parameters()}
    base = m.blocks[1].mlp.base
    w_obj = base.weight
    y0 = m(x)
    applied = apply_plan(m, opt, {"weights": {"blocks": {"all": "nf4", "head": "int8"}}})
    notes = " | ".join(n for _, n in applied.notes)
    assert "9 nf4" in notes and "tied" in notes and "head" in notes  # the tied head is left alone
    # frozen weights are out of parameters(); trainable ones, biases and the tied embedding stay
    names = [n for n, _ in m.named_parameters()]
    assert "blocks.1.mlp.base.weight" not in names and "blocks.1.mlp.base.bias" in names
    assert "blocks.1.mlp.A.weight" in names and "emb.weight" in names
    assert base._parameters["weight"] is None and w_obj.numel() == 0  # the storage is freed
    assert base.weight.shape == (128, 32) and base.weight.dtype == torch.float32 and torch.isnan(base.weight).all()
    # state_dict: same keys in the same order, the weight dequantized (lossy, close), on the CPU
    sd1 = m.state_dict()
    assert list(sd1) == list(sd0)
    for k in sd0:
        assert sd1[k].shape == sd0[k].shape and sd1[k].dtype == sd0[k].dtype
    err = (sd1["blocks.1.mlp.base.weight"] - sd0["blocks.1.mlp.base.weight"]).abs().max()
    assert 0 < err <= sd0["blocks.1.mlp.base.weight"].abs().max() * nf4.MAX_HALF_GAP * 1.01
    # training: adapters get gradients, frozen weights none, the optimizer steps
    y1 = m(x)
    assert (y1 - y0).abs().max() < 0.2 * y0.abs().max()
    y1.float().pow(2).mean().backward()
    assert m.blocks[0].attn.A.weight.grad is not None and w_obj.grad is None
    opt.step()
    opt.zero_grad()
    # load_state_dict of full-precision weights re-quantizes them (strict: every key known)
    m.load_state_dict(sd0)
    after_load = m.state_dict()["blocks.1.mlp.base.weight"]
    torch.testing.assert_close(after_load, sd1["blocks.1.mlp.base.weight"])
    bad = dict(sd0)
    bad["blocks.1.mlp.base.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="size mismatch for blocks.1.mlp.base.weight"):
        m.load_state_dict(bad)
    missing = {k: v for k, v in sd0.items() if k != "blocks.0.out.weight"}
    with pytest.raises(RuntimeError, match="Missing key.*blocks.0.out.weight"):
        m.load_state_dict(missing)
    applied()
    # undone: the same Parameter objects back, dequantized values, forward as before the plan
    assert base.weight is w_obj and w_obj.shape == (128, 32) and "forward" not in base.__dict__
    assert {n for n, _ in m.named_parameters()} == set(params0)
    assert list(m.state_dict()) == list(sd0)
    torch.testing.assert_close(w_obj, after_load)
    assert m(x).shape == y0.shape


def test_the_fused_loss_head_is_left_alone():
    m, opt, x = _setup(tied=False)
    applied = apply_plan(m, opt, {"weights": {"blocks": {"all": "nf4", "head": "int8"}}, "loss": {"fused": True,
                                                                                                "head": "head"}})
    assert m.head._parameters["weight"] is not None and m.blocks[0].out._parameters["weight"] is None
    assert any("fused loss" in n for _, n in applied.notes)
    applied()


def test_classes_override_blocks_nearest_wins():
    m, opt, x = _setup(tied=False)
    applied = apply_plan(m, opt, {"weights": {"blocks": {"all": "nf4", "head": "bf16"},
                                              "classes": {"LoRALinear": "int8", "Block": "keep"}}})
    fmt = {p: type(st["q"]).__name__ for p, mod in m.named_modules()
           if (st := mod.__dict__.get("_memtune_weights")) is not None}
    # LoRALinear (nearer) -> int8; the block's own `out` Linear -> keep (Block); head (no class) -> bf16
    assert fmt["blocks.0.attn.base"] == "Int8Weight" and fmt["blocks.2.mlp.base"] == "Int8Weight"
    assert "blocks.0.out" not in fmt and fmt["head"] == "Bf16Weight"
    m(x).sum().backward()
    applied()


def test_composes_with_checkpoint_and_precision_without_master_copies_of_frozen_weights():
    """The live run composes with precision params: bf16 (the plan check refuses it only because the cost
    model cannot estimate it yet), so apply the sections one after the other as the patcher would."""
    m, opt, x = _setup()
    plan = plan_from_dict({"weights": {"format": "int8"}, "checkpoint": {"blocks": "all"}})
    applied = apply_plan(m, opt, plan)
    prec = get_strategy("precision")
    ctx = make_context(m, [opt], find_blocks(m), torch.device("cpu"), plan_from_dict({"precision": {"params": "bf16"}}))
    undo_prec = prec.apply(ctx, prec.validate({"params": "bf16"}))
    masters = [t for g in opt.param_groups for t in g["params"]]
    assert all(p.requires_grad for p in masters)
    # precision cast the registered (trainable) parameters; the quantized ones were never seen
    assert m.blocks[0].attn.A.weight.dtype == torch.bfloat16
    assert m.blocks[0].attn.base.weight.dtype == torch.float32  # the placeholder keeps the original dtype
    loss = m(x).float().pow(2).mean()
    loss.backward()
    opt.step()
    undo_prec()
    applied()


# --- the live run: peft's LoRA on a transformers Llama ------------------------------------------------------


def test_apply_and_undo_on_peft_lora():
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randint(128, (2, 16))
    loss0 = model(input_ids=x, labels=x).loss.item()
    keys0 = list(model.state_dict())
    adapters0 = list(peft.get_peft_model_state_dict(model))
    applied = apply_plan(model, opt, {"weights": {"format": "nf4"}})
    layer = model.base_model.model.model.layers[0]
    q = layer.self_attn.q_proj
    assert type(q).__name__ == "Linear" and hasattr(q, "base_layer")  # peft's lora.Linear, unchanged
    assert q.base_layer._parameters["weight"] is None  # its base_layer is quantized
    assert layer.mlp.down_proj._parameters["weight"] is None  # a Linear peft did not wrap, frozen too
    assert q.lora_A["default"].weight.requires_grad and q.lora_A["default"]._parameters["weight"] is not None
    out = model(input_ids=x, labels=x)
    assert abs(out.loss.item() - loss0) < 0.05 * loss0
    out.loss.backward()
    assert q.lora_B["default"].weight.grad is not None
    opt.step()
    assert list(model.state_dict()) == keys0
    assert list(peft.get_peft_model_state_dict(model)) == adapters0  # saving adapters works as before
    applied()
    assert q.base_layer.weight.shape == (64, 64) and isinstance(q.base_layer.weight, nn.Parameter)
    assert list(model.state_dict()) == keys0


# --- the tuner ---------------------------------------------------------------------------------------------


def _lora_profile(n=8, frozen=400 * MiB, act=40 * MiB):
    """A LoRA fine-tune: bf16 frozen base blocks with small fp32 adapters, frozen embeddings and head."""
    blocks = [BlockProfile(name="model.embed_tokens", cls="Embedding", kind="other", index=0,
                           param_bytes={"bfloat16": 250 * MiB}, frozen_param_bytes=250 * MiB, output_bytes=8 * MiB)]
    for i in range(n):
        blocks.append(BlockProfile(
            name=f"model.layers.{i}", cls="LlamaDecoderLayer", index=i + 1,
            param_bytes={"bfloat16": frozen, "float32": 2 * MiB}, trainable_param_bytes=2 * MiB,
            frozen_param_bytes=frozen, activation_bytes=act, input_bytes=8 * MiB, output_bytes=8 * MiB,
            transient_bytes=20 * MiB, bwd_transient_bytes=20 * MiB, fwd_s=0.01, bwd_s=0.02))
    blocks.append(BlockProfile(name="lm_head", cls="Linear", kind="other", index=n + 1,
                               param_bytes={"bfloat16": 250 * MiB}, frozen_param_bytes=250 * MiB,
                               activation_bytes=8 * MiB, fwd_s=0.003, bwd_s=0.006))
    params = 500 * MiB + n * (frozen + 2 * MiB)
    trainable = n * 2 * MiB
    return Profile(
        script="train.py", device="cuda", autocast="bfloat16",
        hardware=Hardware(device="cuda", gpu_name="NVIDIA H200", gpu_total_bytes=140 * 2**30, d2d_gbps=3000.0,
                          h2d_gbps=25.0, d2h_gbps=25.0),
        blocks=blocks, optimizers=[OptimizerProfile(cls="torch.optim.adamw.AdamW", kind="adamw",
                                                    param_bytes=trainable, state_bytes=2 * trainable, step_s=0.001)],
        param_bytes=params, trainable_param_bytes=trainable, grad_bytes=trainable,
        optimizer_state_bytes=2 * trainable, other_activation_bytes=16 * MiB, loss_transient_bytes=32 * MiB,
        step_start_bytes=params + 2 * trainable, batch_size=4, optimizer_s=0.001, step_s=n * 0.03 + 0.02,
        peak=Peak(measured=False))


def _opts(budget):
    return tuning.TuneOptions(budget_bytes=int(budget), trials=40, timeout_s=None, margin=0.03)


def test_tuner_proposes_a_quantized_base_only_when_the_budget_needs_it():
    p = _lora_profile()
    base = estimate(p).peak_bytes  # ~4 GiB, 3.2 GiB of it the frozen base
    # nothing but the frozen weights can go below ~3.3 GiB: the tuner must quantize them
    tight = tuning.tune(p, _opts(0.5 * base))
    w = tight.plan.get("weights")
    assert w is not None and w.lossy
    assert dict(w.blocks)["all"] in ("int8", "nf4")
    assert estimate(p, tight.plan).peak_bytes <= 0.5 * base
    # room enough: quantizing only costs time, so the chosen plan leaves the weights as they are
    roomy = tuning.tune(p, _opts(1.5 * base))
    assert roomy.plan.get("weights") is None
    # lossless only: never proposed
    with pytest.raises(Exception, match="budget"):
        tuning.tune(p, tuning.TuneOptions(budget_bytes=int(0.5 * base), trials=20, timeout_s=None, margin=0.03,
                                          lossless_only=True))


def test_lossy_seed_starts_the_search_from_a_quantized_base():
    """The lossless floor (bf16 matmul weights, everything offloaded) conflicts with a quantized base, and one
    change at a time from it never reaches one: the weights' lossy seed is where the descent also starts."""
    from memtune.strategies.base import SearchOptions

    s = get_strategy("weights")
    p = _lora_profile()
    assert s.lossy_seed(p, SearchOptions()) == {"weights.LlamaDecoderLayer": "nf4"}
    assert s.lossy_seed(p, SearchOptions(lossless_only=True)) == {}
    assert tuning.lossy_seed(p, SearchOptions(lossless_only=True)) == {}
    assert tuning.lossy_seed(p, SearchOptions())["weights.LlamaDecoderLayer"] == "nf4"


def test_space_skips_frozen_bytes_not_worth_it():
    from memtune.strategies.base import SearchOptions
    from memtune.strategies.layout import Proposal
    from memtune.tune.space import ProbeTrial

    p = _lora_profile()
    s = get_strategy("weights")
    t = ProbeTrial({"weights.LlamaDecoderLayer": "nf4"})
    assert s.space(t, p, Proposal(), SearchOptions()) == {"blocks": "all", "format": "nf4"}
    assert list(t.params) == ["weights.LlamaDecoderLayer"]  # one choice per repeated class; lm_head by hand
    assert t.distributions["weights.LlamaDecoderLayer"].choices == ("keep", "int8", "nf4")  # bf16 already
    tiny = _lora_profile(frozen=MiB // 4)  # a few KiB of frozen weights per block: not searched
    tiny.blocks[-1].frozen_param_bytes = 0
    assert s.space(ProbeTrial({"weights.LlamaDecoderLayer": "nf4"}), tiny, Proposal(), SearchOptions()) is None
    assert s.space(t, p, Proposal(), SearchOptions(lossless_only=True)) is None
    assert math.isclose(nf4.bytes_per_param(True), 0.515869140625)


# --- GPU -----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,expected", [("nf4", 0.52 / 2), ("int8", 1.01 / 2), ("bf16", 1.0)])
def test_gpu_apply_frees_the_frozen_weights(fmt, expected):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(4)]).to("cuda", torch.bfloat16)
    model.requires_grad_(False)
    adapter = nn.Linear(2048, 2048).to("cuda", torch.bfloat16)
    opt = torch.optim.SGD(adapter.parameters(), lr=0.1)
    x = torch.randn(512, 2048, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    applied = apply_plan(model, opt, {"weights": {"blocks": "all", "format": fmt}})
    torch.cuda.synchronize()
    weights = 4 * 2048 * 2048 * 2
    stored = torch.cuda.memory_allocated() - (before - weights)  # the bf16 weights freed, their stored form added
    assert stored <= weights * expected * 1.02
    y = model(adapter(x))
    y.float().sum().backward()
    assert adapter.weight.grad is not None
    applied()


@pytest.mark.gpu
def test_gpu_model_moved_after_apply():
    m, opt, x = _setup()
    applied = apply_plan(m, opt, {"weights": {"format": "nf4"}})
    m.cuda()
    y = m(x.cuda())
    assert y.is_cuda and torch.isfinite(y).all()
    applied()


@pytest.mark.gpu
def test_gpu_host_weights_of_a_deferred_model_are_quantized_on_the_device():
    from memtune.kernels.frozen_linear import Workspace
    from memtune.strategies.weights import WeightsConfig, quantize_linear

    torch.manual_seed(0)
    layers = [nn.Linear(4096, 4096, bias=False).to(torch.bfloat16).requires_grad_(False) for _ in range(3)]
    ref = [m.weight.detach().clone() for m in layers]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ws = Workspace()
    for m in layers:
        quantize_linear(m, "nf4", WeightsConfig(), ws, device=torch.device("cuda"))
    one = 4096 * 4096 * 2
    # one unquantized weight at a time, beside the quantizer's temporaries and the NF4 forms made so far
    # (H200: 1.8x one weight); all three on the device at once would be 3x
    assert torch.cuda.max_memory_allocated() - base < 2.2 * one
    assert torch.cuda.memory_allocated() - base <= 3 * one * 0.52 / 2 * 1.02  # the NF4 forms stay there
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    for m, w in zip(layers, ref, strict=True):
        assert m.weight.device.type == "cuda"
        y, y0 = m(x), x @ w.cuda().t()
        assert (y - y0).float().norm() / y0.float().norm() < 0.12  # NF4's error on a uniform-init weight


# --- end to end: a plain LoRA script, profiled, tuned, applied ----------------------------------------------


def test_plain_lora_script_is_one_tune_away_from_a_quantized_base(tmp_path):
    from typer.testing import CliRunner

    from memtune.cli import app
    from memtune.plan import read_plan_file

    script = str(Path(__file__).parent / "scripts" / "lora_train.py")
    runner = CliRunner()
    prof, plan = tmp_path / "p.json", tmp_path / "plan.yaml"
    r = runner.invoke(app, ["profile", script, "-o", str(prof), "--steps", "3", "--", "--width", "256",
                            "--batch-size", "1"])
    assert r.exit_code == 0, r.output
    p = Profile.load(prof)
    assert sum(b.frozen_param_bytes for b in p.repeated_blocks) > 0.8 * p.param_bytes  # mostly a frozen base
    # the base is ~8 MiB in fp32; 3.5 MiB needs it quantized (bf16 params alone would leave 4 MiB; its head has a
    # bias, so no fused loss helps)
    r = runner.invoke(app, ["tune", str(prof), "--budget", "3.5MiB", "-o", str(plan), "--trials", "30"])
    assert r.exit_code == 0, r.output
    doc = read_plan_file(plan)
    assert doc["weights"]["format"] in ("int8", "nf4") or set(doc["weights"]["blocks"].values()) & {"int8", "nf4"}
    r = runner.invoke(app, ["apply", str(plan), "--steps", "2"])
    assert r.exit_code == 0, r.output
    assert "frozen Linear weights quantized" in r.output and "adapters" in r.output
