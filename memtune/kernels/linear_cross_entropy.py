"""Cross-entropy of a linear head's output without materializing the full logits.

loss = CE(x @ W.T, y) for x [N, H], W [V, H]. The tokens are cut into chunks of C rows; for each chunk:
  1. logits_c = x_c @ W.T            (cuBLAS, [C, V] in x's dtype: the same rounding as the eager logits)
  2. one Triton program per row: online log-sum-exp over V in blocks (pass 1), then the row's loss and its
     gradient softmax - onehot (with label smoothing, ignore_index, the mean's 1/n_valid), written in place
     over logits_c (pass 2); all arithmetic in fp32
  3. dx_c = g_c @ W;  dW += g_c.T @ x_c   (cuBLAS; dW accumulates in W's dtype)
The loss is a scalar, so both gradients are computed in forward (three matmuls in all, no recompute of the
logits) and backward only scales them by grad_output (on the device: no host sync). Extra memory: one
[C, V] chunk plus dx and dW, which any implementation returns.

low_memory=True trades one more matmul for a smaller chunk without re-reading dW per chunk: the token
pass computes the loss, each row's log-sum-exp and dx; then a pass over vocabulary slices [N, Vs]
recomputes those logits, turns them into gradients with the stored log-sum-exp and writes
dW[slice] = g.T @ x once (summed over all tokens inside one matmul, so dW is rounded once).

Idea: Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models"; the
chunk-and-compute-grads-in-forward layout is Liger-Kernel's fused_linear_cross_entropy. H100 numbers
(8192 tokens, hidden 2048, vocab 128256, bf16): docs/benchmarks.md.

Differences from `F.cross_entropy(x @ W.T, y)`: the log-sum-exp is summed in another order (fp32), and with
bf16 weights dW is rounded to bf16 once per chunk instead of once (low_memory: once; in fp32 both are fp32
rounding only).
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
LOW_CHUNK_BYTES = 56 * 2**20  # the same with low_memory (Liger-Kernel's chunk is 63 MiB at vocab 128256)
BLOCK_V = 4096  # vocabulary elements per step of the row loop on GPU

if triton is not None:

    @triton.jit
    def _write_grad(ptr, n_cols, col0, y, lse, scale, smoothing, V, HAS_SMOOTHING: tl.constexpr,
                    BLOCK_V: tl.constexpr):
        # softmax - onehot (label-smoothed), times scale, in place over n_cols logits at vocab offset col0
        cols0 = tl.arange(0, BLOCK_V)
        for off in range(0, n_cols, BLOCK_V):
            cols = off + cols0
            mask = cols < n_cols
            x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(cols + col0 == y, 1.0 - smoothing, 0.0)
            if HAS_SMOOTHING:
                g -= smoothing / V
            tl.store(ptr + cols, (g * scale).to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _ce_rows_kernel(logits_ptr, stride_row, labels_ptr, loss_ptr, lse_ptr, scale_ptr, V, ignore_index,
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
        tl.store(lse_ptr + row, lse)
        if WRITE_GRAD:  # pass 2: gradient of the (scaled) loss wrt the logits, in place
            _write_grad(ptr, V, 0, y, lse, tl.where(valid, tl.load(scale_ptr), 0.0), smoothing, V,
                        HAS_SMOOTHING, BLOCK_V)

    @triton.jit
    def _ce_grad_cols_kernel(logits_ptr, stride_row, labels_ptr, lse_ptr, scale_ptr, n_cols, col0, V,
                             ignore_index, smoothing, HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr):
        # the gradient over a vocabulary slice [col0, col0 + n_cols) of every row, given each row's lse
        row = tl.program_id(0).to(tl.int64)
        y = tl.load(labels_ptr + row)
        scale = tl.where(y != ignore_index, tl.load(scale_ptr), 0.0)
        _write_grad(logits_ptr + row * stride_row, n_cols, col0, y, tl.load(lse_ptr + row), scale, smoothing, V,
                    HAS_SMOOTHING, BLOCK_V)

    @triton.jit
    def _scale_unless_one_kernel(ptr, n, g_ptr, BLOCK: tl.constexpr):
        # reads grad_output on the device: no host sync, and the common loss.backward() (grad 1) is free
        g = tl.load(g_ptr).to(tl.float32)
        if g != 1.0:
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            v = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(ptr + offs, (v * g).to(ptr.dtype.element_ty), mask=mask)


def _scale_by_grad(t, grad_out, use_triton):
    """t *= grad_out in place, skipped when grad_out is 1; the Triton path reads it without a host sync."""
    if t is None:
        return None
    if use_triton:
        block = 16384
        _scale_unless_one_kernel[(triton.cdiv(t.numel(), block),)](t, t.numel(), grad_out, BLOCK=block, num_warps=8)
    elif grad_out.item() != 1.0:
        t.mul_(grad_out.to(t.dtype))
    return t


def _block(block_v, n_cols):
    """The vocabulary block of a row loop (every Triton launch here starts with it)."""
    if triton is None:
        raise ImportError("Triton is needed for the CUDA kernel: pip install triton")
    return block_v or min(BLOCK_V, triton.next_power_of_2(n_cols))


def _rows_triton(logits, labels, row_loss, lse, scale, ignore_index, smoothing, write_grad, block_v):
    n, v = logits.shape
    bv = _block(block_v, v)
    _ce_rows_kernel[(n,)](logits, logits.stride(0), labels, row_loss, lse, scale, v, ignore_index,
                          float(smoothing), WRITE_GRAD=write_grad, HAS_SMOOTHING=smoothing != 0.0, BLOCK_V=bv,
                          num_warps=8 if bv >= 2048 else 4)


def _grad_cols_triton(logits, labels, lse, scale, col0, vocab, ignore_index, smoothing, block_v):
    n, nc = logits.shape
    bv = _block(block_v, nc)
    _ce_grad_cols_kernel[(n,)](logits, logits.stride(0), labels, lse, scale, nc, col0, vocab, ignore_index,
                               float(smoothing), HAS_SMOOTHING=smoothing != 0.0, BLOCK_V=bv,
                               num_warps=8 if bv >= 2048 else 4)


def _grad_torch(lf, labels, lse, scale, col0, vocab, ignore_index, smoothing):
    """softmax - onehot over columns [col0, col0 + lf.shape[1]) of each row, scaled; fp32."""
    valid = labels != ignore_index
    g = torch.exp(lf - lse[:, None])
    cols = torch.arange(col0, col0 + lf.shape[1], device=lf.device)
    g -= (cols[None, :] == labels[:, None]).float() * (1.0 - smoothing)
    if smoothing:
        g -= smoothing / vocab
    return g * (valid.float() * scale)[:, None]


def _rows_torch(logits, labels, row_loss, lse_out, scale, ignore_index, smoothing, write_grad, block_v=None):
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
    lse_out.copy_(lse)
    if write_grad:
        logits.copy_(_grad_torch(lf, labels, lse, scale, 0, v, ignore_index, smoothing))


def _grad_cols_torch(logits, labels, lse, scale, col0, vocab, ignore_index, smoothing, block_v=None):
    """Reference for the vocabulary-slice gradient kernel."""
    logits.copy_(_grad_torch(logits.float(), labels, lse, scale, col0, vocab, ignore_index, smoothing))


def _use_triton(backend, x):
    return backend == "triton" or (backend == "auto" and x.is_cuda)


def default_chunk(n_tokens: int, vocab: int, elem_bytes: int, budget: int = CHUNK_BYTES, multiple: int = 64) -> int:
    c = max(1, budget // max(1, vocab * elem_bytes))
    if c >= multiple:
        c -= c % multiple
    return min(n_tokens, c)


def _fused(x, w, labels, ignore_index, reduction, smoothing, chunk, need_dx, need_dw, backend, block_v,
           low_memory):
    n, _ = x.shape
    v = w.shape[0]
    tri = _use_triton(backend, x)
    rows = _rows_triton if tri else _rows_torch
    elem = x.element_size()
    if low_memory:
        chunk = chunk or default_chunk(n, v, elem, LOW_CHUNK_BYTES, 32)
        vchunk = chunk * v // n  # same bytes as a token chunk
        vchunk = min(v, max(1, vchunk - vchunk % 128 if vchunk >= 128 else vchunk))
    else:
        chunk = chunk or default_chunk(n, v, elem)
        vchunk = 0
    c0 = min(chunk, n)
    store = torch.empty(max(c0 * v, n * vchunk if need_dw else 0), device=x.device, dtype=x.dtype)
    buf = store[: c0 * v].view(c0, v)
    torch.mm(x[:c0], w.t(), out=buf)  # queued first: the GPU starts while the setup below runs
    valid = labels != ignore_index
    n_valid = valid.sum()
    if reduction == "mean":
        scale = (1.0 / n_valid.clamp(min=1).float()).reshape(1)
    else:
        scale = torch.ones(1, device=x.device, dtype=torch.float32)
    row_loss = torch.empty(n, device=x.device, dtype=torch.float32)
    lse = torch.empty(n, device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x) if need_dx else None
    dw = None
    # one pass over token chunks: loss, and dx; dW too unless low_memory (then a pass over vocabulary slices)
    dw_here = need_dw and not low_memory
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        xc, lc = x[s:e], buf[: e - s]
        if s:
            torch.mm(xc, w.t(), out=lc)
        rows(lc, labels[s:e], row_loss[s:e], lse[s:e], scale, ignore_index, smoothing, need_dx or dw_here,
             block_v)
        if need_dx:
            torch.mm(lc, w, out=dx[s:e])
        if dw_here:
            if dw is None:
                dw = torch.mm(lc.t(), xc)
            else:
                dw.addmm_(lc.t(), xc)
    if need_dw and low_memory:
        # recompute the logits a vocabulary slice at a time: each slice of dW is written once, no
        # read-modify-write over chunks, and summed over all tokens inside one matmul
        grad_cols = _grad_cols_triton if tri else _grad_cols_torch
        dw = torch.empty_like(w)
        for a in range(0, v, vchunk):
            b = min(v, a + vchunk)
            lv = store[: n * (b - a)].view(n, b - a)
            torch.mm(x, w[a:b].t(), out=lv)
            grad_cols(lv, labels, lse, scale, a, v, ignore_index, smoothing, block_v)
            torch.mm(lv.t(), x, out=dw[a:b])
    del buf, store
    loss = row_loss.sum()
    if reduction == "mean":
        loss = loss / n_valid  # nan when every label is ignored, as F.cross_entropy
    return loss, dx, dw


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, labels, ignore_index, reduction, smoothing, chunk, backend, block_v, low_memory):
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, dx, dw = _fused(x, w, labels, ignore_index, reduction, smoothing, chunk, need_dx, need_dw,
                              backend, block_v, low_memory)
        # kept as attributes, not saved tensors: saved-tensor hooks (offload, compress) must not touch them
        ctx.grads = (dx, dw)
        ctx.triton = _use_triton(backend, x)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        dx, dw = ctx.grads
        ctx.grads = (None, None)
        return (_scale_by_grad(dx, grad_out, ctx.triton), _scale_by_grad(dw, grad_out, ctx.triton),
                None, None, None, None, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         chunk_tokens: int | None = None, backend: str = "auto",
                         block_v: int | None = None, low_memory: bool = False) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T, labels) (fp32 result) without the full logits.

    hidden [..., H], weight [V, H], labels [...] (int). reduction: mean | sum. backend: auto (Triton on
    CUDA, torch elsewhere) | triton | torch. The matmuls run in hidden's dtype (cast first for autocast).
    chunk_tokens: tokens per chunk (default: 192 MiB of logits, 56 MiB with low_memory). low_memory: four
    matmuls instead of three, in a quarter of the memory (see the module doc).
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
                                            float(label_smoothing), chunk_tokens, backend, block_v,
                                            bool(low_memory))


def linear_cross_entropy_reference(hidden, weight, labels, *, ignore_index=-100, reduction="mean",
                                   label_smoothing=0.0):
    """What the fused op computes, the plain way (full logits, fp32)."""
    logits = hidden.reshape(-1, hidden.shape[-1]).float() @ weight.float().t()
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
