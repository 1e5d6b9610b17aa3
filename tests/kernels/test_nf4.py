"""NF4 frozen-weight kernels (Triton interpreter on CPU, real Triton on GPU) against the torch reference, the
format's error bound and its exact byte count, over odd shapes and every floating dtype."""

import pytest
import torch

from memtune.kernels import nf4, triton_usable

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_usable(DEV), reason="triton can't run here")

SHAPES = [(7, 33), (3, 64), (128, 4097), (1,)]  # a partial block, whole blocks, blocks crossing rows, one element
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w.view(-1)[: min(64, w.numel()) // 2] *= 20  # one block with a much larger absmax than the rest
    return w.to(DEV, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False])
def test_roundtrip_within_bound_and_matches_reference(shape, dtype, double_quant):
    w = _weight(shape, dtype)
    q = nf4.quantize(w, double_quant, backend="triton")
    r = nf4.quantize_reference(w, double_quant)
    assert q.codes.dtype == torch.uint8 and q.shape == w.shape and q.dtype == dtype
    assert q.nbytes == nf4.nbytes(w.numel(), double_quant)
    # same fp32 arithmetic: only values within an ulp of a rounding point may land one level apart
    assert (q.codes != r.codes).sum() <= max(2, q.codes.numel() // 1000)
    if double_quant:
        assert (q.qabs.int() - r.qabs.int()).abs().max() <= 1
        torch.testing.assert_close(q.scale2, r.scale2)
        torch.testing.assert_close(q.offset, r.offset)
    else:
        torch.testing.assert_close(q.absmax, r.absmax)
    # the scale is never below the block's absmax (double quantization rounds up), so x / s stays in [-1, 1]
    n = w.numel()
    amax = torch.zeros(-(-n // 64) * 64, device=w.device)
    amax[:n] = w.float().abs().reshape(-1)
    assert (q.block_scales() >= amax.view(-1, 64).amax(1) * (1 - 1e-6)).all()
    back = nf4.dequantize(q, torch.float32, backend="triton")
    assert torch.equal(back, nf4.dequantize_reference(q, torch.float32))
    assert ((back - w.float()).abs() <= nf4.error_bound(w, q)).all()
    # the output dtype: the fp32 value rounded once (the interpreter's bf16 cast may round the other way)
    back16 = nf4.dequantize(q, dtype, backend="triton")
    assert back16.dtype == dtype
    ulp = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    assert ((back16.float() - back).abs() <= back.abs() * ulp + 1e-7).all()


def test_zero_blocks_and_workspace_output():
    w = torch.zeros(5, 64, device=DEV)
    w[2, 7] = 3.0
    q = nf4.quantize(w, True, backend="triton")
    out = torch.full((400,), 7.0, device=DEV)  # a larger reusable buffer
    back = nf4.dequantize(q, torch.float32, out=out, backend="triton")
    assert back.shape == w.shape and back.data_ptr() == out.data_ptr()
    assert torch.isfinite(back).all() and back[2, 7] == pytest.approx(3.0, rel=1e-6)
    assert back.abs().sum() == pytest.approx(3.0, rel=1e-6)  # zero blocks stay exactly zero
    assert (out[320:] == 7.0).all()  # nothing written past numel


def test_bytes_per_param():
    assert nf4.bytes_per_param(True) == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256))  # 0.515869
    assert nf4.bytes_per_param(True) <= 0.52
    assert nf4.bytes_per_param(False) == 0.5625
    n = 4096 * 11008
    assert nf4.nbytes(n, True) / n == pytest.approx(nf4.bytes_per_param(True), rel=1e-5)
    assert nf4.nbytes(n, False) == n // 2 + 4 * (n // 64)
    assert abs(nf4.MAX_HALF_GAP - (1 - 0.6961928009986877) / 2) < 1e-12


def test_levels_are_the_nearest():
    """The reference's code is the index of the nearest NF4 level to x / s."""
    w = torch.linspace(-1, 1, 64 * 40).reshape(40, 64)
    w[:, 0] = 1.0  # every block's absmax is 1
    q = nf4.quantize_reference(w, double_quant=False)
    back = nf4.dequantize_reference(q, torch.float32)
    levels = torch.tensor(nf4.NF4_LEVELS)
    nearest = levels[(w[..., None] - levels).abs().argmin(-1)]
    assert ((back - w).abs() <= (nearest - w).abs() + 1e-6).all()  # as close as the nearest level
    assert ((back - w).abs() <= nf4.MAX_HALF_GAP + 1e-6).all()


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mnk", [(5, 7, 33), (37, 64, 128), (70, 40, 200)], ids=str)
def test_fused_gemms_match_dequantized_matmul(mnk, dtype, double_quant):
    m, n, k = mnk
    q = nf4.quantize(_weight((n, k), torch.float32, seed=1), double_quant, backend="triton")
    w = nf4.dequantize_reference(q, torch.float32)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(m, k, generator=g).to(DEV, dtype)
    dy = torch.randn(m, n, generator=g).to(DEV, dtype)
    small = (16, 16, 32, 4, 1) if DEV == "cpu" else None  # few interpreter programs
    y = nf4.fused_matmul(x, q, dtype, config=small)
    dx = nf4.fused_matmul_t(dy, q, dtype, config=small)
    assert y.dtype == dx.dtype == dtype and y.shape == (m, n) and dx.shape == (m, k)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.float(), x.float() @ w.t(), **tol)
    torch.testing.assert_close(dx.float(), dy.float() @ w, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False])
def test_gpu_kernels_large(dtype, double_quant):
    w = (torch.randn(4096, 1000, device="cuda") * 0.02).to(dtype)
    q = nf4.quantize(w, double_quant)
    r = nf4.quantize_reference(w, double_quant)
    assert (q.codes != r.codes).sum() <= max(2, q.codes.numel() // 1000)
    back = nf4.dequantize(q, torch.float32)
    torch.testing.assert_close(back, nf4.dequantize_reference(q, torch.float32), rtol=1e-6, atol=1e-7)
    assert ((back - w.float()).abs() <= nf4.error_bound(w, q) * (1 + 1e-5)).all()


@pytest.mark.gpu
def test_gpu_fused_gemm():
    q = nf4.quantize(torch.randn(1024, 768, device="cuda") * 0.02)
    w = nf4.dequantize(q, torch.bfloat16)
    x = torch.randn(300, 768, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(300, 1024, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(nf4.fused_matmul(x, q, torch.bfloat16).float(), (x @ w.t()).float(), rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(nf4.fused_matmul_t(dy, q, torch.bfloat16).float(), (dy @ w).float(), rtol=2e-2,
                               atol=5e-2)
