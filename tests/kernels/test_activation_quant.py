"""Pack/unpack of saved activations: Triton kernels (interpreter on CPU) against the torch reference and the
quantizer's error bound, over odd sizes and layouts."""

import pytest
import torch

from memtune.kernels import activation_quant as aq

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("n", [1, 127, 129, 5003])
def test_int8_kernel_matches_reference_and_bound(n):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * torch.rand(1, generator=g) * 10).to(DEV)
    x[0] = 0.0
    codes, scales = aq.quantize(x, "int8", backend="triton")
    rc, rs = aq.quantize_reference(x, "int8")
    assert codes.dtype == torch.int8 and codes.numel() == n and scales.numel() == -(-n // aq.GROUP)
    assert (codes.int() - rc.int()).abs().max() <= 1  # fp32 rounding of the scale may move a tie
    torch.testing.assert_close(scales, rs)
    back = aq.dequantize(codes, scales, torch.float32, backend="triton")
    assert ((back - x).abs() <= aq.error_bound(x, "int8")).all()


def test_zero_groups_and_extremes():
    x = torch.zeros(3 * aq.GROUP + 5, device=DEV)
    x[aq.GROUP + 3] = 1e4  # one group's absmax, others all zero
    back = aq.dequantize(*aq.quantize(x, "int8", backend="triton"), torch.float32, backend="triton")
    assert torch.isfinite(back).all() and back[aq.GROUP + 3] == 1e4 and back.abs().sum() == 1e4


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_pack_keeps_shape_strides_dtype(dtype):
    base = torch.randn(3, 5, 70, device=DEV, dtype=torch.bfloat16)
    for x in (base, base.transpose(0, 2), base[:, 1:4]):  # contiguous, permuted, non-dense view
        p = aq.pack(x, dtype, backend="torch")
        y = aq.unpack(p, backend="torch")
        assert y.shape == x.shape and y.dtype == x.dtype
        if x.is_contiguous() or x.permute(*sorted(range(3), key=lambda i: -x.stride(i))).is_contiguous():
            assert y.stride() == x.stride()
        bound = aq.error_bound(x.float(), dtype) + x.float().abs() * 2**-8  # + the final bf16 rounding
        assert ((y.float() - x.float()).abs() <= bound).all()
        assert p.nbytes < x.numel() * x.element_size() * 0.6


def test_fp8_reference_bound():
    x = torch.randn(1000) * 5
    back = aq.dequantize_reference(*aq.quantize_reference(x, "fp8"), torch.float32)
    assert ((back - x).abs() <= aq.error_bound(x, "fp8")).all()
    assert (back - x).abs().max() > 0  # it is lossy


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["int8", "fp8"])
@pytest.mark.parametrize("src", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_kernels(dtype, src):
    if dtype == "fp8" and not aq.fp8_supported():
        pytest.skip("no fp8 on this GPU")
    x = (torch.randn(1_000_003, device="cuda") * 3).to(src)
    codes, scales = aq.quantize(x, dtype)
    rc, rs = aq.quantize_reference(x, dtype)
    torch.testing.assert_close(scales, rs)
    assert (codes.float() - rc.float()).abs().max() <= (1 if dtype == "int8" else 32)
    back = aq.dequantize(codes, scales, src)
    bound = aq.error_bound(x.float(), dtype) + x.float().abs() * 2**-7
    assert ((back.float() - x.float()).abs() <= bound).all()
