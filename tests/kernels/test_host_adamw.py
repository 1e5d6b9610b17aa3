"""The one-pass host AdamW (memtune/kernels/host_adamw.py, C built with the host's compiler) against its
reference, torch's fused CPU AdamW with the conversions around it, over odd sizes, 16- and 32-bit gradients and
a pending factor; several steps, so the moments and bias corrections are exercised."""

import shutil

import pytest
import torch

from memtune.kernels import host_adamw


@pytest.fixture(scope="module")
def fn():
    mp = pytest.MonkeyPatch()
    mp.delenv("MEMTUNE_HOST_KERNEL", raising=False)
    mp.setattr(host_adamw, "_state", {})
    k = host_adamw.kernel()
    mp.undo()
    if k is None:
        pytest.skip(f"no host kernel here: {host_adamw.unavailable()}")
    return k


def test_a_host_with_a_compiler_builds_it(fn):
    assert fn.threads >= 1


@pytest.mark.parametrize("n", [1, 4097, 100_003])
@pytest.mark.parametrize("gdtype", [torch.bfloat16, torch.float32])  # a landing buffer, an fp32 accumulator
@pytest.mark.parametrize("scale", [1.0, 0.37 * 2.0 ** -7])
def test_one_pass_is_the_fused_update(fn, n, gdtype, scale):
    gen = torch.Generator().manual_seed(n)
    p = torch.randn(n, generator=gen)
    m, v = torch.zeros(n), torch.zeros(n)
    p2, m2, v2 = p.clone(), m.clone(), v.clone()
    o1, o2 = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    step = torch.tensor(0.0)
    for _ in range(4):
        g = (torch.randn(n, generator=gen) * 3).to(gdtype)
        step += 1
        fn(p, g, m, v, o1, 1e-2, 0.9, 0.95, 0.1, 1e-8, float(step), scale)
        host_adamw.reference(p2, g, m2, v2, o2, 1e-2, 0.9, 0.95, 0.1, 1e-8, step, torch.empty(n),
                             [torch.tensor(scale)] if scale != 1.0 else [])
    for a, b in ((p, p2), (m, m2), (v, v2)):  # fp32 rounding: a couple of ulps of the tensor's largest value
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2.5e-7 * float(b.abs().max()))
    assert (o1 != o2).float().mean() < 2e-3  # the 16-bit copies differ only where fp32 rounding crossed a tie
    assert torch.equal(o1, p.bfloat16())  # its own rounding is torch's round-to-nearest-even


def test_rounding_keeps_nan_inf_and_ties_as_torch(fn):
    n = 8
    p = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -0.0, 3e38, 1e-40])
    g = torch.zeros(n)
    m, v, o = torch.zeros(n), torch.zeros(n), torch.empty(n, dtype=torch.bfloat16)
    fn(p, g, m, v, o, 0.0, 0.9, 0.999, 0.0, 1e-8, 1.0)  # lr 0: p unchanged, only the rounding
    torch.testing.assert_close(o, p.bfloat16(), equal_nan=True, rtol=0, atol=0)


def test_bad_tensors_are_refused(fn):
    p, m, v = torch.zeros(10), torch.zeros(10), torch.zeros(10)
    with pytest.raises(ValueError):
        fn(p, torch.zeros(9), m, v, torch.empty(10, dtype=torch.bfloat16), 1e-3, 0.9, 0.999, 0.0, 1e-8, 1.0)
    with pytest.raises(ValueError):
        fn(p, torch.zeros(20)[::2], m, v, torch.empty(10, dtype=torch.bfloat16), 1e-3, 0.9, 0.999, 0.0, 1e-8, 1.0)
    assert not fn.supports(p, torch.zeros(10, dtype=torch.float16), torch.empty(10, dtype=torch.bfloat16))


def test_off_by_environment_or_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMTUNE_HOST_KERNEL", "0")
    monkeypatch.setattr(host_adamw, "_state", {})
    assert host_adamw.kernel() is None and "MEMTUNE_HOST_KERNEL=0" in host_adamw.unavailable()
    monkeypatch.delenv("MEMTUNE_HOST_KERNEL")
    monkeypatch.setattr(host_adamw, "_state", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert host_adamw.kernel() is None and "no C compiler" in host_adamw.unavailable()


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(host_adamw, "_state", {})
    assert host_adamw.kernel() is not None, host_adamw.unavailable()
    built = list((tmp_path / "memtune").glob("host_adamw_*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    monkeypatch.setattr(host_adamw, "_state", {})
    assert host_adamw.kernel() is not None
    assert built[0].stat().st_mtime_ns == mtime and not list((tmp_path / "memtune").glob("tmp*"))
