"""The one-pass host AdamW (memtune/kernels/host_adamw.py) against its reference, torch's fused CPU AdamW with
the conversions around it, over odd sizes, 16- and 32-bit gradients and pending factors; several steps, so the
moments and bias corrections are exercised."""

import pytest
import torch

from memtune.kernels import host_adamw


@pytest.fixture(scope="module")
def fn():
    mp = pytest.MonkeyPatch()
    mp.setenv("MEMTUNE_HOST_COMPILE", "1")
    mp.setattr(host_adamw, "_state", {})
    k = host_adamw.kernel()
    mp.undo()
    if k is None:
        pytest.skip(f"no compiled host kernel here: {host_adamw.unavailable()}")
    return k


@pytest.mark.parametrize("n", [4097, 100_003])  # (one compiled graph: its sizes are dynamic)
@pytest.mark.parametrize("gdtype", [torch.bfloat16, torch.float32])  # a landing buffer, an fp32 accumulator
@pytest.mark.parametrize("nf", [0, 1, 2])
def test_one_pass_is_the_fused_update(fn, n, gdtype, nf):
    gen = torch.Generator().manual_seed(n + nf)
    p = torch.randn(n, generator=gen)
    m, v = torch.zeros(n), torch.zeros(n)
    p2, m2, v2 = p.clone(), m.clone(), v.clone()
    o1, o2 = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    step = torch.tensor(0.0)
    factors = [torch.tensor(0.37), torch.tensor(2.0 ** -7)][:nf]
    one = torch.ones(())
    for _ in range(4):
        g = (torch.randn(n, generator=gen) * 3).to(gdtype)
        step += 1
        fn(p, g, m, v, o1, *host_adamw.scalars(1e-2, 0.9, 0.95, 0.1, 1e-8, float(step)), *(factors + [one, one])[:2])
        host_adamw.reference(p2, g, m2, v2, o2, 1e-2, 0.9, 0.95, 0.1, 1e-8, step, torch.empty(n), factors)
    for a, b in ((p, p2), (m, m2), (v, v2)):  # fp32 rounding: a couple of ulps of the tensor's largest value
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2.5e-7 * float(b.abs().max()))
    assert (o1 != o2).float().mean() < 1e-3  # the 16-bit copies differ only where fp32 rounding crossed a tie
    assert not torch.equal(p, torch.randn(n, generator=gen))  # (it moved)


def test_a_failing_kernel_falls_back_to_the_reference(monkeypatch):
    calls = []

    def broken(*a):
        calls.append(1)
        raise RuntimeError("recompile limit")

    monkeypatch.setattr(host_adamw, "_state", {"fn": broken})
    fn = host_adamw.kernel()
    n = 300
    p, m, v = torch.ones(n), torch.zeros(n), torch.zeros(n)
    p2, m2, v2 = p.clone(), m.clone(), v.clone()
    g = torch.full((n,), 0.5, dtype=torch.bfloat16)
    o1, o2 = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    host_adamw.safe_call(fn, p, g, m, v, o1, 1e-2, 0.9, 0.95, 0.1, 1e-8, torch.tensor(1.0), torch.empty(n), [])
    host_adamw.reference(p2, g, m2, v2, o2, 1e-2, 0.9, 0.95, 0.1, 1e-8, torch.tensor(1.0), torch.empty(n), [])
    assert calls and torch.equal(p, p2) and torch.equal(o1, o2)
    assert host_adamw.kernel() is None and "recompile limit" in host_adamw.unavailable()


def test_off_unless_the_environment_turns_it_on(monkeypatch):
    monkeypatch.delenv("MEMTUNE_HOST_COMPILE", raising=False)
    monkeypatch.setattr(host_adamw, "_state", {})
    assert host_adamw.kernel() is None
    assert "MEMTUNE_HOST_COMPILE=1" in host_adamw.unavailable()
