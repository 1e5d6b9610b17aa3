"""int8 per-row frozen-weight kernels (Triton interpreter on CPU, real on GPU) against the torch reference and
the format's error bound, over odd shapes and every floating dtype."""

import pytest
import torch

from memtune.kernels import int8_weight as I8
from memtune.kernels import triton_usable

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_usable(DEV), reason="triton can't run here")

SHAPES = [(7, 33), (3, 64), (128, 4097), (5,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roundtrip_within_bound_and_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=g) * 0.05).to(DEV, dtype)
    w[0] = 0  # an all-zero row (or element)
    q = I8.quantize(w, backend="triton")
    r = I8.quantize_reference(w)
    assert q.codes.dtype == torch.int8 and q.shape == w.shape and q.nbytes == I8.nbytes(w.shape)
    assert (q.codes.int() - r.codes.int()).abs().max() <= 1  # a tie may round the other way (fp32 scale)
    assert (q.codes != r.codes).sum() <= max(2, q.codes.numel() // 1000)
    torch.testing.assert_close(q.scale, r.scale)
    back = I8.dequantize(q, torch.float32, backend="triton")
    assert torch.equal(back, I8.dequantize_reference(q, torch.float32))
    assert ((back - w.float()).abs() <= I8.error_bound(w, q)).all()
    assert (back[0] == 0).all()
    out = torch.empty(q.numel + 10, dtype=dtype, device=DEV)
    into = I8.dequantize(q, dtype, out=out, backend="triton")
    assert into.data_ptr() == out.data_ptr() and into.shape == w.shape


def test_bytes_per_param():
    assert I8.bytes_per_param(4096) == 1 + 4 / 4096
    assert I8.nbytes((11008, 4096)) == 11008 * 4096 + 4 * 11008


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_kernels_large(dtype):
    w = (torch.randn(4096, 1000, device="cuda") * 0.02).to(dtype)
    q = I8.quantize(w)
    r = I8.quantize_reference(w)
    assert (q.codes.int() - r.codes.int()).abs().max() <= 1
    back = I8.dequantize(q, torch.float32)
    assert ((back - w.float()).abs() <= I8.error_bound(w, q)).all()
