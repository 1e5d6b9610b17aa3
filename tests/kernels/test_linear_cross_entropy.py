"""Fused linear cross-entropy: loss and gradients against F.cross_entropy(x @ W.T) over odd sizes."""

import pytest
import torch

from memtune.kernels import linear_cross_entropy as lce
from memtune.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference


def _check(n, h, v, chunk, backend, reduction="mean", smoothing=0.0, ignore=True, dtype=torch.float32,
           device="cpu", block_v=256, atol=1e-5, rtol=1e-4):
    g = torch.Generator().manual_seed(n * 1000 + v)
    x = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g) * 0.5).to(device, dtype).requires_grad_()
    y = torch.randint(v, (n,), generator=g).to(device)
    if ignore:
        y[::3] = -100
    loss = linear_cross_entropy(x, w, y, reduction=reduction, label_smoothing=smoothing, chunk_tokens=chunk,
                                backend=backend, block_v=block_v)
    (loss * 1.5).backward()  # grad_output != 1 exercises the backward's scaling
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = linear_cross_entropy_reference(x2, w2, y, reduction=reduction, label_smoothing=smoothing)
    (ref * 1.5).backward()
    torch.testing.assert_close(loss.float(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(x.grad.float(), x2.grad.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(w.grad.float(), w2.grad.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n,h,v,chunk,reduction,smoothing", [
    (37, 16, 1000, 16, "mean", 0.0),  # vocab not a multiple of the 256 block, last chunk partial
    (29, 8, 333, 29, "sum", 0.1),  # label smoothing, one chunk
    (5, 4, 70, 2, "mean", 0.05),  # vocab smaller than the block
])
def test_matches_cross_entropy(backend, n, h, v, chunk, reduction, smoothing):
    _check(n, h, v, chunk, backend, reduction, smoothing)


def test_no_grad_and_frozen_weight():
    x = torch.randn(9, 4, requires_grad=True)
    w = torch.randn(50, 4)
    y = torch.randint(50, (9,))
    with torch.no_grad():
        a = linear_cross_entropy(x, w, y)
    b = linear_cross_entropy(x, w, y)
    b.backward()
    torch.testing.assert_close(a, b)
    assert x.grad is not None and w.grad is None


def test_all_ignored_is_nan_like_torch():
    x, w = torch.randn(4, 3), torch.randn(10, 3)
    y = torch.full((4,), -100)
    assert torch.isnan(linear_cross_entropy(x, w, y)) and torch.isnan(linear_cross_entropy_reference(x, w, y))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 2e-2)])
def test_gpu(dtype, tol):
    # fp32 matmuls on GPU may use tf32 (~3e-4 relative); bf16 logits round at 2^-8
    _check(1000, 256, 50257, 300, "triton", smoothing=0.1, dtype=dtype, device="cuda", block_v=None,
           atol=tol, rtol=tol)


def _run(x, w, y, **kw):
    """Loss and both gradients of one call (grad_output 1.5 exercises the backward's scaling)."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = linear_cross_entropy(x, w, y, **kw)
    (loss * 1.5).backward()
    return loss.detach(), x.grad, w.grad


def _inputs(n, h, v, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(n * 7 + v)
    x = torch.randn(n, h, generator=g).to(device, dtype)
    w = (torch.randn(v, h, generator=g) * 0.5).to(device, dtype)
    y = torch.randint(v, (n,), generator=g).to(device)
    y[::3] = -100
    return x, w, y


def test_pieces_cover_the_rows():
    assert lce._pieces_of(15, 2) == [(0, 7), (7, 15)]
    assert lce._pieces_of(7, 4) == [(0, 1), (1, 3), (3, 5), (5, 7)]
    assert lce._pieces_of(2, 4) == [(0, 1), (1, 2)]  # no empty pieces
    assert lce._pieces_of(5, 1) == [(0, 5)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n,chunk,pieces,reduction,smoothing", [
    (37, 15, 2, "mean", 0.0),  # odd chunk: pieces of 7 and 8 rows; last chunk of 7 rows
    (37, 15, 4, "sum", 0.1),  # 4 unequal pieces, label smoothing
    (5, 3, 4, "mean", 0.05),  # more pieces than a chunk's rows; last chunk of 2 rows
])
def test_split_schedule_equals_serial(backend, n, chunk, pieces, reduction, smoothing):
    # off CUDA, overlap=True runs the overlapped schedule's operations (pieces, per-piece rows and dx,
    # whole-chunk dW) in program order. The rows and dW do the same arithmetic as the serial path; the
    # logits and dx matmuls are split by rows, which may change the BLAS kernel (CPU: logits differ by 1 ulp
    # for K=8). Small-integer inputs make the logits exact, so then all but dx must be equal.
    x, w, y = _inputs(n, 8, 333)
    kw = dict(chunk_tokens=chunk, backend=backend, reduction=reduction, label_smoothing=smoothing, block_v=256)
    serial = _run(x, w, y, overlap=False, **kw)
    split = _run(x, w, y, overlap=True, _pieces=pieces, **kw)
    for a, b in zip(serial, split, strict=True):  # logits rounded differently: a few fp32 ulps
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    xi, wi = x.round().clamp(-2, 2), (w * 4).round().clamp(-2, 2) / 4
    serial = _run(xi, wi, y, overlap=False, **kw)
    split = _run(xi, wi, y, overlap=True, _pieces=pieces, **kw)
    assert torch.equal(split[0], serial[0]) and torch.equal(split[2], serial[2])
    torch.testing.assert_close(split[1], serial[1], rtol=1e-6, atol=1e-8)  # g @ W split by rows
    with torch.no_grad():  # rows without the gradient pass
        assert torch.equal(linear_cross_entropy(xi, wi, y, overlap=True, _pieces=pieces, **kw), serial[0])


def test_overlap_is_off_on_cpu_by_default(monkeypatch):
    made = []
    monkeypatch.setattr(lce, "_SideStream", lambda *a: made.append(a))
    x, w, y = _inputs(6, 4, 50)
    linear_cross_entropy(x, w, y)
    linear_cross_entropy(x, w, y, overlap=True)
    assert made == []
    with pytest.raises(ValueError, match="_pieces"):
        linear_cross_entropy(x, w, y, _pieces=0)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol,loss_tol", [(torch.float32, 1e-6, 1e-6), (torch.bfloat16, 5e-3, 1e-4)])
@pytest.mark.parametrize("n,h,v,chunk,pieces", [(1000, 256, 50257, 301, 2), (4096, 512, 32000, 768, 4)])
def test_gpu_overlap_matches_serial(monkeypatch, dtype, tol, loss_tol, n, h, v, chunk, pieces):
    # the pieces' matmuls may pick other cuBLAS kernels than the whole chunk's (bf16: ~1 ulp in some
    # elements); a missing wait between the streams would show as garbage far beyond these bounds
    x, w, y = _inputs(n, h, v, "cuda", dtype)
    kw = dict(chunk_tokens=chunk, label_smoothing=0.1)
    made = []
    side = lce._SideStream
    monkeypatch.setattr(lce, "_SideStream", lambda *a: made.append(a) or side(*a))
    serial = _run(x, w, y, overlap=False, **kw)
    assert not made
    default = _run(x, w, y, _pieces=pieces, **kw)  # overlap=None: on for CUDA + Triton
    assert made
    over = _run(x, w, y, overlap=True, _pieces=pieces, **kw)
    torch.cuda.synchronize()
    for a, b in zip(default, over, strict=True):  # the same operations in the same order
        assert torch.equal(a, b)
    assert abs(over[0].item() - serial[0].item()) <= loss_tol * abs(serial[0].item())
    assert _rel(over[1], serial[1]) <= tol and _rel(over[2], serial[2]) <= tol
    with torch.no_grad():
        nog = linear_cross_entropy(x, w, y, overlap=True, _pieces=pieces, **kw)
    assert abs(nog.item() - serial[0].item()) <= loss_tol * abs(serial[0].item())
