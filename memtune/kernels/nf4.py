"""NF4 frozen weights (QLoRA's 4-bit NormalFloat): pack/unpack kernels, torch reference, the stored format.

Format (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", sec. 3): a weight is read in
memory order (row-major [out, in]) and cut into blocks of BLOCK = 64 consecutive elements; each block keeps
its absmax `s` and 64 4-bit codes, element x stored as the index of the NF4 level nearest to x / s (the 16
levels of NF4_LEVELS, QLoRA appendix E / bitsandbytes `get_4bit_type("nf4")`). Two codes per byte: element k
of a block in the low nibble of byte k, element k + 32 in the high nibble, so a program's loads and stores
stay contiguous (bitsandbytes pairs neighbours instead; we read only our own format).

Double quantization (QLoRA sec. 3, "Double Quantization"): the fp32 block absmaxes are centred by their
mean (one fp32 offset per tensor) and quantized to 8 bits in groups of GROUP2 = 256 blocks, with one fp32
scale per group. QLoRA's second level uses bitsandbytes' 8-bit float map; ours is linear int8, rounded up
(ceil), so a dequantized block scale is never below the block's true absmax and every x / s stays in
[-1, 1] (same bytes). Bytes per parameter, exactly (`nbytes`):
    codes n/2 + absmax codes n/64 + group scales 4 n/(64 * 256) + 4 (offset)  ->  0.515869 B/param
    (without double quantization: n/2 + 4 n/64 -> 0.5625 B/param).
Round-trip error: |x - x_hat| <= MAX_HALF_GAP * s_hat per element (s_hat the dequantized block scale,
MAX_HALF_GAP = 0.1519, half the widest gap between neighbouring levels, between -1 and -0.696), plus fp32
rounding and the cast to the output dtype (`error_bound`).

`quantize` / `dequantize` run the Triton kernels on CUDA tensors (or under the interpreter with
backend="triton") and the torch reference elsewhere; the arithmetic is the same fp32 sequence in both
(codes can differ by one level only where x / s lies within an ulp of a midpoint). Both kernels are
memory-bound single passes: unpack reads 0.516 B and writes 2 B (bf16) per parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 64  # elements per absmax
GROUP2 = 256  # absmaxes per second-level scale (double quantization)
HALF = BLOCK // 2
# QLoRA's NF4 levels (bitsandbytes functional.get_4bit_type("nf4")), ascending
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
MAX_HALF_GAP = max(b - a for a, b in zip(NF4_LEVELS[:-1], NF4_LEVELS[1:], strict=True)) / 2  # 0.15190...
ZERO_CODE = NF4_LEVELS.index(0.0)
_PACK_ROWS = GROUP2  # blocks per pack program: one second-level group (16384 elements)
_UNPACK_ROWS = 128  # blocks per unpack program (8192 elements)


def nbytes(numel: int, double_quant: bool = True) -> int:
    """Stored bytes of an NF4 tensor of `numel` elements (codes, block scales, group scales, offset)."""
    nb = -(-numel // BLOCK)
    if double_quant:
        return nb * HALF + nb + 4 * (-(-nb // GROUP2)) + 4
    return nb * HALF + 4 * nb


def bytes_per_param(double_quant: bool = True) -> float:
    """Bytes per parameter for a large tensor: 0.5 + 1/64 + 4/(64*256) = 0.515869 (0.5625 without DQ)."""
    if double_quant:
        return 0.5 + 1 / BLOCK + 4 / (BLOCK * GROUP2)
    return 0.5 + 4 / BLOCK


_TABLES: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels, midpoints) as fp32 tensors on `device` (the kernels read the same values as the reference)."""
    key = (device.type, device.index)
    if key not in _TABLES:
        lv = torch.tensor(NF4_LEVELS, dtype=torch.float64)
        mids = ((lv[1:] + lv[:-1]) / 2).float()
        _TABLES[key] = (lv.float().to(device), mids.to(device))
    return _TABLES[key]


@dataclass
class NF4Weight:
    """One quantized weight: codes and scales plus the original shape and dtype."""

    codes: torch.Tensor  # uint8, nb * 32
    shape: torch.Size
    dtype: torch.dtype  # the original weight's dtype (what state_dict gives back)
    absmax: torch.Tensor | None = None  # fp32 [nb] without double quantization
    qabs: torch.Tensor | None = None  # int8 [nb]: centred absmax codes (double quantization)
    scale2: torch.Tensor | None = None  # fp32 [ceil(nb / 256)]
    offset: torch.Tensor | None = None  # fp32 [1]: mean absmax

    format = "nf4"

    @property
    def double_quant(self) -> bool:
        return self.qabs is not None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.absmax, self.qabs, self.scale2, self.offset) if t is not None]

    def to(self, device: torch.device | str) -> NF4Weight:
        mv = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return NF4Weight(self.codes.to(device), self.shape, self.dtype, mv(self.absmax), mv(self.qabs),
                         mv(self.scale2), mv(self.offset))

    def block_scales(self) -> torch.Tensor:
        """The dequantized fp32 scale of every block (what the kernels multiply by)."""
        if self.qabs is None:
            return self.absmax
        g = torch.arange(self.qabs.numel(), device=self.qabs.device) // GROUP2
        return self.qabs.float() * self.scale2[g] + self.offset

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                   backend: str = "auto") -> torch.Tensor:
        return dequantize(self, dtype or self.dtype, out=out, backend=backend)


# --- Triton kernels ---------------------------------------------------------------------------------

try:  # guarded: importing memtune never needs triton; kernels are only launched on CUDA tensors
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    @triton.jit
    def _absmax_kernel(w_ptr, amax_ptr, n, nb, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)
        offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        x = tl.load(w_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.store(amax_ptr + rows, tl.max(tl.abs(x), axis=1), mask=rows < nb)

    @triton.jit
    def _nf4_index(x, mids_ptr):
        """Index of the nearest NF4 level: how many midpoints lie strictly below x (x in [-1, 1])."""
        idx = tl.zeros(x.shape, dtype=tl.int32)
        for j in tl.static_range(15):
            idx += (x > tl.load(mids_ptr + j)).to(tl.int32)
        return idx

    @triton.jit
    def _pack_kernel(w_ptr, amax_ptr, off_ptr, mids_ptr, codes_ptr, qabs_ptr, s2_ptr, n, nb,
                     ROWS: tl.constexpr, HALF: tl.constexpr, DQ: tl.constexpr):
        # one program = ROWS blocks = one second-level group when DQ (ROWS == GROUP2)
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)
        rmask = rows < nb
        a = tl.load(amax_ptr + rows, mask=rmask, other=0.0)
        if DQ:
            off = tl.load(off_ptr)
            c = tl.where(rmask, a - off, 0.0)
            m2 = tl.max(tl.abs(c), axis=0)
            s2 = m2 / 127.0
            inv2 = tl.where(m2 > 0, 127.0 / tl.maximum(m2, 1e-30), 0.0)
            t = tl.minimum(tl.maximum(c * inv2, -127.0), 127.0)
            ti = t.to(tl.int32)  # toward zero
            q2 = ti + (t > ti.to(tl.float32)).to(tl.int32)  # ceil: the scale never under the absmax
            q2 = tl.minimum(tl.maximum(q2, -127), 127)
            tl.store(qabs_ptr + rows, q2.to(tl.int8), mask=rmask)
            tl.store(s2_ptr + pid, s2)
            s = q2.to(tl.float32) * s2 + off
        else:
            s = a
        inv = tl.where(s > 0, 1.0 / tl.where(s > 0, s, 1.0), 0.0)
        k = tl.arange(0, HALF)[None, :]
        lo_offs = rows[:, None] * (2 * HALF) + k
        hi_offs = lo_offs + HALF
        xl = tl.load(w_ptr + lo_offs, mask=lo_offs < n, other=0.0).to(tl.float32) * inv[:, None]
        xh = tl.load(w_ptr + hi_offs, mask=hi_offs < n, other=0.0).to(tl.float32) * inv[:, None]
        il = _nf4_index(tl.minimum(tl.maximum(xl, -1.0), 1.0), mids_ptr)
        ih = _nf4_index(tl.minimum(tl.maximum(xh, -1.0), 1.0), mids_ptr)
        byte = (il | (ih << 4)).to(tl.uint8)
        tl.store(codes_ptr + rows[:, None] * HALF + k, byte, mask=rmask[:, None])

    @triton.jit
    def _unpack_kernel(codes_ptr, amax_ptr, qabs_ptr, s2_ptr, off_ptr, lut_ptr, out_ptr, n, nb,
                       ROWS: tl.constexpr, HALF: tl.constexpr, GROUP2: tl.constexpr, DQ: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)
        rmask = rows < nb
        if DQ:
            q2 = tl.load(qabs_ptr + rows, mask=rmask, other=0).to(tl.float32)
            s2 = tl.load(s2_ptr + rows // GROUP2, mask=rmask, other=0.0)
            s = q2 * s2 + tl.load(off_ptr)
        else:
            s = tl.load(amax_ptr + rows, mask=rmask, other=0.0)
        k = tl.arange(0, HALF)[None, :]
        b = tl.load(codes_ptr + rows[:, None] * HALF + k, mask=rmask[:, None], other=0).to(tl.int32)
        vl = tl.load(lut_ptr + (b & 15)) * s[:, None]
        vh = tl.load(lut_ptr + ((b >> 4) & 15)) * s[:, None]
        lo_offs = rows[:, None] * (2 * HALF) + k
        hi_offs = lo_offs + HALF
        tl.store(out_ptr + lo_offs, vl.to(out_ptr.dtype.element_ty), mask=lo_offs < n)
        tl.store(out_ptr + hi_offs, vh.to(out_ptr.dtype.element_ty), mask=hi_offs < n)

    # --- fused GEMMs: W's tiles dequantized inside the K loop (no workspace) -------------------------

    @triton.jit
    def _w_tile(codes_ptr, amax_ptr, qabs_ptr, s2_ptr, off_ptr, lut_ptr, rows, cols, N, K,
                HALF: tl.constexpr, GROUP2: tl.constexpr, DQ: tl.constexpr):
        """fp32 tile W[rows, cols] of a flat-blocked NF4 weight [N, K] (0 outside)."""
        m = (rows[:, None] < N) & (cols[None, :] < K)
        idx = rows[:, None].to(tl.int64) * K + cols[None, :]
        blk = idx // (2 * HALF)
        j = idx % (2 * HALF)
        byte = tl.load(codes_ptr + blk * HALF + (j % HALF), mask=m, other=0).to(tl.int32)
        code = tl.where(j >= HALF, byte >> 4, byte) & 15
        if DQ:
            s = tl.load(qabs_ptr + blk, mask=m, other=0).to(tl.float32) * tl.load(s2_ptr + blk // GROUP2, mask=m,
                                                                                   other=0.0) + tl.load(off_ptr)
        else:
            s = tl.load(amax_ptr + blk, mask=m, other=0.0)
        return tl.where(m, tl.load(lut_ptr + code) * s, 0.0)

    @triton.jit
    def _fused_fwd_kernel(x_ptr, codes_ptr, amax_ptr, qabs_ptr, s2_ptr, off_ptr, lut_ptr, y_ptr, M, N, K,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HALF: tl.constexpr,
                          GROUP2: tl.constexpr, DQ: tl.constexpr, FP32_DOT: tl.constexpr):
        # y[M, N] = x[M, K] @ W[N, K]^T
        pm = tl.program_id(0)
        pn = tl.program_id(1)
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            xt = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + rk[None, :],
                         mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            wt = _w_tile(codes_ptr, amax_ptr, qabs_ptr, s2_ptr, off_ptr, lut_ptr, rn, rk, N, K, HALF, GROUP2, DQ)
            if FP32_DOT:  # the interpreter's dot misreads 16-bit floats
                acc += tl.dot(xt.to(tl.float32), tl.trans(wt), input_precision="ieee")
            else:
                acc += tl.dot(xt, tl.trans(wt.to(xt.dtype)))
        tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _fused_bwd_kernel(dy_ptr, codes_ptr, amax_ptr, qabs_ptr, s2_ptr, off_ptr, lut_ptr, dx_ptr, M, N, K,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HALF: tl.constexpr,
                          GROUP2: tl.constexpr, DQ: tl.constexpr, FP32_DOT: tl.constexpr):
        # dx[M, K] = dy[M, N] @ W[N, K]
        pm = tl.program_id(0)
        pk = tl.program_id(1)
        rm = pm * BM + tl.arange(0, BM)
        rk = pk * BK + tl.arange(0, BK)
        acc = tl.zeros((BM, BK), dtype=tl.float32)
        for n0 in range(0, N, BN):
            rn = n0 + tl.arange(0, BN)
            gt = tl.load(dy_ptr + rm[:, None].to(tl.int64) * N + rn[None, :],
                         mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
            wt = _w_tile(codes_ptr, amax_ptr, qabs_ptr, s2_ptr, off_ptr, lut_ptr, rn, rk, N, K, HALF, GROUP2, DQ)
            if FP32_DOT:
                acc += tl.dot(gt.to(tl.float32), wt, input_precision="ieee")
            else:
                acc += tl.dot(gt, wt.to(gt.dtype))
        tl.store(dx_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], acc.to(dx_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rk[None, :] < K))


def _use_triton(t: torch.Tensor, backend: str) -> bool:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend {backend!r}: use auto, triton or torch")
    if backend == "auto":
        return t.is_cuda and triton is not None
    if backend == "triton" and triton is None:
        raise ImportError("Triton is needed for the NF4 kernels: pip install triton")
    return backend == "triton"


# --- quantize / dequantize ------------------------------------------------------------------------


def quantize(w: torch.Tensor, double_quant: bool = True, backend: str = "auto") -> NF4Weight:
    """A floating tensor (any shape) -> NF4Weight. backend: auto (Triton on CUDA) | triton | torch."""
    if not _use_triton(w, backend):
        return quantize_reference(w, double_quant)
    flat = w.detach().contiguous().view(-1)
    n = flat.numel()
    nb = -(-n // BLOCK)
    dev = flat.device
    _, mids = _tables(dev)
    amax = torch.empty(nb, dtype=torch.float32, device=dev)
    codes = torch.empty(nb * HALF, dtype=torch.uint8, device=dev)
    if n == 0:
        return NF4Weight(codes, w.shape, w.dtype, absmax=amax)
    _absmax_kernel[(-(-nb // _UNPACK_ROWS),)](flat, amax, n, nb, ROWS=_UNPACK_ROWS, BLOCK=BLOCK, num_warps=8)
    grid = (-(-nb // _PACK_ROWS),)
    if double_quant:
        offset = amax.mean().reshape(1)
        qabs = torch.empty(nb, dtype=torch.int8, device=dev)
        s2 = torch.empty(grid[0], dtype=torch.float32, device=dev)
        _pack_kernel[grid](flat, amax, offset, mids, codes, qabs, s2, n, nb, ROWS=_PACK_ROWS, HALF=HALF, DQ=True,
                           num_warps=8)
        return NF4Weight(codes, w.shape, w.dtype, qabs=qabs, scale2=s2, offset=offset)
    _pack_kernel[grid](flat, amax, amax, mids, codes, codes, amax, n, nb, ROWS=_PACK_ROWS, HALF=HALF, DQ=False,
                       num_warps=8)
    return NF4Weight(codes, w.shape, w.dtype, absmax=amax)


def dequantize(q: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
               backend: str = "auto") -> torch.Tensor:
    """NF4Weight -> a tensor of q.shape in `dtype` (default the original), written into `out` when given
    (a contiguous buffer of at least q.numel elements, e.g. a reusable workspace)."""
    dtype = dtype or q.dtype
    n = q.numel
    if out is None:
        out = torch.empty(n, dtype=dtype, device=q.device)
    else:
        if out.dtype != dtype or not out.is_contiguous() or out.numel() < n:
            raise ValueError("out must be a contiguous buffer of the output dtype with at least numel elements")
        out = out.view(-1)[:n]
    if not _use_triton(q.codes, backend):
        out.copy_(dequantize_reference(q, torch.float32).view(-1))
        return out.view(q.shape)
    if n:
        nb = -(-n // BLOCK)
        lut, _ = _tables(q.device)
        dq = q.double_quant
        a = q.absmax if not dq else q.scale2  # unused pointers get any valid tensor
        _unpack_kernel[(-(-nb // _UNPACK_ROWS),)](
            q.codes, a, q.qabs if dq else q.codes, q.scale2 if dq else a, q.offset if dq else a, lut, out, n, nb,
            ROWS=_UNPACK_ROWS, HALF=HALF, GROUP2=GROUP2, DQ=dq, num_warps=8)
    return out.view(q.shape)


def quantize_reference(w: torch.Tensor, double_quant: bool = True) -> NF4Weight:
    """Pure torch, the kernels' arithmetic in the same order (fp32)."""
    flat = w.detach().reshape(-1)
    n = flat.numel()
    nb = -(-n // BLOCK)
    _, mids = _tables(flat.device)
    x = torch.zeros(nb * BLOCK, dtype=torch.float32, device=flat.device)
    x[:n] = flat.float()
    x = x.view(nb, BLOCK)
    amax = x.abs().amax(dim=1) if nb else x.new_zeros(0)
    out = NF4Weight(torch.zeros(0, dtype=torch.uint8, device=flat.device), w.shape, w.dtype)
    if double_quant and nb:
        offset = amax.mean().reshape(1)
        ng = -(-nb // GROUP2)
        c = torch.zeros(ng * GROUP2, dtype=torch.float32, device=flat.device)
        c[:nb] = amax - offset
        c = c.view(ng, GROUP2)
        m2 = c.abs().amax(dim=1)
        s2 = m2 / 127.0
        inv2 = torch.where(m2 > 0, 127.0 / m2.clamp_min(1e-30), torch.zeros_like(m2))
        t = (c * inv2[:, None]).clamp(-127.0, 127.0)
        ti = t.trunc()
        q2 = (ti + (t > ti).float()).clamp(-127, 127).reshape(-1)[:nb]
        s = q2 * s2.repeat_interleave(GROUP2)[:nb] + offset
        out.qabs, out.scale2, out.offset = q2.to(torch.int8), s2, offset
    else:
        s = amax
        out.absmax = amax
    inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    xs = (x * inv[:, None]).clamp(-1.0, 1.0)
    idx = (xs[..., None] > mids).sum(-1).to(torch.int32)
    out.codes = (idx[:, :HALF] | (idx[:, HALF:] << 4)).to(torch.uint8).reshape(-1)
    return out


def dequantize_reference(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    n = q.numel
    lut, _ = _tables(q.device)
    b = q.codes.view(-1, HALF).to(torch.int32)
    idx = torch.cat([b & 15, (b >> 4) & 15], dim=1)
    vals = lut[idx] * q.block_scales()[:, None]
    return vals.reshape(-1)[:n].view(q.shape).to(dtype or q.dtype)


def error_bound(w: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    """Per-element bound on |w - dequantize(q)| before the cast to an output dtype: MAX_HALF_GAP times the
    block's dequantized scale, with an fp32 rounding allowance."""
    n = q.numel
    s = q.block_scales().repeat_interleave(BLOCK)[:n].view(q.shape)
    return s * MAX_HALF_GAP * (1 + 1e-5) + w.detach().float().abs() * 1e-6 + 1e-30


# --- fused GEMMs (launchers) ----------------------------------------------------------------------

# Tiles of the fused GEMMs: (BM, BN, BK, num_warps, num_stages). Untuned defaults; benchmarks/weights.py
# measures them against dequantize + cuBLAS.
# 128x128x64 tiles at 3 stages asked for 240 KiB of shared memory on the H200 (limit 227 KiB; bf16 and fp32
# alike, `pytest -m gpu`, 2026-12-01): a quarter of the tile and two stages; not re-run on a GPU yet
FUSED_CONFIG = (64, 128, 64, 4, 2)
FUSED_CONFIG_FP32 = (64, 64, 64, 4, 2)


def _config(dtype: torch.dtype, config: tuple[int, int, int, int, int] | None) -> tuple[int, int, int, int, int]:
    return config or (FUSED_CONFIG_FP32 if dtype == torch.float32 else FUSED_CONFIG)


def _fp32_dot(dtype: torch.dtype) -> bool:
    from memtune.kernels import interpreting

    return dtype == torch.float32 or interpreting()


def _weight_args(q: NF4Weight):
    lut, _ = _tables(q.device)
    dq = q.double_quant
    a = q.absmax if not dq else q.scale2
    return (q.codes, a, q.qabs if dq else q.codes, q.scale2 if dq else a, q.offset if dq else a, lut), dq


def fused_matmul(x2: torch.Tensor, q: NF4Weight, dtype: torch.dtype, backend: str = "triton",
                 config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """y = x2 @ W^T for x2 [M, K] with W [N, K] in NF4, dequantized tile by tile inside the GEMM's K loop."""
    n, k = q.shape[0], q.numel // max(1, q.shape[0])
    x2 = x2.to(dtype).contiguous()
    if not _use_triton(x2, backend):
        return x2 @ dequantize_reference(q, dtype).reshape(n, k).t()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=dtype, device=x2.device)
    if m and n:
        bm, bn, bk, warps, stages = _config(dtype, config)
        args, dq = _weight_args(q)
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        _fused_fwd_kernel[grid](x2, *args, y, m, n, k, BM=bm, BN=bn, BK=bk, HALF=HALF, GROUP2=GROUP2, DQ=dq,
                                FP32_DOT=_fp32_dot(dtype), num_warps=warps, num_stages=stages)
    return y


def fused_matmul_t(dy2: torch.Tensor, q: NF4Weight, dtype: torch.dtype, backend: str = "triton",
                   config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """dx = dy2 @ W for dy2 [M, N] with W [N, K] in NF4 (the input gradient of a frozen linear)."""
    n, k = q.shape[0], q.numel // max(1, q.shape[0])
    dy2 = dy2.to(dtype).contiguous()
    if not _use_triton(dy2, backend):
        return dy2 @ dequantize_reference(q, dtype).reshape(n, k)
    m = dy2.shape[0]
    dx = torch.empty(m, k, dtype=dtype, device=dy2.device)
    if m and k:
        bm, bn, bk, warps, stages = _config(dtype, config)
        args, dq = _weight_args(q)
        grid = (triton.cdiv(m, bm), triton.cdiv(k, bk))
        _fused_bwd_kernel[grid](dy2, *args, dx, m, n, k, BM=bm, BN=bn, BK=bk, HALF=HALF, GROUP2=GROUP2, DQ=dq,
                                FP32_DOT=_fp32_dot(dtype), num_warps=warps, num_stages=stages)
    return dx
