"""Block-wise quantization of saved activations: int8 with a per-group absmax scale, or fp8 e4m3.

A tensor is read in memory order and cut into groups of GROUP consecutive elements; each group keeps one
fp32 scale (absmax / qmax) and GROUP 1-byte codes, so a bf16 tensor shrinks to (GROUP + 4) / (2 * GROUP)
of its size (0.516 at GROUP=128). Round-trip error per element is at most scale / 2 = absmax / 254 for
int8 (round half away from zero) and |x| * 2^-4 (plus a subnormal floor of scale * 2^-10) for e4m3.

`pack` / `unpack` run the Triton kernels on CUDA tensors and the torch reference elsewhere; both give the
same codes up to fp32 rounding of the scale. The kernels are memory-bound: one read of x and one write of
the codes (pack), the reverse (unpack).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils._pytree

GROUP = 128  # elements per scale
QMAX = {"int8": 127.0, "fp8": 448.0}  # largest code magnitude (e4m3fn max normal is 448)
_ROWS = 64  # groups per program: 8192 elements, enough bytes in flight per SM
_FP8_DTYPE = torch.float8_e4m3fn


def fp8_supported(device: torch.device | str | None = None) -> bool:
    """fp8 e4m3 conversion instructions exist from compute capability 8.9 (Ada, Hopper)."""
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def ratio(dtype: str, elem_bytes: int, group: int = GROUP) -> float:
    """Stored bytes / original bytes for a floating tensor of `elem_bytes` per element."""
    return (group + 4) / (group * elem_bytes)


@dataclass
class Packed:
    """A quantized tensor plus what it takes to rebuild the original (shape, dtype, strides)."""

    codes: torch.Tensor  # flat int8 or float8_e4m3fn, numel elements
    scales: torch.Tensor  # fp32, one per group
    shape: torch.Size  # shape of the tensor as stored (possibly permuted)
    dtype: torch.dtype
    inv_perm: tuple[int, ...] | None  # permute the rebuilt tensor back to the original strides
    group: int

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * 4


# A pytree node (codes and scales are its leaves), so a transport that moves the tensors inside saved
# objects (activation offload of compressed blocks) moves these too.
torch.utils._pytree.register_pytree_node(
    Packed, lambda p: ([p.codes, p.scales], (p.shape, p.dtype, p.inv_perm, p.group)),
    lambda leaves, ctx: Packed(leaves[0], leaves[1], *ctx), serialized_type_name="memtune.Packed")


# --- Triton kernels ---------------------------------------------------------------------------------


try:  # guarded: importing memtune never needs triton; kernels are only launched on CUDA tensors
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    @triton.jit
    def _pack_kernel(x_ptr, q_ptr, s_ptr, N, n_groups, GROUP: tl.constexpr, ROWS: tl.constexpr,
                     QMAX: tl.constexpr, FP8: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)
        offs = rows[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        mask = offs < N
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        inv = tl.where(amax > 0, QMAX / tl.maximum(amax, 1e-30), 0.0)
        y = x * inv[:, None]
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)  # clamp before the cast: fp rounding can pass qmax
        if FP8:
            q = y.to(tl.float8e4nv)
        else:
            q = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)  # truncation -> round half away from 0
        tl.store(q_ptr + offs, q, mask=mask)
        tl.store(s_ptr + rows, amax / QMAX, mask=rows < n_groups)

    @triton.jit
    def _unpack_kernel(q_ptr, s_ptr, out_ptr, N, GROUP: tl.constexpr, ROWS: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)
        offs = rows[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        mask = offs < N
        q = tl.load(q_ptr + offs, mask=mask).to(tl.float32)  # no `other`: fp8 has no int fill
        s = tl.load(s_ptr + rows, mask=rows * GROUP < N, other=0.0)
        tl.store(out_ptr + offs, (q * s[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def _kernels():
    if triton is None:
        raise ImportError("Triton is needed for the CUDA kernels: pip install triton")
    return _pack_kernel, _unpack_kernel


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    if backend == "auto":
        return x.is_cuda
    return backend == "triton"


# --- flat pack / unpack ---------------------------------------------------------------------------


def quantize(flat: torch.Tensor, dtype: str = "int8", group: int = GROUP, backend: str = "auto"):
    """1-D contiguous floating tensor -> (codes, fp32 scales). backend: auto | triton | torch."""
    if dtype not in QMAX:
        raise ValueError(f"dtype {dtype!r}: use one of {sorted(QMAX)}")
    assert flat.dim() == 1 and flat.is_contiguous()
    n = flat.numel()
    n_groups = -(-n // group)
    code_dtype = torch.int8 if dtype == "int8" else _FP8_DTYPE
    if not _use_triton(flat, backend):
        return quantize_reference(flat, dtype, group)
    codes = torch.empty(n, dtype=code_dtype, device=flat.device)
    scales = torch.empty(n_groups, dtype=torch.float32, device=flat.device)
    if n:
        pack_k, _ = _kernels()
        rows = min(_ROWS, max(1, 1 << (n_groups - 1).bit_length()))
        grid = (-(-n_groups // rows),)
        pack_k[grid](flat, codes, scales, n, n_groups, GROUP=group, ROWS=rows, QMAX=QMAX[dtype],
                     FP8=dtype == "fp8", num_warps=8 if rows * group >= 4096 else 4)
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype, group: int = GROUP,
               backend: str = "auto") -> torch.Tensor:
    n = codes.numel()
    if not _use_triton(codes, backend):
        return dequantize_reference(codes, scales, out_dtype, group)
    out = torch.empty(n, dtype=out_dtype, device=codes.device)
    if n:
        _, unpack_k = _kernels()
        n_groups = scales.numel()
        rows = min(_ROWS, max(1, 1 << (n_groups - 1).bit_length()))
        grid = (-(-n_groups // rows),)
        unpack_k[grid](codes, scales, out, n, GROUP=group, ROWS=rows, num_warps=8 if rows * group >= 4096 else 4)
    return out


def quantize_reference(flat: torch.Tensor, dtype: str = "int8", group: int = GROUP):
    """Pure torch, same arithmetic as the kernel (fp32)."""
    n = flat.numel()
    n_groups = -(-n // group)
    x = torch.zeros(n_groups * group, dtype=torch.float32, device=flat.device)
    x[:n] = flat.float()
    x = x.view(n_groups, group)
    qmax = QMAX[dtype]
    amax = x.abs().amax(dim=1)
    inv = torch.where(amax > 0, qmax / amax, torch.zeros_like(amax))
    y = (x * inv[:, None]).clamp(-qmax, qmax)
    if dtype == "fp8":
        q = y.to(_FP8_DTYPE)
    else:
        q = torch.where(y >= 0, y + 0.5, y - 0.5).trunc().to(torch.int8)
    return q.reshape(-1)[:n].contiguous(), amax / qmax


def dequantize_reference(codes: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype,
                         group: int = GROUP) -> torch.Tensor:
    n = codes.numel()
    n_groups = scales.numel()
    q = torch.zeros(n_groups * group, dtype=torch.float32, device=codes.device)
    q[:n] = codes.float()
    return (q.view(n_groups, group) * scales[:, None]).reshape(-1)[:n].to(out_dtype)


# --- whole tensors (what the saved-tensor hooks call) ---------------------------------------------


def _memory_order(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """x as a contiguous tensor in its memory order (a permuted view when x is dense), and the permutation
    that gives x's layout back; a contiguous copy when x is not dense."""
    if x.is_contiguous():
        return x, None
    perm = sorted(range(x.dim()), key=lambda i: (-x.stride(i), i))
    xp = x.permute(perm)
    if xp.is_contiguous():
        return xp, tuple(sorted(range(x.dim()), key=lambda i: perm[i]))
    return x.contiguous(), None


def pack(x: torch.Tensor, dtype: str = "int8", group: int = GROUP, backend: str = "auto") -> Packed:
    """Quantize a floating tensor of any layout; `unpack` rebuilds one of the same shape and strides when
    the original was dense (a permutation of a contiguous tensor), a contiguous one otherwise."""
    xs, inv_perm = _memory_order(x)
    codes, scales = quantize(xs.reshape(-1), dtype, group, backend)
    return Packed(codes, scales, xs.shape, x.dtype, inv_perm, group)


def unpack(p: Packed, backend: str = "auto") -> torch.Tensor:
    out = dequantize(p.codes, p.scales, p.dtype, p.group, backend).view(p.shape)
    return out.permute(p.inv_perm) if p.inv_perm is not None else out


def error_bound(x: torch.Tensor, dtype: str = "int8", group: int = GROUP) -> torch.Tensor:
    """Per-element bound on |x - unpack(pack(x))| before the final cast to x.dtype (see module doc)."""
    xs, inv_perm = _memory_order(x.detach())
    flat = xs.reshape(-1).float()
    n = flat.numel()
    n_groups = -(-n // group)
    padded = torch.zeros(n_groups * group, device=flat.device)
    padded[:n] = flat.abs()
    amax = padded.view(n_groups, group).amax(1, keepdim=True).expand(n_groups, group).reshape(-1)[:n]
    scale = amax / QMAX[dtype]
    if dtype == "int8":
        b = scale / 2 * (1 + 1e-5)
    else:
        b = torch.maximum(flat.abs() * 2.0**-4, scale * 2.0**-10).mul(1 + 1e-5)
    b = b.view(xs.shape)
    return b.permute(inv_perm) if inv_perm is not None else b
