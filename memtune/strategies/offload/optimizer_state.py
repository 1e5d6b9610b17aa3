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
"""

from __future__ import annotations

import functools
import time
import weakref
from typing import Any

import torch

from memtune.optim.stepping import check_elementwise, run_closure, step_on, wrap_step
from memtune.undo import Undo, patch_functions

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
    __slots__ = ("grad32", "grad_buf", "grad_ev", "grad_ptr", "grad_ver", "p_ver", "scales", "stage", "sub")

    def __init__(self, sub):
        self.sub = sub
        self.grad_buf = self.grad_ev = self.stage = self.grad32 = None
        self.grad_ptr = self.grad_ver = None
        self.p_ver = None
        self.scales: list[list] = []  # clip coefficients still to apply to the host copy: [host tensor, event]


class OptimizerOffload:
    """Keeps one optimizer's state and the update on the host; see the module docstring."""

    def __init__(self, opt: torch.optim.Optimizer, transport, masters: dict[int, torch.Tensor] | None = None):
        check_elementwise(opt, "offload.optimizer_state")
        self.opt, self.t = opt, transport
        self.params = _param_list(opt)
        self.ps: dict[int, _PState] = {}
        with torch.no_grad():
            for p in self.params:
                sub = (masters or {}).get(id(p))
                if sub is None:
                    sub = self.t.host_like(p)
                    sub.copy_(p.detach())
                st = _PState(sub)
                st.p_ver = p._version
                self.ps[id(p)] = st
        self.subs = {k: v.sub for k, v in self.ps.items()}
        self.overrides: dict[str, Any] = fused_cpu_overrides(opt) if self.t.cuda else {}
        self.clip_on_host = CLIP_ON_HOST
        self._chunk_cache: tuple[tuple[int, ...], list[list[torch.Tensor]]] | None = None
        # per-step costs, cumulative (benchmarks/strategies.py reports them): seconds the CPU waited for
        # gradients, seconds in the CPU update, gradients copied down again, gradients scaled on the host
        self.stats = {"steps": 0, "wait_s": 0.0, "update_s": 0.0, "recopied": 0, "host_scaled": 0}
        self.state_to_host()
        self.handles = [p.register_post_accumulate_grad_hook(self._grad_ready)
                        for p in self.params if p.requires_grad]
        self.handles.append(opt.register_load_state_dict_post_hook(lambda o: self.state_to_host()))
        self.last_h2d = None
        self.undo_step = wrap_step(opt, self._step)
        _LIVE.add(self)

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
        g = p.grad
        if g is None:
            return
        st = self.ps[id(p)]
        if st.grad_buf is None or st.grad_buf.shape != g.shape or st.grad_buf.dtype != g.dtype:
            st.grad_buf = self.t.host_like(g)
        st.grad_ev = self.t.d2h(st.grad_buf, g)
        st.grad_ptr, st.grad_ver = g.data_ptr(), g._version
        st.scales = []

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

    def _host_grad(self, st: _PState) -> torch.Tensor:
        """The host gradient the update uses: the copy, times any clip coefficients, in the sub's dtype."""
        buf = st.grad_buf
        for i, sc in enumerate(st.scales):
            if sc[1] is not None:
                self.t.sync(sc[1])
                sc[1] = None
            last = i == len(st.scales) - 1
            if last and buf.dtype != st.sub.dtype:  # multiply in the gradient's dtype, upcast, one pass
                st.grad32 = self._grad32(st)
                torch.mul(buf, sc[0], out=st.grad32)
                self.stats["host_scaled"] += 1
                return st.grad32
            buf.mul_(sc[0])  # same arithmetic as torch's in-place clip on the device
            self.stats["host_scaled"] += last
        if buf.dtype == st.sub.dtype:
            return buf
        return self._grad32(st).copy_(buf)  # bf16 grads, fp32 master: upcast into a buffer kept across steps

    @staticmethod
    def _grad32(st: _PState) -> torch.Tensor:
        if st.grad32 is None or st.grad32.shape != st.sub.shape:
            st.grad32 = torch.empty_like(st.sub)
        return st.grad32

    def _chunks(self, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        key = tuple(id(p) for p in params)
        if self._chunk_cache is not None and self._chunk_cache[0] == key:
            return self._chunk_cache[1]
        out, cur, size = [], [], 0
        for p in params:
            cur.append(p)
            size += p.numel() * p.element_size()
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
        self.t.sync(self.last_h2d)  # the previous step's copies out of the host buffers are done
        # backward produces the last parameters' gradients first: update those first
        todo = [p for p in reversed(self.params) if p.grad is not None]
        for p in todo:
            st = self.ps[id(p)]
            if p._version != st.p_ver:  # someone changed the weights (load_state_dict): refresh the copy
                st.sub.copy_(p.detach())
            g = p.grad
            if st.grad_buf is None or st.grad_ptr != g.data_ptr() or st.grad_ver != g._version:
                self._grad_ready(p)  # changed since its copy (unscaling, accumulation, clipping elsewhere)
                self.stats["recopied"] += 1
        self.t.h2d_fence()
        ev = None
        wait = upd = 0.0
        for chunk in self._chunks(todo):
            t0 = time.perf_counter()
            for p in chunk:
                self.t.sync(self.ps[id(p)].grad_ev)
            t1 = time.perf_counter()
            for p in chunk:
                st = self.ps[id(p)]
                st.sub.grad = self._host_grad(st)
                st.scales = []
            try:
                step_on(opt, self.subs, self.overrides, only=chunk)
            finally:
                for p in chunk:
                    self.ps[id(p)].sub.grad = None
            wait, upd = wait + t1 - t0, upd + time.perf_counter() - t1
            for p in chunk:
                st = self.ps[id(p)]
                src = st.sub
                if src.dtype != p.dtype:
                    if st.stage is None:
                        st.stage = self.t.host_like(p)
                    st.stage.copy_(src)
                    src = st.stage
                ev = self.t.h2d(p.detach(), src)
                st.p_ver = p._version
        self.t.join()
        self.last_h2d = ev
        self.stats["steps"] += 1
        self.stats["wait_s"] += wait
        self.stats["update_s"] += upd
        return loss

    def undo(self, restore_state: bool = True) -> None:
        """Put the optimizer back as it was; `restore_state=False` leaves its state on the host (the run is
        over: moving 8 bytes per parameter back to the GPU would only cost time, or memory it may not have)."""
        _LIVE.discard(self)
        self.undo_step()
        for h in self.handles:
            h.remove()
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


def _clip_patch(orig):
    """clip_grad_norm_ that also tells offloaded optimizers the coefficient it applied (see clip_end)."""

    @functools.wraps(orig)
    def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
        ps = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
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


def _unscale_patch(orig):
    """GradScaler's unscale changes gradients in place without bumping their version counters: tell the
    offloaded optimizer, whose host copies are now stale (copied down again at step time)."""

    @functools.wraps(orig)
    def _unscale_grads_(self, optimizer, *args, **kwargs):
        out = orig(self, optimizer, *args, **kwargs)
        for o in list(_LIVE):
            if o.opt is optimizer:
                o.mark_stale()
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
