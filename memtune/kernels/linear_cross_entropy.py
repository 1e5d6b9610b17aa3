"""Cross-entropy of a linear head's output without materializing the full logits.

loss = CE(x @ W.T, y) for x [N, H], W [V, H]. The tokens are cut into chunks of C rows; for each chunk:
  1. logits_c = x_c @ W.T            (cuBLAS, [C, V] in x's dtype: the same rounding as the eager logits)
  2. one Triton program per row: online log-sum-exp over V in blocks (pass 1), then the row's loss and its
     gradient softmax - onehot (with label smoothing, ignore_index, the mean's 1/n_valid), written in place
     over logits_c (pass 2); all arithmetic in fp32
  3. dx_c = g_c @ W;  dW += g_c.T @ x_c   (cuBLAS; dW accumulates in W's dtype)
The loss is a scalar, so both gradients are computed in forward (three matmuls in all, no recompute of the
logits) and backward only scales them by grad_output. Extra memory: one [C, V] chunk plus dx and dW,
which any implementation returns. Idea: Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language
Models"; the chunk-and-compute-grads-in-forward layout is Liger-Kernel's fused_linear_cross_entropy.

Differences from `F.cross_entropy(x @ W.T, y)`: the log-sum-exp is summed in another order (fp32), and with
bf16 weights dW is rounded to bf16 once per chunk instead of once (in fp32 both are fp32 rounding only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # guarded: importing memtune never needs triton; the kernel runs on CUDA tensors (or the interpreter)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

CHUNK_BYTES = 192 * 2**20  # logits chunk budget when chunk_tokens is not given (<= 200 MiB beyond the grads)
BLOCK_V = 4096  # vocabulary elements per step of the row loop on GPU

if triton is not None:

    @triton.jit
    def _ce_rows_kernel(logits_ptr, stride_row, labels_ptr, loss_ptr, scale_ptr, V, ignore_index,
                        smoothing, WRITE_GRAD: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                        BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        ptr = logits_ptr + row * stride_row
        y = tl.load(labels_ptr + row)
        valid = y != ignore_index
        cols0 = tl.arange(0, BLOCK_V)
        # pass 1: online log-sum-exp (and the row sum, for label smoothing)
        m = float("-inf")
        s = 0.0
        sum_x = 0.0
        for off in range(0, V, BLOCK_V):
            cols = off + cols0
            mask = cols < V
            x = tl.load(ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
            if HAS_SMOOTHING:
                sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
        lse = m + tl.log(s)
        x_y = tl.load(ptr + tl.where(valid, y, 0)).to(tl.float32)
        loss = lse - (1.0 - smoothing) * x_y
        if HAS_SMOOTHING:
            loss -= smoothing * sum_x / V
        tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
        if WRITE_GRAD:
            # pass 2: gradient of the (scaled) loss wrt the logits, in place
            scale = tl.where(valid, tl.load(scale_ptr), 0.0)
            for off in range(0, V, BLOCK_V):
                cols = off + cols0
                mask = cols < V
                x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) - tl.where(cols == y, 1.0 - smoothing, 0.0)
                if HAS_SMOOTHING:
                    g -= smoothing / V
                tl.store(ptr + cols, (g * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def _rows_triton(logits, labels, row_loss, scale, ignore_index, smoothing, write_grad, block_v):
    if triton is None:
        raise ImportError("Triton is needed for the CUDA kernel: pip install triton")
    n, v = logits.shape
    bv = block_v or min(BLOCK_V, triton.next_power_of_2(v))
    _ce_rows_kernel[(n,)](logits, logits.stride(0), labels, row_loss, scale, v, ignore_index, float(smoothing),
                          WRITE_GRAD=write_grad, HAS_SMOOTHING=smoothing != 0.0, BLOCK_V=bv,
                          num_warps=8 if bv >= 2048 else 4)


def _rows_torch(logits, labels, row_loss, scale, ignore_index, smoothing, write_grad, block_v=None):
    """Reference for the row kernel: same outputs, materializes the chunk in fp32."""
    lf = logits.float()
    v = lf.shape[1]
    lse = torch.logsumexp(lf, dim=1)
    valid = labels != ignore_index
    yc = torch.where(valid, labels, torch.zeros_like(labels))
    loss = lse - (1.0 - smoothing) * lf.gather(1, yc[:, None])[:, 0]
    if smoothing:
        loss = loss - smoothing * lf.sum(1) / v
    row_loss.copy_(torch.where(valid, loss, torch.zeros_like(loss)))
    if write_grad:
        g = torch.exp(lf - lse[:, None])
        g.scatter_add_(1, yc[:, None], torch.full_like(lse[:, None], -(1.0 - smoothing)))
        if smoothing:
            g -= smoothing / v
        g *= (valid.float() * scale)[:, None]
        logits.copy_(g)


def default_chunk(n_tokens: int, vocab: int, elem_bytes: int) -> int:
    c = max(1, CHUNK_BYTES // max(1, vocab * elem_bytes))
    if c >= 64:
        c -= c % 64
    return min(n_tokens, c)


def _fused(x, w, labels, ignore_index, reduction, smoothing, chunk, need_dx, need_dw, backend, block_v):
    n, _ = x.shape
    v = w.shape[0]
    rows = _rows_triton if (backend == "triton" or (backend == "auto" and x.is_cuda)) else _rows_torch
    valid = labels != ignore_index
    n_valid = valid.sum()
    if reduction == "mean":
        scale = (1.0 / n_valid.clamp(min=1).float()).reshape(1)
    else:
        scale = torch.ones(1, device=x.device, dtype=torch.float32)
    row_loss = torch.empty(n, device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x) if need_dx else None
    dw = None
    chunk = chunk or default_chunk(n, v, x.element_size())
    buf = torch.empty(min(chunk, n), v, device=x.device, dtype=x.dtype)
    write_grad = need_dx or need_dw
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        xc, lc = x[s:e], buf[: e - s]
        torch.mm(xc, w.t(), out=lc)
        rows(lc, labels[s:e], row_loss[s:e], scale, ignore_index, smoothing, write_grad, block_v)
        if need_dx:
            torch.mm(lc, w, out=dx[s:e])
        if need_dw:
            if dw is None:
                dw = torch.mm(lc.t(), xc)
            else:
                dw.addmm_(lc.t(), xc)
    del buf
    loss = row_loss.sum()
    if reduction == "mean":
        loss = loss / n_valid  # nan when every label is ignored, as F.cross_entropy
    return loss, dx, dw


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, labels, ignore_index, reduction, smoothing, chunk, backend, block_v):
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, dx, dw = _fused(x, w, labels, ignore_index, reduction, smoothing, chunk, need_dx, need_dw,
                              backend, block_v)
        # kept as attributes, not saved tensors: saved-tensor hooks (offload, compress) must not touch them
        ctx.grads = (dx, dw)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        dx, dw = ctx.grads
        ctx.grads = (None, None)
        if grad_out.item() != 1.0:  # the common loss.backward() skips a pass over dW
            dx = dx.mul_(grad_out.to(dx.dtype)) if dx is not None else None
            dw = dw.mul_(grad_out.to(dw.dtype)) if dw is not None else None
        return dx, dw, None, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         chunk_tokens: int | None = None, backend: str = "auto",
                         block_v: int | None = None) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T, labels) (fp32 result) without the full logits.

    hidden [..., H], weight [V, H], labels [...] (int). reduction: mean | sum. backend: auto (Triton on
    CUDA, torch elsewhere) | triton | torch. The matmuls run in hidden's dtype (cast first for autocast).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction {reduction!r}: the fused loss supports 'mean' and 'sum'")
    h = hidden.shape[-1]
    x = hidden.reshape(-1, h).contiguous()
    y = labels.reshape(-1).contiguous()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} hidden rows but {y.shape[0]} labels")
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    return LinearCrossEntropyFunction.apply(x, weight.contiguous(), y, int(ignore_index), reduction,
                                            float(label_smoothing), chunk_tokens, backend, block_v)


def linear_cross_entropy_reference(hidden, weight, labels, *, ignore_index=-100, reduction="mean",
                                   label_smoothing=0.0):
    """What the fused op computes, the plain way (full logits, fp32)."""
    logits = hidden.reshape(-1, hidden.shape[-1]).float() @ weight.float().t()
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
