"""checkpoint strategy: same losses and gradients as the unpatched run (torch.equal), state_dict unchanged."""

import sys

import pytest
import torch
import torch.nn.functional as F

import memtune
from memtune.errors import PlanError
from memtune.strategies import plan_from_dict

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "examples"))
from gpt import GPT, synthetic_batch  # noqa: E402


def train(plan=None, steps=3, accum=1, dropout=False):
    torch.manual_seed(0)
    m = GPT(2, 32, 4, 16, 64)
    if dropout:  # RNG inside a recomputed block must replay identically
        for b in m.blocks:
            b.mlp.fc = torch.nn.Sequential(b.mlp.fc, torch.nn.Dropout(0.2))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    undo = memtune.apply_plan(m, opt, plan) if plan else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    gen = torch.Generator().manual_seed(0)
    losses, grads = [], []
    for _ in range(steps):
        for _ in range(accum):
            d = synthetic_batch(4, 17, 64, gen)
            loss = F.cross_entropy(m(d[:, :-1]).reshape(-1, 64), d[:, 1:].reshape(-1))
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1)
        grads.append([p.grad.clone() for p in m.parameters()])
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses, grads, m, opt, undo


def same(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0], strict=True)), "losses differ"
    for ga, gb in zip(a[1], b[1], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True)), "gradients differ"


@pytest.mark.parametrize("mode,blocks", [("full", "all"), ("selective", "all"), ("full", [1]),
                                         ("selective", ["blocks.0"])])
def test_checkpoint_equivalent(mode, blocks):
    base = train()
    got = train({"checkpoint": {"blocks": blocks, "mode": mode}})
    same(base, got)
    assert got[4].notes and got[4].notes[0][0] == "checkpoint"


def test_checkpoint_grad_accumulation_and_dropout():
    same(train(accum=2, dropout=True), train({"checkpoint": {"blocks": "all"}}, accum=2, dropout=True))


def test_checkpoint_actually_recomputes():
    torch.manual_seed(0)
    m = GPT(2, 32, 4, 16, 64)
    calls = []
    m.blocks[0].attn.register_forward_pre_hook(lambda *a: calls.append(1))
    memtune.apply_plan(m, None, {"checkpoint": {"blocks": [0]}})
    m(torch.randint(64, (2, 8))).sum().backward()
    assert len(calls) == 2  # forward + recompute in backward


def test_state_dict_keys_and_undo():
    torch.manual_seed(0)
    m = GPT(2, 32, 4, 16, 64)
    keys = list(m.state_dict())
    undo = memtune.apply_plan(m, None, {"checkpoint": {"blocks": "all"}})
    assert list(m.state_dict()) == keys
    fresh = GPT(2, 32, 4, 16, 64)
    fresh.load_state_dict(m.state_dict())  # a checkpoint saved under memtune loads without it
    undo()
    assert "forward" not in m.blocks[0].__dict__
    with torch.no_grad():  # no-grad (eval) runs the plain forward
        x = torch.randint(64, (2, 8))
        assert torch.equal(m(x), fresh(x))


def test_eval_no_grad_not_checkpointed():
    torch.manual_seed(0)
    m = GPT(2, 32, 4, 16, 64)
    memtune.apply_plan(m, None, {"checkpoint": {"blocks": "all"}})
    m.eval()
    with torch.no_grad():
        assert m(torch.randint(64, (2, 8))).shape == (2, 8, 64)


@pytest.mark.parametrize("bad,msg", [
    ({"checkpoint": {"blocks": "all", "mode": "partial"}}, "'partial' is not allowed; choose one of: full, selective"),
    ({"checkpoint": {"blocks": "all", "every": 2}}, "unknown key 'every'; allowed: blocks, mode"),
    ({"checkpoint": {"mode": "full"}}, "missing `blocks`"),
    ({"checkpoint": {"blocks": [1.5]}}, "is not a block"),
])
def test_validation_errors(bad, msg):
    with pytest.raises(PlanError, match=msg.replace("(", r"\(").replace("`", ".")):
        plan_from_dict(bad)


def test_out_of_range_block_refused():
    m = GPT(2, 32, 4, 16, 64)
    with pytest.raises(PlanError, match="out of range"):
        memtune.apply_plan(m, None, {"checkpoint": {"blocks": [5]}})


def test_transformers_checkpointing_not_doubled():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)

    def run(plan, hf_gc):
        torch.manual_seed(0)
        m = transformers.LlamaForCausalLM(cfg)
        m.config.use_cache = False
        if hf_gc:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        calls = []
        m.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))  # pre: early-stopped recompute
        undo = memtune.apply_plan(m, None, plan) if plan else None
        ids = torch.randint(64, (2, 8), generator=torch.Generator().manual_seed(1))
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in m.parameters()], len(calls), undo, m

    g0, n0, _, _ = run(None, False)
    g1, n1, undo, m = run({"checkpoint": {"blocks": "all"}}, True)
    assert n0 == 1 and n1 == 2  # recomputed once, not twice
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
    assert any("transformers' gradient checkpointing" in t for _, t in undo.notes)
    undo()
    assert m.model.layers[0].gradient_checkpointing is True  # restored



def _tensors_in_cycles(plan) -> int:
    """Tensors of 4 steps that only the garbage collector would free (the collector off while they run)."""
    import gc

    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        out = train(plan, steps=4, accum=2)  # kept alive: the model and optimizer are not the step's
        gc.collect()
        n = sum(isinstance(o, torch.Tensor) for o in gc.garbage)
        del out
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    return n


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpoint_leaves_no_step_tensors_in_reference_cycles(mode):
    """A step's tensors caught in a cycle wait for the collector, so the peak would depend on when it runs (a
    cycle in offload's dedupe table did that once): no more of them than the unpatched run leaves."""
    assert _tensors_in_cycles({"checkpoint": {"blocks": "all", "mode": mode}}) <= _tensors_in_cycles(None)
