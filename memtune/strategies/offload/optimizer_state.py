"""Optimizer-state offload (ZeRO-Offload style): the state (and, with bf16 params, the fp32 master weights)
lives on the host; gradients are copied down as each one is ready (post-accumulate-grad hooks, overlapping
the backward), the update runs on the CPU chunk by chunk with the optimizer's own code (fused CPU kernels for
Adam/AdamW/SGD/Adagrad), and each chunk's parameters stream back while the CPU updates the next. Same
optimizer object (LR schedulers, GradScaler, clipping and accumulation work: a gradient changed after its
copy, e.g. by unscaling, is copied again at step time), same `state_dict()`. Global-norm clipping: the
clipped gradients are copied down again (measured faster than the alternative, CLIP_ON_HOST:
`torch.nn.utils.clip_grad_norm_`, patched while an optimizer is offloaded, clips the device gradients exactly
as torch does and hands the coefficient to the host, which multiplies its copy the same way inside the
update). GradScaler's unscale changes gradients without bumping their version counters, so it is patched to
mark the host copies stale.

With streamed gradients (`gradients=True`, gradients.py) the device gradients are dropped as they go down;
the update reads the host gradients (accumulated, unscaled and clipped there). Streamed parameters
(params.py) have no device copy to write back to: the update rounds their masters into the host copy the
next forward fetches (`host_params`).

Schedules. `exact` (default, lossless): the update runs inside `optimizer.step()`, each chunk as soon as its
gradients have arrived (the CPU runs ahead of the GPU, so this overlaps the end of the backward; with
clipping or GradScaler nothing can start before the backward ends, the coefficient needs every gradient);
updated weights are copied back chunk by chunk before `step()` returns. With `update_order` (what offload
sets with streamed gradients) the exact update overlaps the next forward instead: `step()` hands the update
to a host thread, which updates in forward order (the weights outside the repeated blocks, then block by
block) and copies each group up (or into the streamed weights' host copy) as it is done; the forward waits,
block by block, only for the weights it is about to use (`wait_group`). The same numbers; what reads a
block's weights outside that block's forward before then (the optimizer's or the model's state_dict
waits for the whole update) would see them not yet updated. `delayed` (ZeRO-Offload's one-step
delayed parameter update, Ren et al. 2021 sec. 5; changes the numbers: labelled lossy): `step()` copies the
previous update's weights up and hands this step's gradients to a host thread, which updates while the GPU
runs the next forward and backward; each weight is one update behind.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import functools
import statistics
import time
import weakref
from typing import Any

import torch

from memtune.kernels import host_adamw
from memtune.optim.stepping import check_elementwise, run_closure, step_on, wrap_step
from memtune.strategies.offload.gradients import HostGradients, HostWorker
from memtune.undo import Undo, patch_functions, replace_on_instance

SCHEDULES = ("exact", "delayed")
# torch's fused CPU AdamW on slices of this many elements, with the gradient's upcast before and the rounding
# of the master to 16 bits after each slice: the fp32 gradient and the just-updated master are read back from
# cache instead of memory (12 B/param of conversions otherwise go through DRAM, 1.49x the update on the H100
# host). The same arithmetic as one call per parameter, to fp32 rounding (the kernel's vectorized and scalar
# paths round differently and a slice moves where one ends, as the thread count already does); used for torch
# AdamW with streamed gradients once a parameter has state; slices are multiples of 4096 elements. 0: off.
SLICE_ELEMENTS = 4 << 20

MARKED_STEPS = 64  # the GPU phase marks kept (two events per step)
CHUNK_BYTES = 64 * 2**20  # optimizer offload pipelines the CPU update and the H2D copy in chunks this big
# Clipped gradients: multiply the host copy by the clip coefficient (True) or copy the clipped gradients down
# again (False; also the fallback whenever the host copy is not the one the clip saw). Both exact. On the H100
# machine (1.1B Llama, torch 2.11, 2026-11-25, docs/strategies.md) copying again was faster: 487 vs 538 ms
# median step. The host is memory-bound (the fused CPU AdamW ran at ~110 GB/s), so one more pass over 4.4 GB
# of gradients costs more CPU time than a 55 GB/s copy that runs beside the update; either way the update
# cannot start before the backward ends (the coefficient needs every gradient).
CLIP_ON_HOST = False
# CPU optimizer update rate used by the cost model: bytes touched per second by a fused CPU AdamW step
# (p, g, m, v read; p, m, v written = 28 B/param). Measured on the H100 machine's 16-core host, torch 2.11,
# 2026-11-25 (docs/strategies.md): 1.1B params added ~200 ms to the step -> ~150 GB/s. Hosts differ widely.
HOST_UPDATE_GBPS = 150.0
_FUSED_CPU = ("Adam", "AdamW", "SGD", "Adagrad")


def fused_cpu_overrides(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Group options that run `opt`'s update with torch's fused CPU kernel, when its class has one."""
    if type(opt).__name__ in _FUSED_CPU and type(opt).__module__.startswith("torch.optim") \
            and all("fused" in g and not g.get("differentiable") for g in opt.param_groups):
        return {"fused": True, "foreach": False}
    return {}


def _param_list(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


class _PState:
    __slots__ = ("grad_buf", "grad_ev", "grad_ptr", "grad_ver", "h2d_ev", "p_ver", "scales", "stage", "sub")

    def __init__(self, sub):
        self.sub = sub
        self.grad_buf = self.grad_ev = self.stage = self.h2d_ev = None
        self.grad_ptr = self.grad_ver = None
        self.p_ver = None
        self.scales: list[list] = []  # clip coefficients still to apply to the host copy: [host tensor, event]


class OptimizerOffload:
    """Keeps one optimizer's state and the update on the host; see the module docstring.

    `gradients`: stream gradients to the host as backward produces them (gradients.py) instead of keeping
    them on the device until the step. `ref_dtypes`: the dtype of each parameter's gradient in the script as
    written (id(param) -> dtype; default the parameter's), which host accumulation, unscaling and clipping
    follow. `schedule`: "exact" or "delayed" (see the module docstring)."""

    def __init__(self, opt: torch.optim.Optimizer, transport, masters: dict[int, torch.Tensor] | None = None, *,
                 gradients: bool = False, ref_dtypes: dict[int, torch.dtype] | None = None,
                 schedule: str = "exact", update_order: list[list[torch.Tensor]] | None = None):
        check_elementwise(opt, "offload.optimizer_state")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule {schedule!r}: one of {SCHEDULES}")
        self.opt, self.t = opt, transport
        self.schedule = schedule
        self.params = _param_list(opt)
        self.ps: dict[int, _PState] = {}
        with torch.no_grad():
            for p in self.params:
                sub = (masters or {}).get(id(p))
                if sub is None:
                    sub = self.t.host_buffer(p.shape, p.dtype)
                    sub.copy_(p.detach())
                st = _PState(sub)
                st.p_ver = p._version
                self.ps[id(p)] = st
        self.subs = {k: v.sub for k, v in self.ps.items()}
        self.overrides: dict[str, Any] = fused_cpu_overrides(opt) if self.t.cuda else {}
        self.clip_on_host = CLIP_ON_HOST
        self._chunk_cache: tuple[tuple[int, ...], list[list[torch.Tensor]]] | None = None
        self._scratch: dict[torch.dtype, torch.Tensor] = {}  # upcast gradients of one chunk (update dtype)
        # streamed parameters (params.py): id(param) -> its host copy, which the update writes instead of the
        # device parameter (there is none between its uses)
        self.host_params: dict[int, torch.Tensor] = {}
        # per-step costs, cumulative (benchmarks/strategies.py reports them): seconds the CPU waited for
        # gradients, seconds in the CPU update, gradients copied down again, gradients scaled on the host
        self.stats = {"steps": 0, "wait_s": 0.0, "update_s": 0.0, "recopied": 0, "host_scaled": 0}
        # per step (the exact schedule): the update's wall time on the host thread, and how long the training
        # thread blocked on it in the next forward (the first step's, which builds the state, is not typical)
        self.timeline: dict[str, list[float]] = {"update": [], "blocked": [], "wait": [], "kernel": []}
        # (CUDA) events on the compute stream at each step() and at each step's first gradient: the GPU's
        # time from one step() to the next backward (forward, loss and the waits on the update) and of the
        # backward (recompute and weight fetches included), measured where the step's time goes
        self._marks: collections.deque = collections.deque(maxlen=2 * MARKED_STEPS)
        self._grad_marked = False
        self.state_to_host()
        trained = [p for p in self.params if p.requires_grad]
        self.hg = HostGradients(trained, transport, ref_dtypes) if gradients else None
        hook = self._marking(self.hg.on_grad if self.hg is not None else self._grad_ready)
        self.handles = [p.register_post_accumulate_grad_hook(hook) for p in trained]
        self.handles.append(opt.register_load_state_dict_post_hook(lambda o: self.state_to_host()))
        self.handles.append(opt.register_state_dict_pre_hook(lambda o: self.finish_pending()))
        self._undo_zero = self._wrap_zero_grad() if self.hg is not None else None
        self.last_h2d = None
        # delayed schedule: the host thread running the update, and the update it is running
        overlapped = schedule == "exact" and update_order is not None
        self._bg = HostWorker(limit_bytes=1 << 62) if schedule == "delayed" or overlapped else None
        self._pending: Any = None  # threading.Event of the update in flight
        self._pending_params: list[torch.Tensor] = []
        # exact, overlapping the next forward: groups of parameters in forward order, each group's
        # "updated and copied up" event, and its last copy's CUDA event
        self.order: list[list[torch.Tensor]] | None = None
        if overlapped:
            mine = {id(p) for p in self.params}
            seen: set[int] = set()
            order = []
            for g in update_order:
                grp = [p for p in g if id(p) in mine and id(p) not in seen]
                seen |= {id(p) for p in grp}
                order.append(grp)
            order[0] = order[0] + [p for p in self.params if id(p) not in seen]  # the rest: before the forward
            self.order = order
        self.group_of = {id(p): i for i, g in enumerate(self.order or []) for p in g}
        self._group_done: list[Any] = []
        self._blocked = 0.0  # seconds the training thread waited in wait_group this step
        self._group_ev: list[Any] = []
        self.undo_step = wrap_step(opt, self._step)
        if self.hg is not None and self.overrides.get("fused") and SLICE_ELEMENTS:
            host_adamw.kernel()  # built here, on the training thread (its thread count), not in the first update
        _LIVE.add(self)

    def _mark(self, kind: str) -> None:
        if self.t.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks.append((kind, ev))

    def _marking(self, hook):
        def marked(p: torch.Tensor) -> None:
            if not self._grad_marked and p.grad is not None:
                self._grad_marked = True
                self._mark("grad")
            hook(p)

        return marked

    def gpu_phases(self) -> tuple[float, float] | None:
        """Median GPU seconds (steady steps) from a step() to the next backward's first gradient, and from
        there to the next step(); None without CUDA marks."""
        marks = list(self._marks)
        fwd, bwd = [], []
        for (k0, e0), (k1, e1), (k2, e2) in zip(marks, marks[1:], marks[2:], strict=False):
            if (k0, k1, k2) == ("step", "grad", "step"):
                e2.synchronize()
                fwd.append(e0.elapsed_time(e1) / 1e3)
                bwd.append(e1.elapsed_time(e2) / 1e3)
        if len(fwd) > 1:  # the first follows the state-building update
            fwd, bwd = fwd[1:], bwd[1:]
        return (statistics.median(fwd), statistics.median(bwd)) if fwd else None

    def _wrap_zero_grad(self) -> Undo:
        orig = self.opt.zero_grad
        me = weakref.ref(self)

        @functools.wraps(orig)
        def zero_grad(*args, **kwargs):
            out = orig(*args, **kwargs)
            o = me()
            if o is not None and o.hg is not None:
                o.hg.reset()
            return out

        return replace_on_instance(self.opt, "zero_grad", zero_grad)

    def summary(self) -> str:
        """Where the host's time went, per step (for `memtune apply`'s notes and the benchmarks)."""
        n = max(1, self.stats["steps"])
        out = (f"{self.stats['steps']} host updates: {self.stats['update_s'] / n * 1e3:.0f} ms per step updating, "
               f"{self.stats['wait_s'] / n * 1e3:.0f} ms waiting for gradients")
        tl = {k: v[1:] for k, v in self.timeline.items()}  # after the first update, which builds the state
        if tl["update"]:
            out += f" (steady: {statistics.median(tl['update']) * 1e3:.0f} ms per update"
            if tl["wait"]:
                out += (f" of which {statistics.median(tl['wait']) * 1e3:.0f} waiting for gradients and "
                        f"{statistics.median(tl['kernel']) * 1e3:.0f} in the one-pass kernel")
            if tl["blocked"]:
                out += f", the next forward blocked {statistics.median(tl['blocked']) * 1e3:.0f} ms on it"
            out += ")"
        gpu = self.gpu_phases()
        if gpu:
            out += (f"; GPU per step: {gpu[0] * 1e3:.0f} ms from step() to the first gradient (forward, loss, "
                    f"waits on the update), {gpu[1] * 1e3:.0f} ms backward")
        if self.hg is not None:
            h = self.hg.stats
            out += (f"; {h['copied_bytes'] / n / 1e9:.2f} GB of gradients down per step, norms "
                    f"{h['norm_s'] / n * 1e3:.0f} ms, unscale {h['unscale_s'] / n * 1e3:.0f} ms per step")
            if len(self.hg.norm_times) > 1:
                out += f" (steady: norms {statistics.median(self.hg.norm_times[1:]) * 1e3:.0f} ms)"
        if self.stats.get("sliced"):
            out += f"; {self.stats['sliced']} sliced fused updates"
            if self.stats.get("one_pass"):
                out += (f" ({self.stats['one_pass']} in one pass, {self.stats['kernel_s'] / n * 1e3:.0f} ms per step "
                        "inside the kernel)")
            elif host_adamw.unavailable():
                out += f" (three passes: the one-pass kernel is unavailable, {host_adamw.unavailable()})"
        return out

    def sync_versions(self) -> None:
        """The parameters' data were replaced on purpose (placement moved them, the streamer swapped them):
        their current versions are not a change from outside."""
        for p in self.params:
            self.ps[id(p)].p_ver = p._version

    def state_to_host(self) -> None:
        for p in self.params:
            st = self.opt.state.get(p)
            if not st:
                continue
            for k, v in list(st.items()):
                if isinstance(v, torch.Tensor) and v.device.type != "cpu" or (
                        self.t.cuda and isinstance(v, torch.Tensor) and v.dim() > 0 and not v.is_pinned()):
                    h = self.t.host_like(v) if v.dim() > 0 else torch.empty_like(v, device="cpu")
                    h.copy_(v)
                    st[k] = h

    def _grad_ready(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self._grads_ready([p])

    def mark_stale(self) -> None:
        """Every host gradient copy is out of date (changed in place without a version bump)."""
        for st in self.ps.values():
            st.grad_ver = None
            st.scales = []

    # clipping -------------------------------------------------------------------------------------
    def clip_begin(self, params: list[torch.Tensor]) -> list[tuple] | None:
        """Before torch clips `params` in place: which of ours have a host copy equal to the gradient now."""
        if not self.clip_on_host:
            return None
        cur = []
        for p in params:
            st = self.ps.get(id(p))
            g = p.grad
            if st is not None and g is not None and st.grad_buf is not None and st.grad_ptr == g.data_ptr() \
                    and st.grad_ver == g._version:
                cur.append((st, g, g._version))
        return cur or None

    def clip_end(self, cur: list[tuple], coef: tuple) -> None:
        """torch multiplied each gradient by the coefficient once (version + 1): the host copy follows in
        `_step`; anything else that happened to a gradient leaves it to be copied down again."""
        for st, g, ver in cur:
            if g._version == ver + 1:
                st.scales.append(list(coef))
                st.grad_ver = g._version

    def _host_grad(self, st: _PState, out: torch.Tensor | None) -> torch.Tensor:
        """The host gradient the update uses: the copy, times any clip coefficients, in the sub's dtype
        (`out`: this parameter's slice of the chunk scratch, when the dtypes differ)."""
        buf = st.grad_buf
        for i, sc in enumerate(st.scales):
            if sc[1] is not None:
                self.t.sync(sc[1])
                sc[1] = None
            last = i == len(st.scales) - 1
            if last and out is not None:  # multiply in the gradient's dtype, upcast, one pass
                torch.mul(buf, sc[0], out=out)
                self.stats["host_scaled"] += 1
                return out
            buf.mul_(sc[0])  # same arithmetic as torch's in-place clip on the device
            self.stats["host_scaled"] += last
        if out is None:
            return buf
        return out.copy_(buf)  # bf16 grads, fp32 master: upcast into the chunk scratch

    def _scratch_views(self, chunk: list[torch.Tensor], grad_dtypes: dict[int, torch.dtype]) -> dict[int, torch.Tensor]:
        """Views of one flat buffer per update dtype for the gradients of `chunk` that need converting (kept
        across steps: one chunk's worth, not a model's worth, of fp32 gradients)."""
        need: dict[torch.dtype, int] = {}
        for p in chunk:
            sub = self.ps[id(p)].sub
            if grad_dtypes[id(p)] != sub.dtype:
                need[sub.dtype] = need.get(sub.dtype, 0) + sub.numel()
        for dt, n in need.items():
            if dt not in self._scratch or self._scratch[dt].numel() < n:
                self._scratch[dt] = torch.empty(n, dtype=dt)
        out, off = {}, dict.fromkeys(need, 0)
        for p in chunk:
            sub = self.ps[id(p)].sub
            if grad_dtypes[id(p)] != sub.dtype:
                o = off[sub.dtype]
                out[id(p)] = self._scratch[sub.dtype][o:o + sub.numel()].view(sub.shape)
                off[sub.dtype] = o + sub.numel()
        return out

    def _chunks(self, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        key = tuple(id(p) for p in params)
        if self._chunk_cache is not None and self._chunk_cache[0] == key:
            return self._chunk_cache[1]
        out, cur, size = [], [], 0
        for p in params:
            cur.append(p)
            size += self.ps[id(p)].sub.numel() * p.element_size()  # (a streamed param's data is a placeholder)
            if size >= CHUNK_BYTES:
                out.append(cur)
                cur, size = [], 0
        if cur:
            out.append(cur)
        self._chunk_cache = (key, out)
        return out

    @torch.no_grad()
    def _step(self, opt, closure=None):
        loss = run_closure(closure)
        self._mark("step")
        self._grad_marked = False
        if self.schedule == "delayed":
            self._step_delayed()
            return loss
        if self.order is not None:
            self._step_overlapped()
            return loss
        self.t.sync(self.last_h2d)  # the previous step's copies out of the host buffers are done
        todo = self._todo()
        self.t.h2d_fence()
        self.last_h2d = self._update(opt, todo, copy_up=True)
        self.t.join()
        if self.hg is not None:
            self.hg.reset()  # consumed: the next backward starts afresh
        self.stats["steps"] += 1
        return loss

    def _todo(self) -> list[torch.Tensor]:
        """The parameters this step updates, last ones first (backward produces their gradients first)."""
        if self.hg is not None:
            return [p for p in reversed(self.params) if self.hg.has(p)]
        todo = [p for p in reversed(self.params) if p.grad is not None]
        for chunk in self._chunks(todo):
            stale = []
            for p in chunk:
                st = self.ps[id(p)]
                g = p.grad
                if st.grad_buf is None or st.grad_ptr != g.data_ptr() or st.grad_ver != g._version:
                    stale.append(p)  # changed since its copy (unscaling, accumulation, clipping elsewhere)
            if stale:
                self._grads_ready(stale)
                self.stats["recopied"] += len(stale)
        return todo

    def _grads_ready(self, ps: list[torch.Tensor]) -> None:
        """Copy these parameters' gradients to their host buffers in one batch, with one event (a clipping
        script copies every gradient down again at step time; one by one, the H200 host spent ~0.1 ms issuing
        each, lightning zoo, call 31)."""
        pairs, sts = [], []
        for p in ps:
            g = p.grad
            st = self.ps[id(p)]
            if st.grad_buf is None or st.grad_buf.shape != g.shape or st.grad_buf.dtype != g.dtype:
                st.grad_buf = self.t.host_like(g)
            pairs.append((st.grad_buf, g))
            sts.append((st, g))
        ev = self.t.d2h_many(pairs)
        for st, g in sts:
            st.grad_ev = ev
            st.grad_ptr, st.grad_ver = g.data_ptr(), g._version
            st.scales = []

    def _refresh_from_weights(self, p: torch.Tensor) -> None:
        st = self.ps[id(p)]
        if id(p) not in self.host_params and p._version != st.p_ver:
            st.sub.copy_(p.detach())  # someone changed the weights (load_state_dict): refresh the copy

    def _update(self, opt, todo: list[torch.Tensor], copy_up: bool):
        """Update `todo` chunk by chunk as their gradients arrive; write each chunk's new weights to the device
        (copy_up), to the stage buffers (delayed: copied up by the next step) or to a streamed parameter's
        host copy. Returns the last copy's event."""
        ev = None
        wait = upd = 0.0
        for chunk in self._chunks(todo):
            t0 = time.perf_counter()
            if self.hg is not None:
                dtypes = {id(p): self.hg.source(p).dtype for p in chunk}  # waits for copies and accumulation
            else:
                synced = None
                for p in chunk:
                    ev_p = self.ps[id(p)].grad_ev
                    if ev_p is not synced:  # a batch of copies shares one event
                        self.t.sync(ev_p)
                        synced = ev_p
                dtypes = {id(p): self.ps[id(p)].grad_buf.dtype for p in chunk}
            t1 = time.perf_counter()
            sliced = [p for p in chunk if self._can_slice(opt, p, dtypes[id(p)])]
            if sliced:
                for p in sliced:
                    self._refresh_from_weights(p)
                    self._sliced_adamw(opt, p)
                    ev = self._write_back(p, copy_up, converted=True) or ev
                done = {id(p) for p in sliced}
                chunk = [p for p in chunk if id(p) not in done]
                if not chunk:
                    upd += time.perf_counter() - t1
                    wait += t1 - t0
                    continue
            scratch = self._scratch_views(chunk, dtypes)
            for p in chunk:
                st = self.ps[id(p)]
                self._refresh_from_weights(p)
                if self.hg is not None:
                    st.sub.grad = self.hg.update_grad(p, scratch.get(id(p)))
                else:
                    st.sub.grad = self._host_grad(st, scratch.get(id(p)))
                st.scales = []
            if not copy_up:  # (delayed) a weight copied up from its master directly must have left first
                for p in chunk:
                    if self.ps[id(p)].stage is None:
                        self.t.sync(self.ps[id(p)].h2d_ev)
            try:
                step_on(opt, self.subs, self.overrides, only=chunk)
            finally:
                for p in chunk:
                    self.ps[id(p)].sub.grad = None
            wait, upd = wait + t1 - t0, upd + time.perf_counter() - t1
            for p in chunk:
                ev = self._write_back(p, copy_up) or ev
        self.stats["wait_s"] += wait
        self.stats["update_s"] += upd
        return ev

    def _write_back(self, p: torch.Tensor, copy_up: bool, converted: bool = False):
        """`converted`: the sliced update already wrote the 16-bit copy (host copy or stage)."""
        st = self.ps[id(p)]
        host = self.host_params.get(id(p))
        if host is not None:  # streamed: the host copy is the parameter; its next fetch brings the update
            if not converted:
                host.copy_(st.sub)
            return None
        src = st.sub
        if src.dtype != p.dtype:
            if st.stage is None:
                st.stage = self.t.host_buffer(st.sub.shape, p.dtype)
            if not converted:
                self.t.sync(st.h2d_ev)  # (delayed) the previous copy up out of this stage is done
                st.stage.copy_(src)
            src = st.stage
        if not copy_up:
            return None
        ev = st.h2d_ev = self.t.h2d(p.detach(), src)
        st.p_ver = p._version
        return ev

    # the sliced fused AdamW ----------------------------------------------------------------------------------
    def _can_slice(self, opt, p: torch.Tensor, grad_dtype: torch.dtype) -> bool:
        if not SLICE_ELEMENTS or self.hg is None or not self.overrides.get("fused"):
            return False
        if type(self.opt) is not torch.optim.AdamW:
            return False
        st = self.ps[id(p)]
        state = self.opt.state.get(p) or {}
        m, v, step = state.get("exp_avg"), state.get("exp_avg_sq"), state.get("step")
        if m is None or v is None or not torch.is_tensor(step) or not st.sub.is_contiguous():
            return False  # the first step: the optimizer's own code makes its state
        if not (m.is_contiguous() and v.is_contiguous()) or st.sub.dtype != torch.float32 or p.dtype == st.sub.dtype:
            return False  # (16-bit weights with fp32 masters: the conversions it saves)
        g = self._group(opt, p)
        return not (g.get("amsgrad") or g.get("maximize") or g.get("capturable") or g.get("differentiable")
                    or torch.is_tensor(g["lr"]))

    def _group(self, opt, p: torch.Tensor) -> dict[str, Any]:
        for g in opt.param_groups:
            if any(q is p for q in g["params"]):
                return g
        raise KeyError("parameter not in the optimizer")

    def _sliced_adamw(self, opt, p: torch.Tensor) -> None:
        """torch's fused CPU AdamW on p's master, a slice at a time: upcast (and scale) the gradient slice
        into cache, update, round the slice into the 16-bit copy (streamed weights' host copy, or the stage)."""
        st = self.ps[id(p)]
        g = self._group(opt, p)
        state = self.opt.state[p]
        state["step"] += 1  # what torch's _fused_adam does before its kernel
        sub, m, v = st.sub.view(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
        src = self.hg.source(p).reshape(-1)
        host = self.host_params.get(id(p))
        if host is None:
            if st.stage is None:
                st.stage = self.t.host_buffer(st.sub.shape, p.dtype)
            self.t.sync(st.h2d_ev)  # (delayed) the previous copy up out of the stage is done
            host = st.stage
        out16 = host.view(-1)
        n = sub.numel()
        k = min(n, SLICE_ELEMENTS)
        b1, b2 = g["betas"]
        factors = self.hg.factors(p)
        fn = host_adamw.kernel() if factors is not None else None
        if fn is not None and fn.supports(sub, src, out16) and src.is_contiguous():  # one pass
            scale = 1.0
            for f in factors:
                scale *= float(f)
            t0 = time.perf_counter()
            fn(sub, src, m, v, out16, float(g["lr"]), float(b1), float(b2), float(g["weight_decay"]),
               float(g["eps"]), float(state["step"]), scale)
            self.stats["kernel_s"] = self.stats.get("kernel_s", 0.0) + time.perf_counter() - t0
            self.stats["sliced"] = self.stats.get("sliced", 0) + 1
            self.stats["one_pass"] = self.stats.get("one_pass", 0) + 1
            return
        if torch.float32 not in self._scratch or self._scratch[torch.float32].numel() < k:
            self._scratch[torch.float32] = torch.empty(k, dtype=torch.float32)
        scratch = self._scratch[torch.float32]
        for a in range(0, n, k):
            b = min(n, a + k)
            grad = self.hg.update_grad(p, scratch[:b - a], src[a:b])
            torch._fused_adamw_([sub[a:b]], [grad], [m[a:b]], [v[a:b]], [], [state["step"]], amsgrad=False,
                                lr=float(g["lr"]), beta1=float(b1), beta2=float(b2),
                                weight_decay=float(g["weight_decay"]), eps=float(g["eps"]), maximize=False,
                                grad_scale=None, found_inf=None)
            out16[a:b].copy_(sub[a:b])
        self.stats["sliced"] = self.stats.get("sliced", 0) + 1

    # exact, overlapping the next forward --------------------------------------------------------------------
    def _shadow(self):
        """The update's own view of the optimizer: the script's LR scheduler changes the live one's groups
        while the host thread updates."""
        shadow = object.__new__(type(self.opt))
        shadow.__dict__.update(self.opt.__dict__)
        shadow.param_groups = [dict(g) for g in self.opt.param_groups]
        return shadow

    def _step_overlapped(self) -> None:
        import threading

        self.wait_all()
        todo = self._todo()
        have = {id(p) for p in todo}
        groups = [[p for p in g if id(p) in have] for g in self.order]
        if self.stats["steps"]:
            self.timeline["blocked"].append(self._blocked)
        self._blocked = 0.0
        self._group_done = [threading.Event() for _ in groups]
        self._group_ev = [None] * len(groups)
        if not todo:
            for e in self._group_done:
                e.set()
            return
        if self.hg is not None:
            self.hg.hand_over(todo)
        self.t.h2d_fence()  # copies into the live weights start after the GPU's queued work (the backward)
        self._pending = self._bg.submit(functools.partial(self._update_groups, self._shadow(), groups))
        self.stats["steps"] += 1

    def _update_groups(self, shadow, groups: list[list[torch.Tensor]]) -> None:
        done = 0
        t0 = time.perf_counter()
        w0, k0 = self.stats["wait_s"], self.stats.get("kernel_s", 0.0)
        try:
            for i, g in enumerate(groups):
                if g:
                    self._group_ev[i] = self._update(shadow, g, copy_up=True)
                    if self.hg is not None:
                        self.hg.release(g)  # the next backward may write these host gradients
                done = i + 1
                if done == len(groups):
                    self.timeline["update"].append(time.perf_counter() - t0)
                    self.timeline["wait"].append(self.stats["wait_s"] - w0)
                    self.timeline["kernel"].append(self.stats.get("kernel_s", 0.0) - k0)
                self._group_done[i].set()
        finally:
            if done < len(groups):  # a failure: release the rest, wake the waiters (they raise it)
                if self.hg is not None:
                    self.hg.release([p for g in groups[done:] for p in g])
                for e in self._group_done[done:]:
                    e.set()

    def wait_group(self, i: int, stream: bool = True) -> None:
        """(forward) group i's weights are updated and (`stream`) copied up for the compute stream."""
        if i >= len(self._group_done):
            return
        if not self._group_done[i].is_set():
            t0 = time.perf_counter()
            self._group_done[i].wait()
            self._blocked += time.perf_counter() - t0
        self._bg.raise_error()
        if stream:
            self.t.use(self._group_ev[i])

    def group_ready(self, i: int) -> bool:
        return i >= len(self._group_done) or self._group_done[i].is_set()

    def wait_all(self) -> None:
        if self._pending is None:
            return
        self._pending.wait()
        self._pending = None
        self._bg.raise_error()
        for ev in self._group_ev:
            self.t.use(ev)
        self.last_h2d = next((ev for ev in reversed(self._group_ev) if ev is not None), None)

    # delayed schedule ----------------------------------------------------------------------------------------
    def _step_delayed(self) -> None:
        """Copy the previous update's weights up, then update with this step's gradients on the host thread
        while the GPU runs the next forward and backward."""
        self.finish_pending(copy_up=True)
        todo = self._todo()
        if not todo:
            return
        shadow = self._shadow()
        if self.hg is not None:
            self.hg.hand_over(todo)  # the next backward may write p's host gradient once the update read it
        self._pending_params = todo
        self._pending = self._bg.submit(functools.partial(self._update_delayed, shadow, todo))
        self.stats["steps"] += 1

    def _update_delayed(self, shadow, todo: list[torch.Tensor]) -> None:
        try:
            self._update(shadow, todo, copy_up=False)
        finally:
            if self.hg is not None:
                self.hg.release(todo)

    def finish_pending(self, copy_up: bool = True) -> None:
        """Wait for the update in flight; (delayed) copy its weights up after the GPU's queued work."""
        if self.order is not None:
            self.wait_all()
            return
        if self._pending is None:
            return
        self._pending.wait()
        self._pending = None
        self._bg.raise_error()
        if not copy_up:
            return
        self.t.h2d_fence()
        ev = None
        for p in self._pending_params:
            st = self.ps[id(p)]
            src = st.stage if st.stage is not None else st.sub
            ev = st.h2d_ev = self.t.h2d(p.detach(), src)
        self.t.join()
        for p in self._pending_params:
            self.ps[id(p)].p_ver = p._version
        self.last_h2d = ev
        self._pending_params = []

    def undo(self, restore_state: bool = True) -> None:
        """Put the optimizer back as it was; `restore_state=False` leaves its state on the host (the run is
        over: moving 8 bytes per parameter back to the GPU would only cost time, or memory it may not have)."""
        self.finish_pending()
        _LIVE.discard(self)
        self.undo_step()
        if self._undo_zero is not None:
            self._undo_zero()
        for h in self.handles:
            h.remove()
        if self.hg is not None:
            self.hg.close()
        if self._bg is not None:
            self._bg.close()
        self.t.sync(self.last_h2d)
        if not restore_state:
            return
        dev = {id(p): p.device for p in self.params}
        for p in self.params:
            st = self.opt.state.get(p)
            for k, v in list((st or {}).items()):
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    st[k] = v.to(dev[id(p)])


_LIVE: weakref.WeakSet = weakref.WeakSet()  # optimizer offloads in effect (the clip patch looks here)


@atexit.register
def _finish_at_exit() -> None:
    """A script that ends right after `step()` leaves an update running on a host thread: let it finish
    before the interpreter (and torch) goes."""
    for o in list(_LIVE):
        with contextlib.suppress(Exception):  # (a failed update was reported where it was waited for)
            o.finish_pending(copy_up=False)


def _clip_patch(orig):
    """clip_grad_norm_ that also tells offloaded optimizers the coefficient it applied (see clip_end)."""

    @functools.wraps(orig)
    def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
        ps = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        streamed = [o for o in list(_LIVE) if o.hg is not None and any(o.hg.manages(p) for p in ps)]
        if streamed:
            return _clip_streamed(ps, streamed, max_norm, norm_type, error_if_nonfinite, foreach)
        pending = [(o, c) for o in list(_LIVE) if (c := o.clip_begin(ps))]
        for o, _ in pending:
            o.t.fence_d2h()  # the copies down must read the gradients before the clip changes them
        total = orig(ps, max_norm, norm_type, error_if_nonfinite, foreach)
        if pending:
            with torch.no_grad():
                # torch's coefficient, computed by the same ops (torch.nn.utils.clip_grads_with_norm_)
                coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
                for o, cur in pending:
                    o.clip_end(cur, o.t.scalar_to_host(coef))
        return total

    return clip_grad_norm_


@torch.no_grad()
def _clip_streamed(ps: list[torch.Tensor], offs: list[OptimizerOffload], max_norm, norm_type, error_if_nonfinite,
                   foreach):
    """clip_grad_norm_ over parameters whose gradients live on the host (gradients.py): torch's total norm
    (the norm of the per-parameter norms) and coefficient, the coefficient applied to the host copies inside
    the update; gradients still on the device (parameters no offload streams) are clipped there as usual."""
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    norm_type = float(norm_type)
    managed = {id(p) for o in offs for p in ps if o.hg.manages(p)}
    on_device = [p for p in ps if id(p) not in managed and p.grad is not None]
    norms = [n for o in offs for n in o.hg.norms([p for p in ps if o.hg.manages(p)], norm_type)]
    if on_device:
        norms.append(get_total_norm([p.grad for p in on_device], norm_type, False, foreach).float().cpu())
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type) if norms else torch.tensor(0.0)
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`")
    coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)  # torch's clip_grads_with_norm_
    for o in offs:
        o.hg.scale([p for p in ps if o.hg.manages(p)], coef)
    device = ps[0].device if ps else total.device
    if on_device:
        clip_grads_with_norm_(on_device, max_norm, total.to(on_device[0].device), foreach)
    return total.to(device)


def _unscale_patch(orig):
    """GradScaler's unscale changes gradients in place without bumping their version counters: tell the
    offloaded optimizer, whose host copies are now stale (copied down again at step time)."""

    @functools.wraps(orig)
    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        out = orig(self, optimizer, inv_scale, found_inf, allow_fp16)
        for o in list(_LIVE):
            if o.opt is not optimizer:
                continue
            if o.hg is None:
                o.mark_stale()
                continue
            # streamed gradients: the inf/nan check on the host copies, the inverse scale applied in the update
            cpu = torch.device("cpu")
            found = o.hg.unscale(o.params, inv_scale, allow_fp16)
            out = dict(out)
            out[cpu] = torch.maximum(out[cpu], found) if cpu in out else found
        return out

    return _unscale_grads_


def install_clip_patch() -> Undo:
    """Patch torch.nn.utils.clip_grad_norm_ (both names it is found under) for `_clip_patch`, and
    GradScaler's unscale for `_unscale_patch`."""
    import torch.nn.utils as nu
    import torch.nn.utils.clip_grad as cg
    from torch.amp.grad_scaler import GradScaler

    clip = patch_functions([(nu, "clip_grad_norm_"), (cg, "clip_grad_norm_")], _clip_patch, "_memtune_offload_clip")
    unscale = patch_functions([(GradScaler, "_unscale_grads_")], _unscale_patch, "_memtune_offload_clip")

    def restore() -> None:
        unscale()
        clip()

    return restore
