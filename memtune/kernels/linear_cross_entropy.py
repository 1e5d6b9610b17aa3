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

Overlapped schedule (default on CUDA with the Triton rows; `overlap=False` gives the serial one above): the
row kernel is memory-bound and sits between compute-bound matmuls, so each chunk's buffer is cut by rows
into P nearly equal pieces (P = 2 by default) and the rows run on a second, high-priority stream while the
main stream multiplies the next piece:
  main:  logits_1 .. logits_P;  wait(rows_1) dx_1 .. wait(rows_P) dx_P;  dW += g_c.T @ x_c (whole chunk)
  side:  wait(logits_1) rows_1 .. wait(logits_P) rows_P
rows_p hides behind logits_{p+1}, and rows_P behind dx_1. No memory is added (the pieces are views of the
one buffer), dW is still updated once per chunk with K = C, and the next chunk's logits, on the main stream,
start only after this chunk's dx and dW have read the buffer. Each row's arithmetic is unchanged, and dW's
sums run in the same order: only the logits and dx matmuls are split by rows (the BLAS may pick another
kernel for fewer rows, which can move a result by an ulp). Off CUDA (tests) `overlap=True` runs the same
pieces in program order. By count the rows fit behind the matmuls: per token they move 3V elements
(~0.3 us at 2.7 TB/s for V = 128256, bf16) against ~0.75 us per token for each matmul (H = 2048, 700
TFLOP/s); but they only get the SMs the matmuls leave free, so the gain is for benchmarks/loss.py to show
(its "serial" rows run the schedule above).

Differences from `F.cross_entropy(x @ W.T, y)`: the log-sum-exp is summed in another order (fp32), and with
bf16 weights dW is rounded to bf16 once per chunk instead of once (in fp32 both are fp32 rounding only).
"""

from __future__ import annotations

import contextlib

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


def _pieces_of(m, pieces):
    """Row ranges of min(pieces, m) nearly equal pieces of m rows (sizes differ by at most one)."""
    k = max(1, min(pieces, m))
    cuts = [m * i // k for i in range(k + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(k)]


class _InOrder:
    """No second stream: the schedule's operations run in program order (CPU, serial path)."""

    def side(self):
        return contextlib.nullcontext()

    def main_done(self, i):
        return None

    def side_done(self, i):
        return None

    def main_wait(self, ev):
        pass

    def side_wait(self, ev):
        pass


class _SideStream(_InOrder):
    """The rows on a second CUDA stream; events order them against the main stream's matmuls."""

    def __init__(self, device, n_events, priority):
        self.main = torch.cuda.current_stream(device)
        self.stream = torch.cuda.Stream(device=device, priority=priority)
        # reused from chunk to chunk: a wait enqueued before the event is recorded again keeps the old record
        self.events = [torch.cuda.Event() for _ in range(n_events)]

    def side(self):
        return torch.cuda.stream(self.stream)

    def main_done(self, i):
        self.events[i].record(self.main)
        return self.events[i]

    def side_done(self, i):
        self.events[i].record(self.stream)
        return self.events[i]

    def main_wait(self, ev):
        self.main.wait_event(ev)

    def side_wait(self, ev):
        self.stream.wait_event(ev)


def _fused(x, w, labels, ignore_index, reduction, smoothing, chunk, need_dx, need_dw, backend, block_v,
           overlap=None, pieces=2, side_priority=-1):
    n, _ = x.shape
    v = w.shape[0]
    rows = _rows_triton if (backend == "triton" or (backend == "auto" and x.is_cuda)) else _rows_torch
    if overlap is None:
        overlap = x.is_cuda and rows is _rows_triton
    pieces = max(1, int(pieces)) if overlap else 1
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
    # events 0..P-1: logits of piece p done (main); P..2P-1: rows of piece p done (side); 2P: entry
    sched = _SideStream(x.device, 2 * pieces + 1, side_priority) if overlap and x.is_cuda else _InOrder()
    # entry: x, w, labels, scale and the buffer come from the main stream. Everything the side stream reads is
    # a view of tensors that outlive the loop (buf, labels, row_loss, scale), and the main stream waits for
    # every piece's rows before it goes on, so nothing is freed or reused while the side stream reads it.
    sched.side_wait(sched.main_done(2 * pieces))
    done = []
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        xc, lc = x[s:e], buf[: e - s]
        parts = _pieces_of(e - s, pieces)
        ready = []
        for i, (a, b) in enumerate(parts):
            torch.mm(xc[a:b], w.t(), out=lc[a:b])
            ready.append(sched.main_done(i))
        done = []
        with sched.side():
            for i, ((a, b), ev) in enumerate(zip(parts, ready, strict=True)):
                sched.side_wait(ev)
                rows(lc[a:b], labels[s + a:s + b], row_loss[s + a:s + b], scale, ignore_index, smoothing,
                     write_grad, block_v)
                done.append(sched.side_done(pieces + i))
        for (a, b), ev in zip(parts, done, strict=True):
            sched.main_wait(ev)  # unconditional: the next chunk's logits overwrite the buffer
            if need_dx:
                torch.mm(lc[a:b], w, out=dx[s + a:s + b])
        if need_dw:  # the whole chunk at once: dW is read and written once per chunk, as in the serial path
            if dw is None:
                dw = torch.mm(lc.t(), xc)
            else:
                dw.addmm_(lc.t(), xc)
    if done:  # exit: already implied by the waits above; explicit so that row_loss is safe to read
        sched.main_wait(done[-1])
    del buf
    loss = row_loss.sum()
    if reduction == "mean":
        loss = loss / n_valid  # nan when every label is ignored, as F.cross_entropy
    return loss, dx, dw


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, labels, ignore_index, reduction, smoothing, chunk, backend, block_v, overlap=None,
                pieces=2, side_priority=-1):
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, dx, dw = _fused(x, w, labels, ignore_index, reduction, smoothing, chunk, need_dx, need_dw,
                              backend, block_v, overlap, pieces, side_priority)
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
        return dx, dw, None, None, None, None, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         chunk_tokens: int | None = None, backend: str = "auto",
                         block_v: int | None = None, overlap: bool | None = None, _pieces: int = 2,
                         _side_priority: int = -1) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T, labels) (fp32 result) without the full logits.

    hidden [..., H], weight [V, H], labels [...] (int). reduction: mean | sum. backend: auto (Triton on
    CUDA, torch elsewhere) | triton | torch. The matmuls run in hidden's dtype (cast first for autocast).
    overlap: run the row kernel on a second CUDA stream behind the matmuls (see the module doc); None = on
    for CUDA with the Triton rows, False = the serial schedule; True off CUDA runs the same pieces in order.
    _pieces (rows pieces per chunk) and _side_priority (the second stream's priority) are for benchmarks.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction {reduction!r}: the fused loss supports 'mean' and 'sum'")
    if int(_pieces) < 1:
        raise ValueError(f"_pieces={_pieces}: at least 1")
    h = hidden.shape[-1]
    x = hidden.reshape(-1, h).contiguous()
    y = labels.reshape(-1).contiguous()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} hidden rows but {y.shape[0]} labels")
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    return LinearCrossEntropyFunction.apply(x, weight.contiguous(), y, int(ignore_index), reduction,
                                            float(label_smoothing), chunk_tokens, backend, block_v, overlap,
                                            int(_pieces), int(_side_priority))


def linear_cross_entropy_reference(hidden, weight, labels, *, ignore_index=-100, reduction="mean",
                                   label_smoothing=0.0):
    """What the fused op computes, the plain way (full logits, fp32)."""
    logits = hidden.reshape(-1, hidden.shape[-1]).float() @ weight.float().t()
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
