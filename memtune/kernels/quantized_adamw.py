"""AdamW with 8-bit and 4-bit block-wise quantized moments: one fused Triton kernel per step, torch reference.

One launch updates every tensor of a (device, param dtype, grad dtype) group: a per-tensor table holds the
addresses of param, grad and the four state tensors plus numel, and a per-program table says which tensor
and which element range each program owns, so small tensors don't pay a launch each. Each program loads
param + grad + codes + absmax, dequantizes, does the AdamW update in fp32, requantizes with a fresh absmax
per block, and writes param and state back: the minimum traffic (16 B/param for 8-bit, 14 for 4-bit, fp32).

Quantization (block-wise, absmax per block as in Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization"; 4-bit second moment without a zero point as in Li et al. 2023, "Memory Efficient Optimizers
with 4-bit States"). Both maps are non-linear but with a closed-form inverse, so quantizing is a sqrt and a
round instead of bitsandbytes' binary search over its 256-entry dynamic map, which keeps the kernel
memory-bound:
- first moment m, signed, L = 127 (8-bit) or 7 (4-bit) levels per sign ("signed square" map):
      m = absmax * c * |c| / L^2,   c = sign(m) * round(L * sqrt(|m| / absmax))
  finer near zero (relative step 2/|c|), like the dynamic map, where a linear map would flush small m to 0.
- second moment: we store w = sqrt(v) (halves v's dynamic range in log terms and is what the update uses),
  unsigned, S = 256 (8-bit) or 16 (4-bit) levels, with no zero level:
      w = absmax * ((c + 1) / S)^2,  c = round(S * sqrt(w / absmax)) - 1 clamped to [0, S - 1]
  so no element's v dequantizes to 0 (Li et al. sec. 4.1: a zero v turns a small m into a huge update);
  values under the smallest level are rounded up, which only shrinks their update.
Block sizes: 256 (8-bit) and 128 (4-bit), fp32 absmax each -> 2 + 8/256 = 2.03 and 1 + 8/128 = 1.06 bytes
of state per parameter. 4-bit codes pack two per byte: element k of a block in the low nibble, element
k + 64 in the high one, so a program's loads stay contiguous.

bf16 parameters are updated in fp32 and rounded to bf16 either to nearest or stochastically (random low 16
bits added before truncation), which keeps small updates from vanishing in bf16.
"""

from __future__ import annotations

import math

import torch

from memtune.kernels import triton_usable

QBLOCK = {8: 256, 4: 128}  # elements per absmax
M_LEVELS = {8: 127, 4: 7}  # per sign
W_LEVELS = {8: 256, 4: 16}
# Elements per program (a multiple of the quant block) and warps: the fastest of benchmarks/optim.py --sweep on
# an H100 80GB, torch 2.11, triton 3.6, 2026-11-25 (8-bit 1.52 ms, 4-bit 1.37 ms for 268M fp32 params).
CONFIG = {8: {"block": 2048, "num_warps": 4}, 4: {"block": 4096, "num_warps": 8}}


def state_bytes_per_param(bits: int) -> float:
    return 2 * bits / 8 + 2 * 4 / QBLOCK[bits]


def n_blocks(numel: int, bits: int) -> int:
    return -(-numel // QBLOCK[bits])


def code_bytes(numel: int, bits: int) -> int:
    """Bytes of one moment's codes for a tensor of `numel` elements."""
    return numel if bits == 8 else n_blocks(numel, 4) * QBLOCK[4] // 2


def new_state(p: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Zero state for a parameter: m codes, m absmax, codes of sqrt(v), absmax of sqrt(v)."""
    n, nb = p.numel(), n_blocks(p.numel(), bits)
    mdtype = torch.int8 if bits == 8 else torch.uint8
    m_zero = 0 if bits == 8 else 0x88  # 4-bit m codes are stored offset by 8
    return {
        "exp_avg_q": torch.full((code_bytes(n, bits),), m_zero, dtype=mdtype, device=p.device),
        "exp_avg_absmax": torch.zeros(nb, dtype=torch.float32, device=p.device),
        "exp_avg_sq_q": torch.zeros(code_bytes(n, bits), dtype=torch.uint8, device=p.device),
        "exp_avg_sq_absmax": torch.zeros(nb, dtype=torch.float32, device=p.device),
    }


# --- torch reference: quantize / dequantize ------------------------------------------------------------


def _blocked(x: torch.Tensor, qb: int) -> torch.Tensor:
    x = x.reshape(-1).float()
    pad = (-x.numel()) % qb
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    return x.view(-1, qb)


def _pack4(c: torch.Tensor) -> torch.Tensor:
    """[nb, 128] codes 0..15 -> [nb * 64] bytes: element k low nibble, element k + 64 high nibble."""
    h = c.shape[1] // 2
    return (c[:, :h] | (c[:, h:] << 4)).to(torch.uint8).reshape(-1)


def _unpack4(b: torch.Tensor) -> torch.Tensor:
    b = b.view(-1, QBLOCK[4] // 2).to(torch.int32)
    return torch.cat([b & 15, (b >> 4) & 15], dim=1)


def _recip(a: torch.Tensor) -> torch.Tensor:
    return torch.where(a > 0, 1.0 / torch.where(a > 0, a, torch.ones_like(a)), torch.zeros_like(a))


def quantize_m(m: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First moment -> (codes, absmax). Same arithmetic, in the same order, as the kernels."""
    L = M_LEVELS[bits]
    x = _blocked(m, QBLOCK[bits])
    a = x.abs().amax(dim=1)
    mag = torch.floor(torch.sqrt(x.abs() * _recip(a)[:, None]) * L + 0.5).clamp(0, L)
    c = torch.where(x < 0, -mag, mag).to(torch.int32)
    if bits == 8:
        return c.to(torch.int8).reshape(-1)[: m.numel()], a
    return _pack4(c + 8), a


def dequantize_m(codes: torch.Tensor, absmax: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
    L = M_LEVELS[bits]
    if bits == 8:
        c = _blocked(codes.float(), QBLOCK[8])
    else:
        c = (_unpack4(codes) - 8).float()
    return ((c * c.abs()) * (absmax * (1.0 / (L * L)))[:, None]).reshape(-1)[:numel]


def quantize_w(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt of the second moment (>= 0) -> (codes, absmax)."""
    S = W_LEVELS[bits]
    x = _blocked(w, QBLOCK[bits])
    a = x.amax(dim=1)
    c = (torch.floor(torch.sqrt(x * _recip(a)[:, None]) * S + 0.5) - 1).clamp(0, S - 1).to(torch.int32)
    if bits == 8:
        return c.to(torch.uint8).reshape(-1)[: w.numel()], a
    return _pack4(c), a


def dequantize_w(codes: torch.Tensor, absmax: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
    S = W_LEVELS[bits]
    c = _blocked(codes.float(), QBLOCK[8]) if bits == 8 else _unpack4(codes).float()
    q = (c + 1) * (1.0 / S)
    return ((q * q) * absmax[:, None]).reshape(-1)[:numel]


def state_from_moments(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    qm, am = quantize_m(exp_avg, bits)
    qv, av = quantize_w(exp_avg_sq.float().clamp_min(0).sqrt(), bits)
    return {"exp_avg_q": qm, "exp_avg_absmax": am, "exp_avg_sq_q": qv, "exp_avg_sq_absmax": av}


def moments_from_state(state: dict[str, torch.Tensor], numel: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    m = dequantize_m(state["exp_avg_q"], state["exp_avg_absmax"], numel, bits)
    w = dequantize_w(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], numel, bits)
    # exact zeros stay zero (an untouched or freshly loaded state): absmax 0 dequantizes to 0 already
    return m, w * w


# --- torch reference: one step ------------------------------------------------------------------------


def _round_to(p32: torch.Tensor, dtype: torch.dtype, stochastic: bool, generator=None) -> torch.Tensor:
    if dtype == torch.float32:
        return p32
    if stochastic and dtype == torch.bfloat16:
        noise = torch.randint(0, 1 << 16, p32.shape, dtype=torch.int32, device=p32.device, generator=generator)
        bits = (p32.view(torch.int32) + noise) & -65536
        return bits.view(torch.float32).to(dtype)
    return p32.to(dtype)


def reference_step(p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], *, bits: int, lr: float,
                   beta1: float, beta2: float, eps: float, weight_decay: float, step: int, decoupled: bool = True,
                   maximize: bool = False, stochastic_rounding: bool = False, generator=None) -> None:
    """Pure-torch twin of the kernel: updates `p` and `state` in place (used on CPU and by the tests)."""
    n = p.numel()
    m, w = (x.view(-1, QBLOCK[bits]) for x in _moments_blocked(state, n, bits))
    gf = _blocked(g, QBLOCK[bits])
    pf = _blocked(p, QBLOCK[bits])
    if maximize:
        gf = -gf
    bc1, inv_sqrt_bc2 = 1 - beta1**step, 1 / math.sqrt(1 - beta2**step)
    if not decoupled and weight_decay:
        gf = gf + weight_decay * pf
    m = beta1 * m + (1 - beta1) * gf
    v = beta2 * (w * w) + (1 - beta2) * (gf * gf)
    w = torch.sqrt(v)
    denom = w * inv_sqrt_bc2 + eps
    if decoupled:
        pf = pf * (1 - lr * weight_decay)
    pf = pf - (lr / bc1) * (m / denom)
    valid = (torch.arange(m.numel(), device=m.device) < n).view_as(m)
    m, w = torch.where(valid, m, 0.0), torch.where(valid, w, 0.0)
    qm, am = quantize_m(m, bits)
    qv, av = quantize_w(w, bits)
    state["exp_avg_q"].copy_(qm[: state["exp_avg_q"].numel()])
    state["exp_avg_absmax"].copy_(am)
    state["exp_avg_sq_q"].copy_(qv[: state["exp_avg_sq_q"].numel()])
    state["exp_avg_sq_absmax"].copy_(av)
    new = _round_to(pf.reshape(-1)[:n], p.dtype, stochastic_rounding, generator)
    p.copy_(new.view_as(p))


def _moments_blocked(state, n, bits):
    qb = QBLOCK[bits]
    m = dequantize_m(state["exp_avg_q"], state["exp_avg_absmax"], n, bits)
    w = dequantize_w(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], n, bits)
    return _blocked(m, qb).reshape(-1), _blocked(w, qb).reshape(-1)


# --- Triton kernels -------------------------------------------------------------------------------------


try:  # kernels are defined only where triton imports; the references work without it
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover
    _HAS_TRITON = False

if _HAS_TRITON:

    @triton.jit
    def _load_row(meta_ptr, prog_ptr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, MQ_DTYPE: tl.constexpr,
                  ALIGNED: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(prog_ptr + 2 * pid)
        start = tl.load(prog_ptr + 2 * pid + 1)
        row = meta_ptr + t * 8
        p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE))
        qm_ptr = tl.load(row + 2).to(tl.pointer_type(MQ_DTYPE))
        qv_ptr = tl.load(row + 3).to(tl.pointer_type(tl.uint8))
        am_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
        av_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
        n = tl.load(row + 6)
        if ALIGNED:
            # values read from memory carry no alignment facts: without these hints (addresses 16-byte aligned,
            # numel a multiple of 16, so the mask is constant over 16 elements) every load is scalar
            n = tl.multiple_of(n, 16)
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            qm_ptr = tl.multiple_of(qm_ptr, 16)
            qv_ptr = tl.multiple_of(qv_ptr, 16)
        return t, start, n, p_ptr, g_ptr, qm_ptr, qv_ptr, am_ptr, av_ptr

    @triton.jit
    def _adam_math(p, g, m, w, mask, lr, beta1, one_m_beta1, beta2, one_m_beta2, eps, weight_decay, step_size,
                   inv_sqrt_bc2, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr):
        if MAXIMIZE:
            g = -g
        if not DECOUPLED:
            g = g + weight_decay * p
        m = beta1 * m + one_m_beta1 * g
        v = beta2 * (w * w) + one_m_beta2 * (g * g)
        w = tl.sqrt(v)
        denom = w * inv_sqrt_bc2 + eps
        if DECOUPLED:
            p = p * (1.0 - lr * weight_decay)
        p = p - step_size * (m / denom)
        m = tl.where(mask, m, 0.0)
        w = tl.where(mask, w, 0.0)
        return p, m, w

    @triton.jit
    def _store_param(p_ptr, offs, mask, p, t, seed, P_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr):
        if STOCHASTIC:
            # add 16 random low bits, then truncate to bf16: E[result] = p (seeded per step and tensor)
            r = tl.randint(seed + t, offs.to(tl.uint32))
            bits = p.to(tl.int32, bitcast=True) + (r & 0xFFFF).to(tl.int32)
            p = (bits & -65536).to(tl.float32, bitcast=True)
        elif P_DTYPE == tl.bfloat16:  # noqa: SIM300
            # round to nearest even by hand: the interpreter's fp32->bf16 cast truncates, the GPU's rounds
            bits = p.to(tl.int32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            p = (bits & -65536).to(tl.float32, bitcast=True)
        tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)

    @triton.jit
    def _recip_tl(a):
        return tl.where(a > 0, 1.0 / tl.where(a > 0, a, 1.0), 0.0)

    @triton.jit
    def adamw8bit_kernel(meta_ptr, prog_ptr, lr, beta1, one_m_beta1, beta2, one_m_beta2, eps, weight_decay,
                         step_size, inv_sqrt_bc2, seed,
                         P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, NB: tl.constexpr, QB: tl.constexpr,
                         DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, STOCHASTIC: tl.constexpr,
                         ALIGNED: tl.constexpr):
        t, start, n, p_ptr, g_ptr, qm_ptr, qv_ptr, am_ptr, av_ptr = _load_row(meta_ptr, prog_ptr, P_DTYPE, G_DTYPE,
                                                                             tl.int8, ALIGNED)
        blk = start // QB + tl.arange(0, NB)
        offs = blk[:, None] * QB + tl.arange(0, QB)[None, :]
        mask = offs < n
        bmask = blk * QB < n
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        cm = tl.load(qm_ptr + offs, mask=mask, other=0).to(tl.float32)
        cv = tl.load(qv_ptr + offs, mask=mask, other=0).to(tl.float32)
        am = tl.load(am_ptr + blk, mask=bmask, other=0.0)
        av = tl.load(av_ptr + blk, mask=bmask, other=0.0)
        m = (cm * tl.abs(cm)) * (am * (1.0 / (127.0 * 127.0)))[:, None]
        q = (cv + 1.0) * (1.0 / 256.0)
        w = (q * q) * av[:, None]
        p, m, w = _adam_math(p, g, m, w, mask, lr, beta1, one_m_beta1, beta2, one_m_beta2, eps, weight_decay,
                             step_size, inv_sqrt_bc2, DECOUPLED, MAXIMIZE)
        am = tl.max(tl.abs(m), axis=1)
        av = tl.max(w, axis=1)
        mag = tl.sqrt(tl.abs(m) * _recip_tl(am)[:, None]) * 127.0 + 0.5
        mag = tl.minimum(tl.maximum(mag, 0.0), 127.0).to(tl.int32)  # floor of a non-negative value
        cm = tl.where(m < 0, -mag, mag)
        cvf = tl.sqrt(w * _recip_tl(av)[:, None]) * 256.0 + 0.5
        cv = tl.minimum(tl.maximum(cvf, 1.0), 256.0).to(tl.int32) - 1
        tl.store(qm_ptr + offs, cm.to(tl.int8), mask=mask)
        tl.store(qv_ptr + offs, cv.to(tl.uint8), mask=mask)
        tl.store(am_ptr + blk, am, mask=bmask)
        tl.store(av_ptr + blk, av, mask=bmask)
        _store_param(p_ptr, offs, mask, p, t, seed, P_DTYPE, STOCHASTIC)

    @triton.jit
    def _half4(p_ptr, g_ptr, offs, mask, cm, cv, am, av, lr, beta1, one_m_beta1, beta2, one_m_beta2, eps,
               weight_decay, step_size, inv_sqrt_bc2, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr):
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        cmf = (cm - 8).to(tl.float32)
        m = (cmf * tl.abs(cmf)) * (am * (1.0 / 49.0))[:, None]
        q = (cv.to(tl.float32) + 1.0) * (1.0 / 16.0)
        w = (q * q) * av[:, None]
        return _adam_math(p, g, m, w, mask, lr, beta1, one_m_beta1, beta2, one_m_beta2, eps, weight_decay,
                          step_size, inv_sqrt_bc2, DECOUPLED, MAXIMIZE)

    @triton.jit
    def _codes4(m, w, am, av):
        mag = tl.sqrt(tl.abs(m) * _recip_tl(am)[:, None]) * 7.0 + 0.5
        mag = tl.minimum(tl.maximum(mag, 0.0), 7.0).to(tl.int32)
        cm = tl.where(m < 0, -mag, mag) + 8
        cvf = tl.sqrt(w * _recip_tl(av)[:, None]) * 16.0 + 0.5
        cv = tl.minimum(tl.maximum(cvf, 1.0), 16.0).to(tl.int32) - 1
        return cm, cv

    @triton.jit
    def adamw4bit_kernel(meta_ptr, prog_ptr, lr, beta1, one_m_beta1, beta2, one_m_beta2, eps, weight_decay,
                         step_size, inv_sqrt_bc2, seed,
                         P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, NB: tl.constexpr, QB: tl.constexpr,
                         DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, STOCHASTIC: tl.constexpr,
                         ALIGNED: tl.constexpr):
        t, start, n, p_ptr, g_ptr, qm_ptr, qv_ptr, am_ptr, av_ptr = _load_row(meta_ptr, prog_ptr, P_DTYPE, G_DTYPE,
                                                                             tl.uint8, ALIGNED)
        H: tl.constexpr = QB // 2
        blk = start // QB + tl.arange(0, NB)
        k = tl.arange(0, H)[None, :]
        lo = blk[:, None] * QB + k
        hi = lo + H
        boffs = blk[:, None] * H + k
        mlo = lo < n
        mhi = hi < n
        bmask = blk * QB < n
        bm = tl.load(qm_ptr + boffs, mask=mlo, other=0x88).to(tl.int32)
        bv = tl.load(qv_ptr + boffs, mask=mlo, other=0).to(tl.int32)
        am = tl.load(am_ptr + blk, mask=bmask, other=0.0)
        av = tl.load(av_ptr + blk, mask=bmask, other=0.0)
        p_lo, m_lo, w_lo = _half4(p_ptr, g_ptr, lo, mlo, bm & 15, bv & 15, am, av, lr, beta1, one_m_beta1, beta2,
                                  one_m_beta2, eps, weight_decay, step_size, inv_sqrt_bc2, DECOUPLED, MAXIMIZE)
        p_hi, m_hi, w_hi = _half4(p_ptr, g_ptr, hi, mhi, (bm >> 4) & 15, (bv >> 4) & 15, am, av, lr, beta1,
                                  one_m_beta1, beta2, one_m_beta2, eps, weight_decay, step_size, inv_sqrt_bc2,
                                  DECOUPLED, MAXIMIZE)
        am = tl.maximum(tl.max(tl.abs(m_lo), axis=1), tl.max(tl.abs(m_hi), axis=1))
        av = tl.maximum(tl.max(w_lo, axis=1), tl.max(w_hi, axis=1))
        cm_lo, cv_lo = _codes4(m_lo, w_lo, am, av)
        cm_hi, cv_hi = _codes4(m_hi, w_hi, am, av)
        tl.store(qm_ptr + boffs, (cm_lo | (cm_hi << 4)).to(tl.uint8), mask=mlo)
        tl.store(qv_ptr + boffs, (cv_lo | (cv_hi << 4)).to(tl.uint8), mask=mlo)
        tl.store(am_ptr + blk, am, mask=bmask)
        tl.store(av_ptr + blk, av, mask=bmask)
        _store_param(p_ptr, lo, mlo, p_lo, t, seed, P_DTYPE, STOCHASTIC)
        _store_param(p_ptr, hi, mhi, p_hi, t, seed, P_DTYPE, STOCHASTIC)

    _KERNELS = {8: adamw8bit_kernel, 4: adamw4bit_kernel}


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


class _Tables:
    """Per-launch tables, cached: program -> (tensor, start) depends on sizes only; the address table changes
    when a gradient is reallocated (set_to_none), so it is keyed by the addresses."""

    def __init__(self) -> None:
        self.prog: dict[tuple, torch.Tensor] = {}
        self.meta: dict[tuple, torch.Tensor] = {}

    def programs(self, numels: tuple[int, ...], block: int, device: torch.device) -> torch.Tensor:
        key = (numels, block, str(device))
        if key not in self.prog:
            rows = [torch.stack([torch.full((len(s),), t, dtype=torch.int64), s], 1)
                    for t, n in enumerate(numels) for s in [torch.arange(0, n, block, dtype=torch.int64)]]
            if len(self.prog) > 8:
                self.prog.clear()
            self.prog[key] = _to_device(torch.cat(rows).reshape(-1), device)
        return self.prog[key]

    def addresses(self, rows: list[tuple[int, ...]], device: torch.device) -> torch.Tensor:
        key = (tuple(rows), str(device))
        if key not in self.meta:
            if len(self.meta) > 8:
                self.meta.clear()
            self.meta[key] = _to_device(torch.tensor(rows, dtype=torch.int64).reshape(-1), device)
        return self.meta[key]


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)  # pinned block is kept until the copy is done
    return x.to(device)


_TABLES: dict[int, _Tables] = {}


def fused_step(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, torch.Tensor]], *,
               bits: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
               decoupled: bool = True, maximize: bool = False, stochastic_rounding: bool = False, seed: int = 0,
               use_triton: bool | None = None, config: dict | None = None, cache_key: int = 0) -> None:
    """One AdamW step over tensors that share hyperparameters and step count, one launch per
    (device, param dtype, grad dtype). Falls back to `reference_step` where Triton can't run."""
    if bits not in QBLOCK:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    groups: dict[tuple, list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        groups.setdefault((p.device, p.dtype, g.dtype), []).append(i)
    bc1 = 1 - beta1**step
    kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
              decoupled=decoupled, maximize=maximize)
    # one launch per (device, dtypes, alignment): tensors whose addresses are 16-byte aligned and numel a
    # multiple of 16 (nearly all weights) get the vectorized variant, the rest (odd biases) a masked one
    split: dict[tuple, list[int]] = {}
    rows: list[tuple[int, ...]] = [()] * len(params)
    for key, idx in groups.items():
        for i in idx:
            p, g, s = params[i], grads[i], states[i]
            r = (p.data_ptr(), g.data_ptr(), s["exp_avg_q"].data_ptr(), s["exp_avg_sq_q"].data_ptr(),
                 s["exp_avg_absmax"].data_ptr(), s["exp_avg_sq_absmax"].data_ptr(), p.numel(), 0)
            rows[i] = r
            ok = r[6] % 16 == 0 and (r[0] | r[1] | r[2] | r[3]) % 16 == 0
            split.setdefault((*key, ok), []).append(i)
    for (device, pdt, gdt, aligned), idx in split.items():
        triton_ok = triton_usable(device) if use_triton is None else use_triton
        if not triton_ok or pdt not in (torch.float32, torch.bfloat16, torch.float16):
            gen = None
            if stochastic_rounding:
                gen = torch.Generator(device=device)
                gen.manual_seed(seed)
            for i in idx:
                reference_step(params[i], grads[i], states[i], bits=bits, stochastic_rounding=stochastic_rounding,
                               generator=gen, **kw)
            continue
        cfg = {**CONFIG[bits], **(config or {})}
        qb = QBLOCK[bits]
        block = cfg["block"]
        tables = _TABLES.setdefault(cache_key, _Tables())
        for i in idx:
            if not (params[i].is_contiguous() and grads[i].is_contiguous()):
                raise ValueError("fused quantized AdamW needs contiguous params and grads")
        grows = [rows[i] for i in idx]
        prog = tables.programs(tuple(r[6] for r in grows), block, device)
        meta = tables.addresses(grows, device)
        kernel = _KERNELS[bits]
        with torch.cuda.device(device) if device.type == "cuda" else _nullctx():
            kernel[(prog.numel() // 2,)](
                meta, prog, lr, beta1, 1 - beta1, beta2, 1 - beta2, eps, weight_decay, lr / bc1,
                1 / math.sqrt(1 - beta2**step), seed & 0x7FFFFFFF,
                P_DTYPE=_tl_dtype(pdt), G_DTYPE=_tl_dtype(gdt), NB=block // qb, QB=qb, DECOUPLED=decoupled,
                MAXIMIZE=maximize, STOCHASTIC=bool(stochastic_rounding and pdt == torch.bfloat16),
                ALIGNED=bool(cfg.get("aligned", True) and aligned),
                num_warps=cfg["num_warps"])


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
