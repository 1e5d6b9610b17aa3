"""loss strategy: the head returns lazy logits, F.cross_entropy on them runs fused, and the run's loss and
gradients equal the unpatched run's (fp32, CPU)."""

import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from memtune.costmodel import SimStep
from memtune.errors import PlanError
from memtune.profile import BlockProfile, Profile
from memtune.strategies import get_strategy, make_context, plan_from_dict
from memtune.strategies.loss import NO_BIAS, NOT_REACHED, LazyLogits


@pytest.fixture
def gpt(examples_dir):
    spec = importlib.util.spec_from_file_location("gpt_example", examples_dir / "gpt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    return mod.GPT(2, 32, 2, 16, 101)


def _apply(model, section=None):
    plan = plan_from_dict({"loss": section or {"fused": True}})
    ctx = make_context(model, [], [], torch.device("cpu"), plan)
    return ctx, get_strategy("loss").apply(ctx, plan.get("loss"))


def _step(model, x, y, **ce):
    model.zero_grad()
    logits = model(x)  # what examples/gpt.py does
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), **ce)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, logits


@pytest.mark.parametrize("section", [None, {"fused": True, "low_memory": True, "chunk_tokens": 5}])
@pytest.mark.parametrize("ce", [{}, {"ignore_index": 7, "label_smoothing": 0.1}, {"reduction": "sum"}])
def test_gpt_same_loss_and_grads(gpt, ce, section):
    idx = torch.randint(101, (3, 17))
    x, y = idx[:, :-1], idx[:, 1:].clone()
    y[0, :4] = 7
    l0, g0, logits0 = _step(gpt, x, y, **ce)
    ctx, undo = _apply(gpt, section)
    l1, g1, logits1 = _step(gpt, x, y, **ce)
    assert type(logits0) is torch.Tensor and isinstance(logits1, LazyLogits)
    assert ctx.loss_stats["fused"] == 1 and "materialized" not in ctx.loss_stats
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6)
    undo()
    assert "forward" not in gpt.head.__dict__ and type(gpt(x)) is torch.Tensor


def test_other_uses_materialize_the_same_values(gpt):
    x = torch.randint(101, (2, 16))
    with torch.no_grad():
        ref = gpt(x)
    ctx, undo = _apply(gpt)
    logits = gpt(x)
    assert logits.shape == (2, 16, 101) and logits.dtype == torch.float32 and logits.dim() == 3
    assert isinstance(logits[:, :-1, :].float().contiguous().view(-1, 101), LazyLogits)
    torch.testing.assert_close(logits.argmax(-1), ref.argmax(-1))
    torch.testing.assert_close(logits + 0, ref)
    assert ctx.loss_stats["materialized"] == 1  # computed once, then reused
    gpt.eval()
    assert type(gpt(x)) is torch.Tensor  # evaluation gets plain logits
    undo()


def test_head_with_bias_or_missing_is_left_alone():
    m = nn.Sequential(nn.Linear(4, 4))
    ctx, _ = _apply(m)
    assert "no linear head" in ctx.notes[0][1]
    m = nn.Module()
    m.head = nn.Linear(4, 50)
    ctx, _ = _apply(m)
    assert "bias" in ctx.notes[0][1] and "forward" not in m.head.__dict__


def test_validate_and_effect():
    s = get_strategy("loss")
    assert s.validate({"fused": True, "chunk_tokens": 256}).to_dict() == {"fused": True, "chunk_tokens": 256}
    assert not s.validate({"fused": True}).lossy
    with pytest.raises(PlanError, match="unknown key"):
        s.validate({"fuse": True})
    with pytest.raises(PlanError, match="positive integer"):
        s.validate({"chunk_tokens": 0})
    # head of 32000 x 2048 bf16, 8192 tokens: eager keeps an fp32 log-softmax of N x V
    prof = Profile(tokens_per_step=8192, blocks=[BlockProfile(
        name="head", cls="Linear", kind="other", n_params=32000 * 2048, param_bytes={"bfloat16": 32000 * 2048 * 2},
        input_bytes=8192 * 2048 * 2)])
    sim = SimStep(other_act_bytes=8192 * 32000 * 4 + 10.0, loss_transient_bytes=3e9)
    s.effect(prof, s.validate({"fused": True}), sim)
    assert sim.other_act_bytes == pytest.approx(10 + (8192 + 32000) * 2048 * 2)
    assert sim.loss_transient_bytes <= 200 * 2**20
    low = SimStep(other_act_bytes=8192 * 32000 * 4 + 10.0, loss_transient_bytes=3e9)
    s.effect(prof, s.validate({"fused": True, "low_memory": True}), low)
    assert low.loss_transient_bytes == 56 * 2**20
    assert s.validate({"low_memory": False}).to_dict() == {"fused": True}
    with pytest.raises(PlanError, match="true or false"):
        s.validate({"low_memory": "yes"})


def test_hf_causal_lm_same_loss_and_grads():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).train()
    ids = torch.randint(97, (2, 12))
    labels = ids.clone()
    labels[0, :3] = -100

    def step():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    l0, g0 = step()
    ctx, undo = _apply(model)
    l1, g1 = step()
    assert ctx.loss_stats["fused"] == 1 and "lm_head" in ctx.notes[0][1]
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    undo()


def test_plan_options_reach_the_kernel(gpt, monkeypatch):
    import memtune.kernels.linear_cross_entropy as lce

    seen = []
    real = lce.linear_cross_entropy
    monkeypatch.setattr(lce, "linear_cross_entropy", lambda *a, **k: seen.append(k) or real(*a, **k))
    _apply(gpt, {"fused": True, "low_memory": True, "chunk_tokens": 5})
    idx = torch.randint(101, (2, 9))
    _step(gpt, idx[:, :-1], idx[:, 1:])
    assert seen and seen[0]["low_memory"] is True and seen[0]["chunk_tokens"] == 5


def _uses(loss_of):
    """head_output_uses of a Linear head's output in the graph of loss_of(logits, targets)."""
    from memtune.strategies.loss import head_output_uses

    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    h = torch.randn(2, 6, 16, requires_grad=True)
    y = torch.randint(50, (2, 6))
    logits = head(h)
    return head_output_uses([loss_of(logits, y)], logits.grad_fn)


def test_head_output_uses_sees_only_cross_entropy_through_views_and_casts():
    assert _uses(lambda z, y: F.cross_entropy(z.float().view(-1, 50), y.view(-1))) == []
    # transformers' causal-LM loss: shift, then flatten; label smoothing adds a sum beside nll_loss
    assert _uses(lambda z, y: F.cross_entropy(z[:, :-1].contiguous().reshape(-1, 50), y[:, 1:].reshape(-1),
                                              label_smoothing=0.1)) == []


def test_head_output_uses_sees_a_distillation_term_and_a_z_loss():
    def kd(z, y):
        t = torch.randn_like(z)
        kl = F.kl_div(F.log_softmax(z / 2.0, -1), F.softmax(t / 2.0, -1), reduction="batchmean")
        return kl + F.cross_entropy(z.view(-1, 50), y.view(-1))

    assert _uses(kd) == ["DivBackward"]
    assert _uses(lambda z, y: F.cross_entropy(z.view(-1, 50), y.view(-1)) + z.logsumexp(-1).square().mean()) \
        == ["LogsumexpBackward"]
    assert _uses(lambda z, y: (z.detach() * 0).sum() + h_free_loss(y)) == [NOT_REACHED]


def h_free_loss(y):
    return torch.zeros((), requires_grad=True) * y.float().mean()


def test_fused_loss_buys_nothing_when_the_logits_have_other_uses():
    s = get_strategy("loss")
    prof = Profile(tokens_per_step=8192, blocks=[BlockProfile(
        name="head", cls="Linear", kind="other", n_params=32000 * 2048, param_bytes={"bfloat16": 32000 * 2048 * 2},
        input_bytes=8192 * 2048 * 2)], extra={"head_output_uses": ["DivBackward"]})
    sim = SimStep(other_act_bytes=8192 * 32000 * 4 + 10.0, loss_transient_bytes=3e9)
    s.effect(prof, s.validate({"fused": True}), sim)
    assert sim.other_act_bytes == 8192 * 32000 * 4 + 10.0 and sim.loss_transient_bytes == 3e9
    assert "measured" in sim.sources["loss"] and any("DivBackward" in n for n in sim.notes)

    class Trial:  # the search must not offer it
        def suggest_categorical(self, name, choices):
            raise AssertionError(f"{name} offered")

    assert s.space(Trial(), prof, None, None) is None


def test_profile_records_the_head_output_uses(tmp_path, examples_dir):
    """The zoo's distillation script feeds its student's logits to a KL term too; examples/gpt.py only to
    F.cross_entropy."""
    from memtune.profilers import profile_script

    zoo = examples_dir / "zoo" / "distill.py"
    got = {}
    for name, script in (("distill", zoo), ("gpt", examples_dir / "gpt.py")):
        prof = profile_script(str(script), argv=["--steps", "6"], steps=3, warmup=1, measure_hardware=False)
        got[name] = prof.extra.get("head_output_uses")
    assert got == {"distill": ["DivBackward"], "gpt": []}


def test_profile_of_a_classifier_with_a_biased_head_says_why_there_is_nothing_to_fuse():
    """A head with a bias is left alone by apply, so its profile must not promise the fused loss's savings."""
    from pathlib import Path

    from memtune.profilers import profile_script

    prof = profile_script(str(Path(__file__).parent / "scripts" / "tiny_train.py"), argv=["--steps", "6"], steps=3, warmup=1,
                          measure_hardware=False)
    uses = prof.extra.get("head_output_uses")
    assert uses and uses[0] in (NO_BIAS, "(no linear head)")
