"""AdamW on the host in one pass over memory, for the optimizer-state offload's update of fp32 masters from
16-bit gradients (memtune/strategies/offload/optimizer_state.py): the gradient upcast (and scaled by the clip
coefficient), the update of the master and its moments, and the master rounded into its 16-bit copy, in one
OpenMP loop of C, built on first use with the host's C compiler and called through ctypes (which lets go of
the GIL, so the update thread runs beside the training thread).

`reference` beside it is what the update otherwise runs: the gradient upcast into a scratch, torch's fused CPU
AdamW, the master rounded; three passes, 12 B/param more of memory traffic. Same formula (torch.optim.AdamW's,
decoupled weight decay); the two agree to fp32 rounding, checked when the kernel is built.

Why C and not torch.compile: the compiled version of this loop (call 15, H200 host, 2026-12-02) ran at 3.37G
params/s in a microbenchmark but 0.38G in the 7B run, on the update's worker thread (its OpenMP team there was
one thread), after a 65 s compile. This builds in about a second, takes its thread count as an argument, and
has no guards to recompile on.

On by default where a C compiler builds it (`CC`, else cc/gcc/clang on PATH); `MEMTUNE_HOST_KERNEL=0` turns it
off. `kernel()` returns None where it is off or cannot be built, and `unavailable()` says why (the caller keeps
the reference).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#ifndef MEMTUNE_SCHEDULE
#define MEMTUNE_SCHEDULE dynamic, 4
#endif

static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, NaN kept quiet: c10::BFloat16's */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#define BODY(GRAD)                                                             \
    for (int64_t i = 0; i < n; i++) {                                          \
        float g = (GRAD) * scale;                                              \
        float q = p[i] * decay;                                                \
        float mi = m[i] + w1 * (g - m[i]);                                     \
        float vi = v[i] * beta2 + w2 * g * g;                                  \
        q = q - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);                 \
        m[i] = mi; v[i] = vi; p[i] = q; out[i] = f32_to_bf16(q);               \
    }

/* one contiguous range; grad_bf16: g holds bf16 values, else fp32 */
static void range(float *restrict p, const void *restrict gv, int grad_bf16, float *restrict m,
                  float *restrict v, uint16_t *restrict out, int64_t n, float decay, float w1, float beta2,
                  float w2, float step_size, float bc2_sqrt, float eps, float scale) {
    if (grad_bf16) { const uint16_t *restrict gg = (const uint16_t *)gv; BODY(bf16_to_f32(gg[i])) }
    else { const float *restrict gg = (const float *)gv; BODY(gg[i]) }
}

void memtune_adamw16(float *p, const void *g, int grad_bf16, float *m, float *v, uint16_t *out, int64_t n,
                     float decay, float w1, float beta2, float w2, float step_size, float bc2_sqrt, float eps,
                     float scale, int threads) {
    const int64_t blk = 1 << 14;  /* 16K elements a task: whole cache lines, and slices for every thread */
    int64_t nb = (n + blk - 1) / blk;
    int64_t esz = grad_bf16 ? 2 : 4;
    /* dynamic: a thread the OS takes away (the training thread spinning on a CUDA sync, torch's own OpenMP
       pool) holds up only its current task, not a static 1/threads share of the loop */
    #pragma omp parallel for schedule(MEMTUNE_SCHEDULE) num_threads(threads)
    for (int64_t b = 0; b < nb; b++) {
        int64_t a = b * blk, k = (n - a < blk) ? n - a : blk;
        range(p + a, (const char *)g + a * esz, grad_bf16, m + a, v + a, out + a, k, decay, w1, beta2, w2,
              step_size, bc2_sqrt, eps, scale);
    }
}
"""
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno", "-std=c99"]

_lock = threading.Lock()
_state: dict[str, Any] = {}


def scalars(lr: float, beta1: float, beta2: float, weight_decay: float, eps: float, step: float) -> list[float]:
    """The kernel's scalars, from doubles as torch's fused AdamW takes them (1 - beta2 in fp32 would be 1.3e-5
    off for beta2 = 0.999): decay, 1 - beta1, beta2, 1 - beta2, lr / bias_correction1, sqrt(bias_correction2),
    eps."""
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    return [1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, lr / bc1, bc2 ** 0.5, eps]


def reference(p, g, m, v, out16, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
              step: torch.Tensor, scratch: torch.Tensor, factors: list[torch.Tensor]) -> None:
    """The three-pass update: upcast (and scale) into `scratch`, torch's fused AdamW, round into out16.
    `step` is the state's step tensor, already incremented."""
    grad = scratch[: g.numel()].view(g.shape)
    grad.copy_(g)
    for f in factors:
        grad.mul_(f)
    torch._fused_adamw_([p], [grad], [m], [v], [], [step], amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, eps=eps, maximize=False, grad_scale=None, found_inf=None)
    out16.copy_(p)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "memtune"


def _cpu_key() -> str:
    """-march=native code is this CPU's: the cache key names it (a home directory shared by other hosts)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(schedule: str | None = None) -> ctypes.CDLL:
    """`schedule`: an OpenMP schedule clause's argument in place of the source's (the benchmark compares)."""
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None or not shutil.which(cc.split()[0]):
        raise RuntimeError("no C compiler on PATH (set CC)")
    flags = [*_FLAGS, f"-DMEMTUNE_SCHEDULE={schedule}"] if schedule else _FLAGS
    key = hashlib.sha256("\0".join([_SOURCE, cc, *flags, _cpu_key()]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"host_adamw_{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            src = Path(tmp) / "host_adamw.c"
            src.write_text(_SOURCE)
            so = Path(tmp) / out.name
            r = subprocess.run([*cc.split(), *flags, str(src), "-o", str(so), "-lm"], capture_output=True,
                               text=True, timeout=120)
            if r.returncode != 0:
                raise RuntimeError(f"{cc} failed: {(r.stderr or r.stdout).strip().splitlines()[-1][:200]}")
            os.replace(so, out)  # atomic: a process building beside this one loads a whole file
    lib = ctypes.CDLL(str(out))
    f = lib.memtune_adamw16
    f.restype = None
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                  ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_float] * 8 + [ctypes.c_int]
    return lib


class Kernel:
    """The built kernel: `kernel(p, g, m, v, out16, lr, beta1, beta2, weight_decay, eps, step, scale)` updates
    p, m, v in place and writes out16; p, m, v fp32, g fp32 or bf16, out16 bf16, all contiguous CPU tensors of
    one size; `step` the (already incremented) step count, `scale` the gradient's pending factor."""

    def __init__(self, lib: ctypes.CDLL, threads: int) -> None:
        self._f = lib.memtune_adamw16
        self.threads = max(1, threads)

    @staticmethod
    def supports(p: torch.Tensor, g: torch.Tensor, out16: torch.Tensor) -> bool:
        return (p.dtype == torch.float32 and g.dtype in (torch.float32, torch.bfloat16)
                and out16.dtype == torch.bfloat16 and g.device.type == "cpu")

    def __call__(self, p, g, m, v, out16, lr: float, beta1: float, beta2: float, weight_decay: float,
                 eps: float, step: float, scale: float = 1.0) -> None:
        n = p.numel()
        for t in (g, m, v, out16):
            if t.numel() != n or not t.is_contiguous():
                raise ValueError("host_adamw: tensors of one size, contiguous")
        if not (p.is_contiguous() and self.supports(p, g, out16) and m.dtype == v.dtype == torch.float32):
            raise ValueError("host_adamw: fp32 p, m, v; fp32 or bf16 g; bf16 out, on the CPU")
        self._f(p.data_ptr(), g.data_ptr(), int(g.dtype == torch.bfloat16), m.data_ptr(), v.data_ptr(),
                out16.data_ptr(), n, *scalars(lr, beta1, beta2, weight_decay, eps, step), float(scale), self.threads)


def kernel() -> Kernel | None:
    """The one-pass kernel, built and checked against `reference` on first use (call it on the training thread:
    it takes that thread's `torch.get_num_threads()`); None when it is off or this host cannot build it (the
    reason is in `unavailable()`)."""
    with _lock:
        if "fn" in _state:
            return _state["fn"]
        fn = None
        if os.environ.get("MEMTUNE_HOST_KERNEL", "1") == "0":
            _state["why"] = "off (MEMTUNE_HOST_KERNEL=0)"
        else:
            try:
                fn = Kernel(_build(), torch.get_num_threads())
                _check(fn)
            except Exception as e:  # no compiler, a build failure, a mismatch: the three passes stay
                msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                _state["why"] = f"{type(e).__name__}: {msg}"
                fn = None
        _state["fn"] = fn
        return fn


def unavailable() -> str | None:
    return _state.get("why")


def _check(fn: Kernel) -> None:
    """Odd sizes, both gradient dtypes, a scale: against the reference, to fp32 rounding."""
    gen = torch.Generator().manual_seed(0)
    for n, gdt in ((40_099, torch.bfloat16), (777, torch.float32)):
        p = torch.randn(n, generator=gen)
        g = torch.randn(n, generator=gen).to(gdt)
        m, v = torch.randn(n, generator=gen) * 1e-2, torch.rand(n, generator=gen) * 1e-4
        p2, m2, v2 = p.clone(), m.clone(), v.clone()
        o1, o2 = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
        fn(p, g, m, v, o1, 1e-3, 0.9, 0.999, 0.01, 1e-8, 3.0, 0.5)
        reference(p2, g, m2, v2, o2, 1e-3, 0.9, 0.999, 0.01, 1e-8, torch.tensor(3.0), torch.empty(n),
                  [torch.tensor(0.5)])
        if not all(torch.allclose(a, b, rtol=1e-5, atol=2.5e-7 * float(b.abs().max())) for a, b in ((p, p2), (m, m2), (v, v2))):
            raise RuntimeError("the one-pass host AdamW does not match torch's fused AdamW")
        if (o1.float() - o2.float()).abs().max() > 2 ** -7 * float(o2.float().abs().max()):
            raise RuntimeError("the one-pass host AdamW's bf16 rounding does not match torch's")
