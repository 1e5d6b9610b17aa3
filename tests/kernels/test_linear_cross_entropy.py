"""Fused linear cross-entropy: loss and gradients against F.cross_entropy(x @ W.T) over odd sizes."""

import pytest
import torch

from memtune.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference


def _check(n, h, v, chunk, backend, reduction="mean", smoothing=0.0, ignore=True, dtype=torch.float32,
           device="cpu", block_v=256, atol=1e-5, rtol=1e-4, grad_scale=1.5, low_memory=False):
    g = torch.Generator().manual_seed(n * 1000 + v)
    x = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g) * 0.5).to(device, dtype).requires_grad_()
    y = torch.randint(v, (n,), generator=g).to(device)
    if ignore:
        y[::3] = -100
    loss = linear_cross_entropy(x, w, y, reduction=reduction, label_smoothing=smoothing, chunk_tokens=chunk,
                                backend=backend, block_v=block_v, low_memory=low_memory)
    (loss * grad_scale).backward()  # grad_output != 1 exercises the backward's scaling
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = linear_cross_entropy_reference(x2, w2, y, reduction=reduction, label_smoothing=smoothing)
    (ref * grad_scale).backward()
    torch.testing.assert_close(loss.float(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(x.grad.float(), x2.grad.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(w.grad.float(), w2.grad.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("low_memory", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n,h,v,chunk,reduction,smoothing", [
    (37, 16, 1000, 16, "mean", 0.0),  # vocab not a multiple of the 256 block, last chunk partial
    (29, 8, 333, 29, "sum", 0.1),  # label smoothing, one chunk
    (5, 4, 70, 2, "mean", 0.05),  # vocab smaller than the block
])
def test_matches_cross_entropy(backend, n, h, v, chunk, reduction, smoothing, low_memory):
    # low_memory: vocabulary slices of chunk * v // n, cut to 128s (384 of 1000, 256 of 333, 28 of 70)
    _check(n, h, v, chunk, backend, reduction, smoothing, low_memory=low_memory)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_plain_backward_leaves_the_grads_unscaled(backend):
    # grad_output 1: the Triton path checks it on the device and skips the pass over dW
    _check(11, 8, 300, 5, backend, grad_scale=1.0)


@pytest.mark.parametrize("low_memory", [False, True])
def test_no_grad_and_frozen_weight_or_input(low_memory):
    x = torch.randn(9, 4, requires_grad=True)
    w = torch.randn(50, 4)
    y = torch.randint(50, (9,))
    with torch.no_grad():
        a = linear_cross_entropy(x, w, y, low_memory=low_memory)
    b = linear_cross_entropy(x, w, y, low_memory=low_memory)
    b.backward()
    torch.testing.assert_close(a, b)
    assert x.grad is not None and w.grad is None
    w.requires_grad_()
    x2 = x.detach()
    linear_cross_entropy(x2, w, y, low_memory=low_memory, chunk_tokens=4).backward()
    ref = w.detach().clone().requires_grad_()
    linear_cross_entropy_reference(x2, ref, y).backward()
    torch.testing.assert_close(w.grad, ref.grad)


def test_all_ignored_is_nan_like_torch():
    x, w = torch.randn(4, 3), torch.randn(10, 3)
    y = torch.full((4,), -100)
    assert torch.isnan(linear_cross_entropy(x, w, y)) and torch.isnan(linear_cross_entropy_reference(x, w, y))


@pytest.mark.gpu
@pytest.mark.parametrize("low_memory", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 2e-2)])
def test_gpu(dtype, tol, low_memory):
    # fp32 matmuls on GPU may use tf32 (~3e-4 relative); bf16 logits round at 2^-8
    _check(1000, 256, 50257, 300, "triton", smoothing=0.1, dtype=dtype, device="cuda", block_v=None,
           atol=tol, rtol=tol, low_memory=low_memory)
