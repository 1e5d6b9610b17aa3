"""Offload to host memory: the saved activations of chosen blocks, and the optimizer state (ZeRO-Offload style).

Plan section: `offload: {activations: [0, 1, "2-5"] | all, optimizer_state: true | false}`.

Activations: `saved_tensors_hooks` scoped to each chosen block's forward. Pack copies a saved tensor to a
pinned host buffer on a side stream (D2H overlaps the rest of the forward; the source is kept alive for
the copy with `record_stream`); the first unpack of a block in backward brings that block back and starts
copying the previous offloaded block (prefetch one block ahead) on another side stream; the compute stream
waits on events, so the result is right whatever the timing. Parameters and small tensors stay put. A block
that `compress` also handles is packed by compress's codec first, then offloaded (session_api.md).

Optimizer state: the state (and, with bf16 params, the fp32 master weights) lives on the host; gradients
are copied down as each one is ready (post-accumulate-grad hooks, overlapping the backward), the update runs
on the CPU chunk by chunk with the optimizer's own code (fused CPU kernels for Adam/AdamW/SGD/Adagrad), and
each chunk's parameters stream back while the CPU updates the next. Same optimizer object (LR schedulers,
GradScaler, clipping and accumulation work: a gradient changed after its copy, e.g. by unscaling, is copied
again at step time), same `state_dict()`. Global-norm clipping: the clipped gradients are copied down again
(measured faster than the alternative, CLIP_ON_HOST: `torch.nn.utils.clip_grad_norm_`, patched while an
optimizer is offloaded, clips the device gradients exactly as torch does and hands the coefficient to the
host, which multiplies its copy the same way inside the update). GradScaler's unscale changes gradients
without bumping their version counters, so it is patched to mark the host copies stale.

Needs a CUDA GPU; `simulate_host()` (tests) runs the same logic on CPU with plain clones as "host" copies.
"""

from __future__ import annotations

import contextlib
import functools
import time
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from memtune.errors import EnvironmentNotSupported, PlanError
from memtune.plan import check_bool, check_keys, shared_block_refs, validate_block_refs
from memtune.strategies.base import (
    ApplyContext,
    Strategy,
    Undo,
    patch_functions,
    register,
    run_closure,
    wrap_forward,
)
from memtune.strategies.checkpoint import hf_checkpointing_off

KEYS = {"activations": "blocks whose saved activations go to host memory (all, indices, 'a-b', paths)",
        "optimizer_state": "true: optimizer state on the host, update on the CPU"}
MIN_BYTES = 64 * 1024  # smaller saved tensors stay on the GPU: not worth a copy and an event
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

_simulated = 0


@contextlib.contextmanager
def simulate_host() -> Iterator[None]:
    """Test-only: allow offload without a GPU; "host" copies are plain clones on the same device."""
    global _simulated
    _simulated += 1
    try:
        yield
    finally:
        _simulated -= 1


# --- transports: how bytes move ------------------------------------------------------------------


class CloneTransport:
    """CPU stand-in used by tests: same bookkeeping, copies are clones, no streams."""

    cuda = False
    min_bytes = 0

    def host_like(self, t: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(t)

    def d2h(self, dst: torch.Tensor, src: torch.Tensor):
        dst.copy_(src)
        return None

    def h2d_new(self, host: torch.Tensor, device: torch.device, after=None):
        return host.clone(), None

    def h2d_fence(self) -> None:
        pass

    def h2d(self, dst: torch.Tensor, src: torch.Tensor):
        dst.copy_(src)
        return None

    def join(self) -> None:
        pass

    def fence_d2h(self) -> None:
        pass

    def scalar_to_host(self, t: torch.Tensor):
        return t.detach().to("cpu", copy=True), None

    def use(self, ev, t: torch.Tensor | None = None) -> None:
        pass

    def sync(self, ev) -> None:
        pass


class CudaTransport:
    """Pinned host buffers (the caching host allocator), one side stream per direction."""

    cuda = True
    min_bytes = MIN_BYTES

    def __init__(self, device: torch.device):
        self.device = device
        self.d2h_stream = torch.cuda.Stream(device)
        self.h2d_stream = torch.cuda.Stream(device)

    def host_like(self, t: torch.Tensor) -> torch.Tensor:
        # preserve_format keeps the strides of a dense tensor: backward sees the very same layout
        return torch.empty_like(t, device="cpu", pin_memory=True)

    def d2h(self, dst: torch.Tensor, src: torch.Tensor):
        s = self.d2h_stream
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(s)
        src.record_stream(s)  # the allocator must not reuse src's memory before the copy ran
        return ev

    def h2d_new(self, host: torch.Tensor, device: torch.device, after=None):
        s = self.h2d_stream
        with torch.cuda.stream(s):
            if after is not None:
                s.wait_event(after)
            dev = torch.empty_strided(host.size(), host.stride(), dtype=host.dtype, device=device)
            dev.copy_(host, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(s)
        return dev, ev

    def h2d_fence(self) -> None:
        # writes into live parameters start only after the compute stream's queued work (the backward)
        self.h2d_stream.wait_stream(torch.cuda.current_stream(self.device))

    def h2d(self, dst: torch.Tensor, src: torch.Tensor):
        s = self.h2d_stream
        with torch.cuda.stream(s):
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(s)
        return ev

    def join(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self.h2d_stream)

    def fence_d2h(self) -> None:
        # the compute stream may change what queued copies down still have to read (e.g. clipping in place)
        torch.cuda.current_stream(self.device).wait_stream(self.d2h_stream)

    def scalar_to_host(self, t: torch.Tensor):
        """A small device tensor to pinned host memory, queued on the compute stream (after what made it)."""
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        h.copy_(t.detach(), non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return h, ev

    def use(self, ev, t: torch.Tensor | None = None) -> None:
        """The compute stream waits for `ev`; `t` (made on a side stream) is now used on the compute stream."""
        cur = torch.cuda.current_stream(self.device)
        if ev is not None:
            cur.wait_event(ev)
        if t is not None:
            t.record_stream(cur)

    def sync(self, ev) -> None:
        if ev is not None:
            ev.synchronize()


def make_transport(device: torch.device):
    if device.type == "cuda":
        return CudaTransport(device)
    if _simulated:
        return CloneTransport()
    raise EnvironmentNotSupported(_NO_GPU)


_NO_GPU = ("offload needs a CUDA GPU (it moves tensors to pinned host memory); this run has none: remove the "
           "`offload` section from the plan, or run on a machine with a GPU")


# --- activation offload ------------------------------------------------------------------------------


class _Kept:
    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj


class _Group:
    """The saved tensors of one forward call of one offloaded block."""

    __slots__ = ("__weakref__", "block", "fetched", "recs", "seq", "started")

    def __init__(self, block: str, seq: int):
        self.block, self.seq = block, seq
        self.recs: list[weakref.ref] = []
        self.started = False
        self.fetched = False


class _Rec:
    __slots__ = ("__weakref__", "dev", "group", "h2d_ev", "leaves", "spec", "uses")

    def __init__(self, group: _Group, leaves: list, spec):
        self.group, self.leaves, self.spec = group, leaves, spec  # leaves: (host, d2h event) or ("keep", x)
        self.dev: list | None = None
        self.h2d_ev = None
        self.uses = 1


class ActivationOffloader:
    def __init__(self, transport, device: torch.device, param_storages: set[int],
                 codecs: dict[str, tuple] | None = None):
        self.t = transport
        self.device = device
        self.param_storages = param_storages
        self.codecs = codecs or {}
        self.groups: list[weakref.ref] = []
        self.seq = 0
        self.bytes_offloaded = 0  # cumulative, for reports

    # forward ---------------------------------------------------------------------------------------
    def wrap(self, block: str, forward):
        codec = self.codecs.get(block)

        @functools.wraps(forward)
        def wrapper(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            self.seq += 1
            g = _Group(block, self.seq)
            self.groups = [r for r in self.groups if (x := r()) is not None and not x.started]
            self.groups.append(weakref.ref(g))
            seen: dict[tuple, _Rec] = {}
            with torch.autograd.graph.saved_tensors_hooks(functools.partial(self.pack, g, codec, seen),
                                                          functools.partial(self.unpack, codec)):
                out = forward(*args, **kwargs)
            self._on_backward_start(out, g.seq)
            return out

        return wrapper

    def wrap_trigger(self, forward):
        """For blocks not offloaded: their backward start brings back the offloaded block before them."""

        @functools.wraps(forward)
        def wrapper(*args, **kwargs):
            out = forward(*args, **kwargs)
            if torch.is_grad_enabled():
                self.seq += 1
                self._on_backward_start(out, self.seq)
            return out

        return wrapper

    def _on_backward_start(self, out: Any, seq: int) -> None:
        # the gradient of a block's output arrives just before its backward runs: start copying back the
        # newest offloaded block that ran before it (one block ahead)
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor) and x.requires_grad:
                x.register_hook(functools.partial(self._prefetch_hook, seq))
                break

    def _prefetch_hook(self, seq: int, grad: torch.Tensor) -> None:
        self.prefetch_before(seq)

    def prefetch_before(self, seq: int) -> None:
        for r in reversed(self.groups):
            h = r()
            if h is not None and h.seq < seq and not h.started:
                self._fetch_group(h)
                return

    def _offloadable(self, x: Any) -> bool:
        if not isinstance(x, torch.Tensor) or isinstance(x, torch.nn.Parameter):
            return False
        if self.t.cuda and not x.is_cuda:
            return False
        if x.numel() * x.element_size() < self.t.min_bytes:
            return False
        try:
            return x.untyped_storage().data_ptr() not in self.param_storages
        except RuntimeError:  # tensor subclasses without a storage
            return False

    def pack(self, group: _Group, codec, seen: dict, t: torch.Tensor):
        obj = codec[0](t) if codec else t
        leaves, spec = tree_flatten(obj)
        if not any(self._offloadable(x) for x in leaves):
            return _Kept(obj)
        # the same tensor saved twice in one block (e.g. an input used by two ops) goes down once; keyed by
        # identity with a weakref check, as a freed tensor's address can be reused by the next one
        key = None
        if codec is None:
            key = (id(t), t._version)
            hit = seen.get(key)
            if hit is not None and hit[0]() is t:
                hit[1].uses += 1
                return hit[1]
        out = []
        for x in leaves:
            if self._offloadable(x):
                host = self.t.host_like(x)
                out.append((host, self.t.d2h(host, x)))
                self.bytes_offloaded += x.numel() * x.element_size()
            else:
                out.append(("keep", x))
        rec = _Rec(group, out, spec)
        group.recs.append(weakref.ref(rec))
        if key is not None:
            seen[key] = (weakref.ref(t), rec)
        return rec

    # backward --------------------------------------------------------------------------------------
    def _fetch(self, rec: _Rec) -> None:
        if rec.dev is not None:
            return
        dev, last = [], None
        for host, ev in rec.leaves:
            if isinstance(host, str):
                dev.append(ev)
            else:
                d, last = self.t.h2d_new(host, self.device, after=ev)
                dev.append(d)
        rec.dev, rec.h2d_ev = dev, last

    def _fetch_group(self, g: _Group) -> None:
        if g.fetched:
            return
        g.fetched = True
        for r in g.recs:
            rec = r()
            if rec is not None:
                self._fetch(rec)

    def unpack(self, codec, x):
        if isinstance(x, _Kept):
            obj = x.obj
        else:
            g = x.group
            if not g.started:
                g.started = True
                self._fetch_group(g)
                self.prefetch_before(g.seq)  # no-op when the output hook already did it
            self._fetch(x)
            dev = x.dev
            self.t.use(x.h2d_ev)
            for (host, _), d in zip(x.leaves, dev, strict=True):
                if not isinstance(host, str):
                    self.t.use(None, d)
            x.uses -= 1
            if x.uses <= 0:  # a second backward (retain_graph) fetches from the host copy again
                x.dev = None
            obj = tree_unflatten(dev, x.spec)
        return codec[1](obj) if codec else obj


# --- optimizer-state offload ------------------------------------------------------------------------


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
        from memtune.patcher import check_elementwise, wrap_step

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
        self.overrides: dict[str, Any] = {}
        if self.t.cuda and type(opt).__name__ in _FUSED_CPU and type(opt).__module__.startswith("torch.optim") \
                and all("fused" in g and not g.get("differentiable") for g in opt.param_groups):
            self.overrides = {"fused": True, "foreach": False}
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
        from memtune.patcher import step_on

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


# --- the strategy -----------------------------------------------------------------------------------


@register
class Offload(Strategy):
    name = "offload"
    order = 70
    summary = "saved activations and/or optimizer state in pinned host memory, overlapped with compute"

    def validate(self, section: Any) -> dict[str, Any]:
        if not isinstance(section, dict):
            raise PlanError("offload: write it as {activations: [blocks], optimizer_state: true|false}")
        check_keys(section, KEYS, "offload")
        acts = section.get("activations", [])
        acts = validate_block_refs(acts, "offload.activations") if acts not in (None, [], False) else []
        opt = section.get("optimizer_state", False)
        check_bool(opt, "offload.optimizer_state")
        if not acts and not opt:
            raise PlanError("offload: nothing to offload; give `activations` blocks and/or `optimizer_state: true`")
        return {"activations": acts, "optimizer_state": opt}

    def describe(self, section: dict[str, Any]) -> str:
        parts = []
        if section["activations"]:
            parts.append(f"activations of blocks {section['activations']}")
        if section["optimizer_state"]:
            parts.append("optimizer state (CPU update)")
        return "offload " + " and ".join(parts)

    def conflicts(self, plan: Any, section: dict[str, Any]) -> list[str]:
        out = []
        oname = (plan.get("optimizer") or {}).get("name")
        if section["optimizer_state"] and oname not in (None, "adamw", "adafactor", "inbackward"):
            # (inbackward: the optimizer section reports that one itself)
            out.append(f"offload.optimizer_state runs the update on the CPU; optimizer {oname!r} keeps its state "
                       "in device kernels: drop one of the two, or use optimizer adamw/adafactor")
        ck = plan.get("checkpoint")
        if not ck or not section["activations"]:
            return out
        both = shared_block_refs(section["activations"], ck["blocks"])
        if both:
            out.append(f"block(s) {sorted(both, key=str)} are both recomputed (checkpoint) and offloaded "
                       "(offload.activations): choose one per block")
        return out

    def preflight(self, section: dict[str, Any], device: torch.device | None) -> None:
        if _simulated:
            return
        if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
            raise EnvironmentNotSupported(_NO_GPU)

    def space(self, trial: Any, profile: Any, opts: Any) -> dict[str, Any] | None:
        if opts.device != "cuda":
            return None
        # Compact: the first j repeated blocks (checkpoint takes the last k). Early blocks have the rest of
        # the forward to hide their copies down and come back last in backward; on an H100 (1.1B Llama,
        # docs/strategies.md) the first 5 of 22 hid 94% of their transfer time, every 3rd block only 78%
        # (later blocks' copies down are still queued when backward needs them back).
        n = len(profile.repeated_blocks)
        free = n - trial.params.get("checkpoint.k", 0)
        j = trial.suggest_int("offload.k", 0, max(0, free - 1))
        acts = [f"0-{j - 1}"] if j else []
        opt_state = trial.suggest_categorical("offload.optimizer_state", [False, True])
        if not acts and not opt_state:
            return None
        return {"activations": acts, "optimizer_state": opt_state}

    def effect(self, profile: Any, section: dict[str, Any], sim: Any) -> None:
        if section["activations"]:
            names = profile.resolve_blocks(section["activations"], "offload.activations")
            for b in sim.blocks:
                if b.name not in names:
                    continue
                moved = b.kept  # compressed size when compress ran first
                b.mode = "compress+offload" if b.mode == "compress" else "offload"
                b.d2h_bytes = b.h2d_bytes = moved
                b.kept_bytes = 0
                b.bwd_extra_bytes = max(b.bwd_extra_bytes, moved)
        if section["optimizer_state"]:
            n_params = sum(o.n_params for o in profile.optimizers) or profile.trainable_param_bytes / 4
            sim.opt_state_host_bytes += sim.opt_state_bytes + sim.master_bytes
            sim.opt_state_bytes = 0.0
            sim.master_bytes = 0.0
            sim.opt_transient_bytes = 0.0
            sim.opt_d2h_bytes = sim.grad_bytes
            sim.opt_h2d_bytes = sim.param_bytes
            cpu_s = n_params * 28 / (HOST_UPDATE_GBPS * 1e9)
            h2d_s = sim.param_bytes / (sim.h2d_gbps * 1e9) if sim.h2d_gbps else 0.0
            d2h_s = sim.grad_bytes / (sim.d2h_gbps * 1e9) if sim.d2h_gbps else 0.0
            sim.opt_s = max(cpu_s, h2d_s)  # pipelined per chunk: the slower of CPU update and copy-back
            sim.opt_overlap_s = d2h_s  # gradients go down during the backward
            sim.notes.append(f"optimizer offload: CPU update assumed at {HOST_UPDATE_GBPS:g} GB/s of state "
                             "traffic (28 B/param for AdamW)")

    def install(self, section: dict[str, Any], session: Any) -> Undo:
        if section["optimizer_state"]:
            return install_clip_patch()  # before the script binds `from torch.nn.utils import clip_grad_norm_`
        return lambda: None

    def apply(self, ctx: ApplyContext, section: dict[str, Any]) -> Undo:
        self.preflight(section, ctx.device)
        transport = make_transport(ctx.device)
        undos: list[Undo] = []

        def undo() -> None:
            for u in reversed(undos):
                u()

        try:
            self._apply(ctx, section, transport, undos)
        except BaseException:
            undo()
            raise
        return undo

    def _apply(self, ctx: ApplyContext, section: dict[str, Any], transport, undos: list[Undo]) -> None:
        if section["activations"]:
            names = ctx.resolve(section["activations"], "offload.activations")
            ck = ctx.shared.get("checkpointed_blocks", set())
            if set(names) & ck:
                raise PlanError(f"offload.activations: blocks {sorted(set(names) & ck)} are checkpointed: "
                                "a block is either recomputed or offloaded")
            storages = {p.untyped_storage().data_ptr() for p in ctx.model.parameters()}
            storages |= {b.untyped_storage().data_ptr() for b in ctx.model.buffers()}
            codecs = ctx.shared.get("saved_tensor_codecs", {})
            off = ActivationOffloader(transport, ctx.device, storages, codecs)
            hf = 0
            for name in names:
                mod = ctx.module(name)
                u = hf_checkpointing_off(mod)
                if u is not None:
                    undos.append(u)
                    hf += 1
                undos.append(wrap_forward(mod, functools.partial(off.wrap, name)))
            for name in ctx.repeated:
                if name not in names:
                    undos.append(wrap_forward(ctx.module(name), off.wrap_trigger))
            ctx.shared["activation_offloader"] = off
            withc = [n for n in names if n in codecs]
            ctx.note(self.name, f"activations of {len(names)} block(s) to pinned host memory, prefetched one "
                                f"block ahead in backward" + (f"; {len(withc)} compressed first" if withc else ""))
            if hf:
                ctx.note(self.name, f"transformers' gradient checkpointing switched off on the {hf} offloaded "
                                    "block(s) (a block is recomputed or offloaded, not both)")
        if section["optimizer_state"]:
            masters = ctx.shared.get("master_params")
            undos.append(install_clip_patch())  # no-op when `install` already patched it
            for opt in ctx.optimizers:
                o = OptimizerOffload(opt, transport, masters)
                undos.append(lambda o=o: o.undo(restore_state=not ctx.shared.get("run_over", False)))
                ctx.shared.setdefault("optimizer_offloads", []).append(o)
                n = sum(p.numel() for p in o.params)
                how = "fused CPU kernel" if o.overrides else f"{type(opt).__name__}'s own CPU code"
                ctx.note(self.name, f"{type(opt).__name__} state of {n / 1e6:.1f}M params on the host, update on "
                                    f"the CPU ({how})" + ("; fp32 master weights on the host" if masters else "")
                                    + ("; clip_grad_norm_'s coefficient applied to the host copy"
                                       if o.clip_on_host else ""))
