"""int8 frozen weights with a per-row absmax scale (LLM.int8's weight format): kernels and torch reference.

Format (Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale", sec. 3.1,
vector-wise quantization; bitsandbytes `int8_vectorwise_quant` keeps the weight's row statistics `SCB` in
fp32): a weight [out, in] keeps one fp32 scale per output row, s = absmax(row) / 127, and int8 codes
q = round(w / s), rounded half away from zero and clamped to [-127, 127]. Bytes: out * in + 4 * out, i.e.
1 + 4 / in per parameter (1.001 at in = 4096). Round-trip error per element: at most s / 2 (plus fp32
rounding and the cast to the output dtype): `error_bound`. (LLM.int8's outlier decomposition concerns the
activations of its int8 matmul; we dequantize the weight and run the matmul in the compute dtype, so the
weight format alone matters here.)

`quantize` / `dequantize` run the Triton kernels on CUDA tensors (or under the interpreter with
backend="triton") and the torch reference elsewhere, with the same fp32 arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QMAX = 127.0
_BR, _BK = 32, 256  # rows x columns per program: 8192 elements


def nbytes(shape: tuple[int, ...] | torch.Size) -> int:
    rows, cols = _rows_cols(shape)
    return rows * cols + 4 * rows


def bytes_per_param(in_features: int) -> float:
    return 1.0 + 4.0 / max(1, in_features)


def _rows_cols(shape) -> tuple[int, int]:
    shape = tuple(shape)
    if len(shape) == 0:
        return 1, 1
    rows = shape[0]
    cols = 1
    for s in shape[1:]:
        cols *= s
    return rows, cols


@dataclass
class Int8Weight:
    codes: torch.Tensor  # int8 [rows, cols]
    scale: torch.Tensor  # fp32 [rows]
    shape: torch.Size
    dtype: torch.dtype  # the original weight's dtype

    format = "int8"

    @property
    def numel(self) -> int:
        return self.codes.numel()

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.scale.numel()

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scale]

    def to(self, device: torch.device | str) -> Int8Weight:
        return Int8Weight(self.codes.to(device), self.scale.to(device), self.shape, self.dtype)

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                   backend: str = "auto") -> torch.Tensor:
        return dequantize(self, dtype or self.dtype, out=out, backend=backend)


# --- Triton kernels ---------------------------------------------------------------------------------

try:  # guarded: importing memtune never needs triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    @triton.jit
    def _row_absmax_kernel(w_ptr, s_ptr, N, K, BR: tl.constexpr, BK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BR + tl.arange(0, BR)
        rmask = rows < N
        amax = tl.zeros((BR,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            m = rmask[:, None] & (cols[None, :] < K)
            x = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=m, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        tl.store(s_ptr + rows, amax, mask=rmask)

    @triton.jit
    def _pack_kernel(w_ptr, amax_ptr, q_ptr, N, K, BR: tl.constexpr, BK: tl.constexpr, QMAX: tl.constexpr):
        pr = tl.program_id(0).to(tl.int64)
        pc = tl.program_id(1).to(tl.int64)
        rows = pr * BR + tl.arange(0, BR)
        cols = pc * BK + tl.arange(0, BK)
        m = (rows[:, None] < N) & (cols[None, :] < K)
        amax = tl.load(amax_ptr + rows, mask=rows < N, other=0.0)
        inv = tl.where(amax > 0, QMAX / tl.maximum(amax, 1e-30), 0.0)
        offs = rows[:, None] * K + cols[None, :]
        y = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32) * inv[:, None]
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)  # clamp before the cast
        q = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)  # truncation -> round half away from zero
        tl.store(q_ptr + offs, q, mask=m)

    @triton.jit
    def _unpack_kernel(q_ptr, s_ptr, out_ptr, N, K, BR: tl.constexpr, BK: tl.constexpr):
        pr = tl.program_id(0).to(tl.int64)
        pc = tl.program_id(1).to(tl.int64)
        rows = pr * BR + tl.arange(0, BR)
        cols = pc * BK + tl.arange(0, BK)
        m = (rows[:, None] < N) & (cols[None, :] < K)
        offs = rows[:, None] * K + cols[None, :]
        s = tl.load(s_ptr + rows, mask=rows < N, other=0.0)
        q = tl.load(q_ptr + offs, mask=m, other=0).to(tl.float32)
        tl.store(out_ptr + offs, (q * s[:, None]).to(out_ptr.dtype.element_ty), mask=m)


def _use_triton(t: torch.Tensor, backend: str) -> bool:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend {backend!r}: use auto, triton or torch")
    if backend == "auto":
        return t.is_cuda and triton is not None
    if backend == "triton" and triton is None:
        raise ImportError("Triton is needed for the int8 weight kernels: pip install triton")
    return backend == "triton"


def quantize(w: torch.Tensor, backend: str = "auto") -> Int8Weight:
    """A floating weight (rows = dim 0) -> Int8Weight. backend: auto (Triton on CUDA) | triton | torch."""
    if not _use_triton(w, backend):
        return quantize_reference(w)
    rows, cols = _rows_cols(w.shape)
    w2 = w.detach().contiguous().view(rows, cols)
    amax = torch.empty(rows, dtype=torch.float32, device=w.device)
    codes = torch.empty(rows, cols, dtype=torch.int8, device=w.device)
    if w2.numel():
        _row_absmax_kernel[(triton.cdiv(rows, _BR),)](w2, amax, rows, cols, BR=_BR, BK=_BK, num_warps=8)
        _pack_kernel[(triton.cdiv(rows, _BR), triton.cdiv(cols, _BK))](w2, amax, codes, rows, cols, BR=_BR, BK=_BK,
                                                                     QMAX=QMAX, num_warps=8)
    return Int8Weight(codes, amax / QMAX, w.shape, w.dtype)


def dequantize(q: Int8Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
               backend: str = "auto") -> torch.Tensor:
    """Int8Weight -> a tensor of q.shape in `dtype`, into `out` (a contiguous buffer of >= numel) when given."""
    dtype = dtype or q.dtype
    n = q.numel
    if out is None:
        out = torch.empty(n, dtype=dtype, device=q.device)
    else:
        if out.dtype != dtype or not out.is_contiguous() or out.numel() < n:
            raise ValueError("out must be a contiguous buffer of the output dtype with at least numel elements")
        out = out.view(-1)[:n]
    if not _use_triton(q.codes, backend):
        out.copy_(dequantize_reference(q, torch.float32).reshape(-1))
        return out.view(q.shape)
    rows, cols = q.codes.shape
    if n:
        _unpack_kernel[(triton.cdiv(rows, _BR), triton.cdiv(cols, _BK))](q.codes, q.scale, out, rows, cols, BR=_BR,
                                                                       BK=_BK, num_warps=8)
    return out.view(q.shape)


def quantize_reference(w: torch.Tensor) -> Int8Weight:
    rows, cols = _rows_cols(w.shape)
    x = w.detach().reshape(rows, cols).float()
    amax = x.abs().amax(dim=1) if cols else x.new_zeros(rows)
    inv = torch.where(amax > 0, QMAX / amax.clamp_min(1e-30), torch.zeros_like(amax))
    y = (x * inv[:, None]).clamp(-QMAX, QMAX)
    q = torch.where(y >= 0, y + 0.5, y - 0.5).trunc().to(torch.int8)
    return Int8Weight(q, amax / QMAX, w.shape, w.dtype)


def dequantize_reference(q: Int8Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    return (q.codes.float() * q.scale[:, None]).view(q.shape).to(dtype or q.dtype)


def error_bound(w: torch.Tensor, q: Int8Weight) -> torch.Tensor:
    """Per-element bound on |w - dequantize(q)| before the cast to an output dtype: half a step of its row."""
    rows, cols = _rows_cols(q.shape)
    b = (q.scale / 2 * (1 + 1e-5))[:, None].expand(rows, cols).reshape(q.shape)
    return b + w.detach().float().abs() * 1e-6 + 1e-30
