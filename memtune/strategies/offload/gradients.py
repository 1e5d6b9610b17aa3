"""Gradients that never all live on the device (`offload: {gradients: true, optimizer_state: true}`).

As backward produces each parameter's gradient (its post-accumulate-grad hook), the gradient is copied to a
pinned host buffer on the D2H side stream and dropped on the device at once (`p.grad = None`; the copy's
`record_stream` keeps the allocator from reusing its memory before the copy ran). The device holds the
gradients of the block being differentiated, not the model's. The optimizer's host update
(`optimizer_state.py`) reads these host gradients.

- Gradient accumulation: on the host. The first backward after a step copies straight into the landing
  buffer; a later one copies into a staging buffer and a host thread adds it into an accumulator kept in the
  gradient's reference dtype (below). Keeping the device gradient until the last micro-batch was the
  alternative; it was not taken because it keeps every gradient on the device during all micro-batches but
  the last (what this mechanism exists to avoid), and which micro-batch is the last is only known when
  `step()` is called.
- Reference dtype: the dtype the script's own gradient has. With `precision: {params: bf16, cast: autocast}`
  a weight computes in bf16 but the script's gradient of it is fp32 (autocast's cast backward upcasts the
  bf16 matmul gradient exactly): the bf16 copy goes down (half the bytes, the same values), and accumulation,
  unscaling and clipping run in fp32 on the host, as they would on the script's fp32 gradients.
- Clipping: `clip_grad_norm_` (patched while an optimizer is offloaded) sees no device gradients, so it
  computes the norm from per-parameter norms: computed on the device in the hook when the host gradient is
  one micro-batch's (a small kernel per parameter, only once the script has been seen clipping), else on
  the host copy; the total and the coefficient are torch's formulas; the coefficient is applied to the host
  copies inside the update (in the reference dtype). Exact up to fp32 rounding of the norm's reductions.
- GradScaler: unscaling and the inf/nan check run on the host copies (`unscale`); the inverse scale is
  applied inside the update like the clip coefficient.
- zero_grad (the optimizer's or the model's) empties the host gradients, as it would the device ones; so
  does a step that consumed them.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable, Iterable

import torch

# bytes of staging buffers (second and later micro-batches) in flight to the host accumulation thread; a hook
# that would exceed it waits for the thread (backpressure) instead of pinning more host memory
STAGING_BYTES = 2 << 30


class HostWorker:
    """One background thread running host-side tasks in submission order, with a bound on the bytes the
    queued tasks hold. Tasks run torch CPU ops and CUDA event waits, which release the GIL."""

    def __init__(self, limit_bytes: int = STAGING_BYTES):
        self.limit = limit_bytes
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._cv = threading.Condition()
        self._inflight = 0
        self._pending = 0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], None], nbytes: int = 0) -> threading.Event:
        done = threading.Event()
        with self._cv:
            while self._inflight and self._inflight + nbytes > self.limit:
                self._cv.wait()
            self._inflight += nbytes
            self._pending += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="memtune-host-grads", daemon=True)
            self._thread.start()
        self._q.put((fn, nbytes, done))
        return done

    def _run(self) -> None:
        # this thread's own OpenMP team size, as the training thread's: torch's ops set it lazily (the
        # one-pass kernel, kernels/host_adamw.py, takes its count as an argument)
        torch.set_num_threads(torch.get_num_threads())
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, nbytes, done = item
            try:
                with torch.no_grad():
                    fn()
            except BaseException as e:  # reported by the next drain, on the training thread
                self._error = self._error or e
            finally:
                done.set()
                with self._cv:
                    self._inflight -= nbytes
                    self._pending -= 1
                    self._cv.notify_all()

    def drain(self) -> None:
        with self._cv:
            while self._pending:
                self._cv.wait()
        self.raise_error()

    def raise_error(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise RuntimeError(f"memtune's host gradient thread failed: {type(e).__name__}: {e}") from e

    def close(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=30)
            self._thread = None


class _G:
    """Host side of one parameter's gradient."""

    __slots__ = ("acc", "acc_valid", "buf", "busy", "count", "dev_norm", "done", "ev", "ref", "scales")

    def __init__(self, ref: torch.dtype):
        self.ref = ref  # dtype of the script's own gradient
        self.buf: torch.Tensor | None = None  # landing buffer (pinned, the device gradient's dtype)
        self.ev = None  # its copy's event
        self.acc: torch.Tensor | None = None  # accumulator (reference dtype), kept across steps
        self.acc_valid = False
        self.count = 0  # backwards accumulated since the last reset
        self.done: threading.Event | None = None  # the last accumulation task of this parameter
        self.dev_norm: torch.Tensor | None = None  # device norm of a one-micro-batch gradient
        self.scales: list[torch.Tensor] = []  # factors still to apply (unscale, clip), in order
        self.busy: threading.Event | None = None  # (delayed schedule) set once the update has read it


class HostGradients:
    """The host gradients of one offloaded optimizer's parameters (see the module docstring)."""

    def __init__(self, params: Iterable[torch.Tensor], transport, ref_dtypes: dict[int, torch.dtype] | None = None):
        self.t = transport
        ref_dtypes = ref_dtypes or {}
        self.g: dict[int, _G] = {id(p): _G(ref_dtypes.get(id(p), p.dtype)) for p in params}
        self.worker = HostWorker()
        self.norm_type: float | None = None  # set once the script clipped: the hook computes device norms
        self.stats = {"copied_bytes": 0, "accumulated": 0, "norm_s": 0.0, "unscale_s": 0.0, "device_norms": 0}
        self.norm_times: list[float] = []  # per clip: mostly the wait for the backward's device norms

    def manages(self, p: torch.Tensor) -> bool:
        return id(p) in self.g

    def has(self, p: torch.Tensor) -> bool:
        s = self.g.get(id(p))
        return s is not None and s.count > 0

    # backward -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def on_grad(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: the gradient goes down, the device one is dropped."""
        g = p.grad
        if g is None:
            return
        s = self.g[id(p)]
        busy = s.busy
        if busy is not None:  # (delayed) the update of the previous step still reads this host gradient
            busy.wait()
        n = g.numel() * g.element_size()
        if s.count == 0:
            if s.buf is None or s.buf.shape != g.shape or s.buf.dtype != g.dtype:
                s.buf = self.t.host_buffer(g.shape, g.dtype)
            s.ev = self.t.d2h(s.buf, g)
            if self.norm_type is not None:  # the norm of this micro-batch's gradient, while it is here
                s.dev_norm = torch.linalg.vector_norm(g, self.norm_type, dtype=_norm_dtype(g.dtype, s.ref))
        else:
            stage = self.t.host_like(g)
            ev = self.t.d2h(stage, g)
            s.dev_norm = None
            s.done = self.worker.submit(functools.partial(self._absorb, s, stage, ev), n)
            self.stats["accumulated"] += 1
        s.count += 1
        self.stats["copied_bytes"] += n
        p.grad = None

    def _absorb(self, s: _G, stage: torch.Tensor, ev) -> None:
        """(host thread) add a later micro-batch's gradient into the accumulator, in the reference dtype."""
        self.t.sync(s.ev)
        self.t.sync(ev)
        if not s.acc_valid:
            if s.acc is None or s.acc.shape != s.buf.shape or s.acc.dtype != s.ref:
                s.acc = torch.empty(s.buf.shape, dtype=s.ref)
            s.acc.copy_(s.buf)
            s.acc_valid = True
        s.acc.add_(stage)  # fp32 += bf16 adds the exact upcast, as the script's fp32 accumulation does

    # the step ----------------------------------------------------------------------------------------------
    def source(self, p: torch.Tensor) -> torch.Tensor:
        """p's host gradient (waits for its copy and accumulation): the accumulator or the landing buffer."""
        s = self.g[id(p)]
        if s.done is not None:
            s.done.wait()
            self.worker.raise_error()
        self.t.sync(s.ev)
        return s.acc if s.acc_valid else s.buf

    def update_grad(self, p: torch.Tensor, out: torch.Tensor | None, src: torch.Tensor | None = None) -> torch.Tensor:
        """p's gradient as the update consumes it, pending factors applied in the reference dtype: `out` (a
        scratch buffer in the update's dtype, p's shape) or the host copy itself when nothing converts.
        `src`: a slice of the host copy (`source(p)`, flattened) to convert instead of all of it."""
        s = self.g[id(p)]
        if src is None:
            src = self.source(p)
        if out is not None and s.ref == out.dtype and src.dtype != out.dtype:
            out.copy_(src)  # upcast first: the script's gradient is in this dtype
            for f in s.scales:
                out.mul_(f)
            return out
        for f in s.scales:
            src.mul_(f)  # in the reference dtype, as the device would have scaled the script's gradient
        if out is None or src.dtype == out.dtype:
            return src
        out.copy_(src)
        return out

    def factors(self, p: torch.Tensor) -> list[torch.Tensor] | None:
        """The factors pending on p's host gradient, when they apply in fp32 to its upcast (what
        `update_grad` does for an fp32 reference dtype); None where they apply in the 16-bit dtype."""
        s = self.g[id(p)]
        if s.scales and s.ref != torch.float32:
            return None
        return list(s.scales)

    def reset(self) -> None:
        """The gradients were consumed (step) or zeroed: the next backward starts afresh (those handed to a
        delayed update are reset when it has read them)."""
        self.worker.drain()
        for s in self.g.values():
            if s.busy is None:
                _clear(s)

    def hand_over(self, params: list[torch.Tensor]) -> None:
        """(delayed schedule) these host gradients belong to an update running on another thread."""
        for p in params:
            self.g[id(p)].busy = threading.Event()

    def release(self, params: list[torch.Tensor]) -> None:
        """(delayed schedule) the update has read these: the next backward may write them."""
        for p in params:
            s = self.g[id(p)]
            busy, s.busy = s.busy, None
            _clear(s)
            if busy is not None:
                busy.set()

    # clipping and GradScaler --------------------------------------------------------------------------------
    def norms(self, params: list[torch.Tensor], norm_type: float) -> list[torch.Tensor]:
        """Per-parameter norms (fp32, on the host) of the host gradients of `params` that have one, with the
        factors already pending (unscaling) applied."""
        t0 = time.perf_counter()
        mine = [p for p in params if self.has(p)]
        out: list[torch.Tensor | None] = [None] * len(mine)
        dev = [(i, self.g[id(p)].dev_norm) for i, p in enumerate(mine)
               if self.g[id(p)].dev_norm is not None and self.g[id(p)].count == 1 and self.norm_type == norm_type]
        if dev:  # one transfer for all of them
            host = torch.stack([n.float() for _, n in dev]).to("cpu")
            for k, (i, _) in enumerate(dev):
                out[i] = host[k]
            self.stats["device_norms"] += len(dev)
        for i, p in enumerate(mine):
            if out[i] is None:
                src = self.source(p)
                out[i] = torch.linalg.vector_norm(src, norm_type, dtype=_norm_dtype(src.dtype, self.g[id(p)].ref)).float()
        res = []
        for p, n in zip(mine, out, strict=True):
            for f in self.g[id(p)].scales:
                n = n * f.abs()
            res.append(n)
        self.norm_type = norm_type  # from now on the hooks measure device norms for this clip
        self.stats["norm_s"] += time.perf_counter() - t0
        self.norm_times.append(time.perf_counter() - t0)
        return res

    def scale(self, params: list[torch.Tensor], factor: torch.Tensor) -> None:
        """Multiply the host gradients of `params` by `factor` (a CPU scalar) inside the update."""
        for p in params:
            if self.has(p):
                self.g[id(p)].scales.append(factor)

    def unscale(self, params: list[torch.Tensor], inv_scale: torch.Tensor, allow_fp16: bool) -> torch.Tensor:
        """GradScaler's unscale on the host copies: 1.0 when any is inf/nan (a CPU scalar), and the inverse
        scale pending on every one of them."""
        t0 = time.perf_counter()
        inv = inv_scale.detach().to("cpu", torch.float32)
        found = False
        for p in params:
            if not self.has(p):
                continue
            s = self.g[id(p)]
            if not allow_fp16 and s.ref == torch.float16:
                raise ValueError("Attempting to unscale FP16 gradients.")
            if not found:
                found = not bool(torch.isfinite(self.source(p)).all())
            s.scales.append(inv)
        self.stats["unscale_s"] += time.perf_counter() - t0
        return torch.full((), float(found), dtype=torch.float32)

    def close(self) -> None:
        self.worker.close()


def _clear(s: _G) -> None:
    s.count = 0
    s.acc_valid = False
    s.done = None
    s.dev_norm = None
    s.scales = []


def _norm_dtype(have: torch.dtype, ref: torch.dtype) -> torch.dtype | None:
    """The dtype a norm is computed in: the script's gradient's (a bf16 copy of an fp32 gradient is
    measured in fp32)."""
    return ref if ref != have and ref.is_floating_point and torch.finfo(ref).bits > torch.finfo(have).bits else None
