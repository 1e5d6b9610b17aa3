"""The linear layer of a frozen, quantized weight: y = x @ W^T forward, dx = dy @ W backward, no dW.

`frozen_linear(x, qweight, bias)` is the forward of a frozen nn.Linear whose weight is stored as a
`Bf16Weight`, `memtune.kernels.int8_weight.Int8Weight` or `memtune.kernels.nf4.NF4Weight`
(`quantize_weight(w, format)` makes one). Two ways to compute it (`kernel`):
- "dequant" (default): a Triton kernel dequantizes W into a reusable workspace of the compute dtype (one
  memory-bound pass: 0.516 B read + 2 B written per parameter for NF4 -> bf16), then cuBLAS
  (`torch.mm` / `torch.addmm`). The transient is one layer's weight in the compute dtype; the workspace is
  shared by every layer of one application (`Workspace`). A bf16-stored weight in bf16 compute is used as
  it is, with no workspace.
- "fused" (NF4 only, CUDA or the interpreter): a Triton GEMM that dequantizes W's tiles inside its K loop
  (`memtune.kernels.nf4.fused_matmul`), so no workspace. Whether it beats dequant + cuBLAS on a GPU is what
  `benchmarks/weights.py` measures.

What autograd keeps: the `autograd.Function` saves no tensor through `save_for_backward` (saved-tensor hooks
see nothing): it holds a reference to the quantized weight object, which lives on the module anyway, and
dequantizes again in backward. Not the input x (a frozen weight needs no weight gradient) and not a
dequantized W. For comparison, `F.linear(x, W_frozen)` saves W^T (a view of the parameter, no new bytes),
and under autocast the 16-bit copy of an fp32 weight (one more copy of every weight, kept from forward to
backward): `tests/kernels/test_frozen_linear.py` counts both.

Compute dtype: autocast's dtype where autocast is on for x's device (what F.linear would compute in), else
x's dtype. The output has the compute dtype, as under autocast; dx has x's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memtune.kernels import int8_weight, nf4

FORMATS = ("bf16", "int8", "nf4")
KERNELS = ("dequant", "fused")


@dataclass
class Bf16Weight:
    """A weight stored in bf16 (a cast of fp32 weights; bf16 weights as they are)."""

    data: torch.Tensor
    dtype: torch.dtype  # the original weight's dtype

    format = "bf16"

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def numel(self) -> int:
        return self.data.numel()

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel() * 2

    def tensors(self) -> list[torch.Tensor]:
        return [self.data]

    def to(self, device: torch.device | str) -> Bf16Weight:
        return Bf16Weight(self.data.to(device), self.dtype)

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                   backend: str = "auto") -> torch.Tensor:
        dtype = dtype or self.dtype
        if out is None:
            return self.data.to(dtype, copy=True)
        view = out.view(-1)[: self.numel].view(self.shape)
        view.copy_(self.data)
        return view


QuantizedWeight = Any  # Bf16Weight | Int8Weight | NF4Weight


def quantize_weight(w: torch.Tensor, fmt: str, double_quant: bool = True, backend: str = "auto") -> QuantizedWeight:
    """A weight tensor -> its stored form in `fmt` (bf16 | int8 | nf4)."""
    w = w.detach()
    if fmt == "bf16":
        return Bf16Weight(w.to(torch.bfloat16, copy=True).contiguous(), w.dtype)
    if fmt == "int8":
        return int8_weight.quantize(w, backend=backend)
    if fmt == "nf4":
        return nf4.quantize(w, double_quant=double_quant, backend=backend)
    raise ValueError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")


def stored_bytes(fmt: str, shape: tuple[int, ...] | torch.Size, double_quant: bool = True) -> int:
    """Exact bytes of a weight of `shape` stored in `fmt` (what `quantize_weight(...).nbytes` gives)."""
    numel = 1
    for s in shape:
        numel *= s
    if fmt == "bf16":
        return 2 * numel
    if fmt == "int8":
        return int8_weight.nbytes(tuple(shape))
    if fmt == "nf4":
        return nf4.nbytes(numel, double_quant)
    raise ValueError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")


def bytes_per_param(fmt: str, in_features: int = 4096, double_quant: bool = True) -> float:
    """Bytes per parameter of a large weight with `in_features` columns (int8's row scale depends on it)."""
    if fmt == "bf16":
        return 2.0
    if fmt == "int8":
        return int8_weight.bytes_per_param(in_features)
    if fmt == "nf4":
        return nf4.bytes_per_param(double_quant)
    raise ValueError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")


class Workspace:
    """One flat buffer per (device, dtype), grown to the largest weight dequantized into it and reused by
    every layer (calls on one stream run in order, so a layer's matmul has read it before the next layer's
    dequantize writes it)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, int | None, torch.dtype], torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (device.type, device.index, dtype)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            self._bufs.pop(key, None)  # free the smaller one first
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._bufs[key] = buf
        return buf

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())

    def release(self) -> None:
        self._bufs.clear()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What F.linear would compute in: autocast's dtype where autocast is on for x's device, else x's."""
    dev = x.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        pass
    return x.dtype


def _use_fused(q: QuantizedWeight, kernel: str, device: torch.device) -> bool:
    from memtune.kernels import triton_usable

    return kernel == "fused" and isinstance(q, nf4.NF4Weight) and triton_usable(device)


def _dense(q: QuantizedWeight, dtype: torch.dtype, ws: Workspace | None, backend: str) -> torch.Tensor:
    """W in `dtype`: the stored bf16 tensor itself, or dequantized into the workspace."""
    if isinstance(q, Bf16Weight) and dtype == torch.bfloat16:
        return q.data
    out = ws.get(q.numel, dtype, q.device) if ws is not None else None
    return q.dequantize(dtype, out=out, backend=backend)


class _FrozenLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, q, dtype, ws, backend, kernel):
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        b = bias.to(dtype) if bias is not None and bias.dtype != dtype else bias
        with torch.autocast(x.device.type, enabled=False):
            if _use_fused(q, kernel, x.device):
                y = nf4.fused_matmul(x2, q, dtype, backend="triton")
                if b is not None:
                    y += b
            else:
                w = _dense(q, dtype, ws, backend)
                y = torch.addmm(b, x2, w.t()) if b is not None else torch.mm(x2, w.t())
        # nothing through save_for_backward: the quantized weight is the module's own object
        ctx.q, ctx.dtype, ctx.ws, ctx.backend, ctx.kernel = q, dtype, ws, backend, kernel
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        dx = db = None
        n = dy.shape[-1]
        dy2 = dy.reshape(-1, n)
        if ctx.needs_input_grad[0]:
            g = dy2 if dy2.dtype == ctx.dtype else dy2.to(ctx.dtype)
            with torch.autocast(dy.device.type, enabled=False):
                if _use_fused(ctx.q, ctx.kernel, dy.device):
                    dx = nf4.fused_matmul_t(g, ctx.q, ctx.dtype, backend="triton")
                else:
                    dx = torch.mm(g, _dense(ctx.q, ctx.dtype, ctx.ws, ctx.backend))
            dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            db = dy2.sum(0).to(ctx.bias_dtype)
        return dx, db, None, None, None, None, None


def frozen_linear(x: torch.Tensor, q: QuantizedWeight, bias: torch.Tensor | None = None, *,
                  workspace: Workspace | None = None, backend: str = "auto", kernel: str = "dequant") -> torch.Tensor:
    """F.linear(x, W, bias) for a frozen W stored as `q`; gradients flow to x (and to bias if it wants one)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r}: use one of {', '.join(KERNELS)}")
    if x.shape[-1] != q.shape[-1]:
        raise RuntimeError(f"frozen_linear: input has {x.shape[-1]} features, the weight {tuple(q.shape)} wants "
                           f"{q.shape[-1]}")
    return _FrozenLinearFn.apply(x, bias, q, compute_dtype(x), workspace, backend, kernel)


def reference_linear(x: torch.Tensor, q: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure torch: F.linear with the dequantized weight in the compute dtype (autograd keeps what it keeps)."""
    dtype = compute_dtype(x)
    w = q.dequantize(torch.float32, backend="torch").to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return torch.nn.functional.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))
