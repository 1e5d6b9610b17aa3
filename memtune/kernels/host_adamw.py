"""AdamW on the host in one pass over memory: a 16-bit gradient upcast, the update of the fp32 master and its
moments, and the master rounded into its 16-bit copy, in one loop (torch.compile's C++ backend), for the
optimizer-state offload's sliced update (memtune/strategies/offload/optimizer_state.py).

`reference` beside it is what that update otherwise runs: the gradient upcast into a scratch, torch's fused CPU
AdamW, the master rounded, three passes. Same formula (torch.optim.AdamW's, decoupled weight decay); the results
agree to fp32 rounding (the compiled loop may contract multiply-adds). On the H200 machine's 16-core host
(2026-12-02, benchmarks/results/run13/host_update.json) the three passes ran at 2.6-2.9G params/s against
3.8-4.2G for the fused kernel alone on fp32 gradients.

Off unless `MEMTUNE_HOST_COMPILE=1`. On the H200 machine's host (call 15, 2026-12-02) it ran at 3.37G params/s
against 2.71G for the three passes in a microbenchmark, but took 65 s to compile, and the 7B plan's step went from
5.55 s to 14.55 s with it (host update 17.8 s per step, the compile included). That is not explained yet. It
needs a C++ compiler on the host; `kernel()` returns None where it cannot be built or is off (the caller keeps
the reference).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch


def _adamw_16(p, g, m, v, out16, decay, w1, beta2, w2, step_size, bc2_sqrt, eps, s1, s2) -> None:
    """One slice: g (16- or 32-bit) times the pending factors s1, s2 (the clip coefficient, GradScaler's
    inverse scale; 1 when none), in the gradient's reference dtype fp32. w1 = 1 - beta1, w2 = 1 - beta2, from
    doubles: 1 - beta2 taken in fp32 is 1.3e-5 off for beta2 = 0.999."""
    grad = g.float() * s1 * s2
    p.mul_(decay)
    m.lerp_(grad, w1)
    v.mul_(beta2).add_(w2 * grad * grad)
    p.sub_(step_size * m / (v.sqrt() / bc2_sqrt + eps))
    out16.copy_(p)


def scalars(lr: float, beta1: float, beta2: float, weight_decay: float, eps: float, step: float) -> list[torch.Tensor]:
    """The kernel's scalar arguments as 0-dim tensors (values that change every step do not recompile)."""
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    vals = [1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, lr / bc1, bc2 ** 0.5, eps]
    return [torch.tensor(x, dtype=torch.float32) for x in vals]


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


_lock = threading.Lock()
_state: dict[str, Any] = {}


def kernel():
    """The compiled one-pass kernel, built and checked against `reference` on first use; None when this host
    cannot build it (the reason is in `unavailable()`)."""
    with _lock:
        if "fn" in _state:
            return _state["fn"]
        fn = None
        if os.environ.get("MEMTUNE_HOST_COMPILE", "0") == "1":
            try:
                fn = torch.compile(_adamw_16, dynamic=True, fullgraph=True)
                _check(fn)
            except Exception as e:  # no compiler, an inductor failure: the three passes stay
                _state["why"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                fn = None
        else:
            _state["why"] = "off (MEMTUNE_HOST_COMPILE=1 turns it on)"
        _state["fn"] = fn
        return fn


def safe_call(fn, p, g, m, v, out16, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
              step: torch.Tensor, scratch: torch.Tensor, factors: list[torch.Tensor]) -> None:
    """`fn` (the compiled kernel) on one slice; if it raises (a recompile limit, a compiler error on a new
    shape), the kernel is turned off for the run and the reference updates the slice: dynamo fails before the
    graph runs, so nothing was written yet. `step` is already incremented."""
    one = torch.ones((), dtype=torch.float32)
    try:
        fn(p, g, m, v, out16, *scalars(lr, beta1, beta2, weight_decay, eps, float(step)), *(factors + [one, one])[:2])
        return
    except Exception as e:
        with _lock:
            _state["fn"] = None
            _state["why"] = f"turned off after {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    reference(p, g, m, v, out16, lr, beta1, beta2, weight_decay, eps, step, scratch, factors)


def unavailable() -> str | None:
    return _state.get("why")


def _check(fn) -> None:
    """Build it on odd-sized slices (two sizes: the dynamic shape) and compare with the reference."""
    gen = torch.Generator().manual_seed(0)
    for n in (4099, 777):
        p = torch.randn(n, generator=gen)
        g = torch.randn(n, generator=gen).bfloat16()
        m, v = torch.randn(n, generator=gen) * 1e-2, torch.rand(n, generator=gen) * 1e-4
        p2, m2, v2 = p.clone(), m.clone(), v.clone()
        o1, o2 = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
        f = torch.tensor(0.5)
        fn(p, g, m, v, o1, *scalars(1e-3, 0.9, 0.999, 0.01, 1e-8, 3.0), f, torch.tensor(1.0))
        reference(p2, g, m2, v2, o2, 1e-3, 0.9, 0.999, 0.01, 1e-8, torch.tensor(3.0), torch.empty(n), [f])
        if not all(torch.allclose(a, b, rtol=1e-5, atol=2.5e-7 * float(b.abs().max())) for a, b in ((p, p2), (m, m2), (v, v2))):
            raise RuntimeError("the compiled host AdamW does not match torch's fused AdamW")
