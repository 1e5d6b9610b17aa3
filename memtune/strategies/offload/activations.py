"""Activation offload: the saved tensors of chosen blocks go to pinned host memory during forward and come
back one block ahead of their backward.

This is the transport stage of the saved-tensor pipeline (strategies/saved_tensors.py): the pipeline calls
`begin` at each forward of an offloaded block, `pack` for each saved object (a tensor, or a compressed
`Packed` whose leaves are moved) and `end` after the forward; every other repeated block's forward calls
`trigger`. Pack copies each large leaf to a pinned buffer on the D2H side stream (the source kept alive for
the copy with `record_stream`); the gradient of a block's output arriving (its backward about to run)
starts copying back the block that ran just before it, if that one is offloaded, on the H2D side stream; the
first unpack of a block not yet fetched fetches it. Parameters and small tensors stay where they are.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten


def _dense(t: torch.Tensor) -> bool:
    """True when `t` covers its memory without gaps or overlaps in some order of its dimensions."""
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return True
    expect = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape, strict=True) if n != 1):
        if stride != expect:
            return False
        expect *= size
    return True


class _Kept:
    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj


class _Group:
    """The saved tensors of one forward call of one offloaded block."""

    __slots__ = ("__weakref__", "block", "fetched", "recs", "seen", "seq", "started")

    def __init__(self, block: str, seq: int):
        self.block, self.seq = block, seq
        self.recs: list[weakref.ref] = []
        self.seen: dict[tuple, tuple] = {}  # (id, version) of a saved tensor -> (weakrefs to it and its record)
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
    """The transport stage of offloaded blocks (see the module docstring)."""

    def __init__(self, transport, device: torch.device, param_storages: set[int]):
        self.t = transport
        self.device = device
        self.param_storages = param_storages
        self.groups: list[weakref.ref] = []
        self.seq = 0
        self.bytes_offloaded = 0  # cumulative, for reports

    # forward (called by the saved-tensor pipeline) -----------------------------------------------------
    def begin(self, block: str) -> _Group:
        self.seq += 1
        g = _Group(block, self.seq)
        self.groups = [r for r in self.groups if (x := r()) is not None and not x.started]
        self.groups.append(weakref.ref(g))
        return g

    def end(self, group: _Group, out: Any) -> None:
        group.seen = {}  # only a forward call dedupes; its records must not keep each other alive after it
        self._on_backward_start(out, group.seq)

    def trigger(self, out: Any) -> None:
        """A block that is not offloaded ran: its backward start brings back the offloaded block before it."""
        self.seq += 1
        self._on_backward_start(out, self.seq)

    def _on_backward_start(self, out: Any, seq: int) -> None:
        # the gradient of a block's output arrives just before its backward runs: start copying back the
        # block that ran right before it, if offloaded (one block ahead)
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor) and x.requires_grad:
                x.register_hook(functools.partial(self._prefetch_hook, seq))
                break

    def _prefetch_hook(self, seq: int, grad: torch.Tensor) -> None:
        self.prefetch_before(seq)

    def prefetch_before(self, seq: int) -> None:
        # only the block that ran right before this one: fetching the newest offloaded block instead brought
        # it back at the very start of backward, beside every kept block's activations (ViT and ResNet-50
        # offloading their first half: +1.4 and +0.7 GiB at the peak, H200 zoo, 2026-12-02)
        for r in reversed(self.groups):
            h = r()
            if h is not None and h.seq < seq:
                if h.seq == seq - 1 and not h.started:
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

    def pack(self, group: _Group, obj: Any, original: torch.Tensor | None = None):
        """`obj` is what the codec stage made of a saved tensor (the tensor itself without one); `original`
        is the tensor when there is no codec, so a tensor saved twice in one block goes down once."""
        leaves, spec = tree_flatten(obj)
        if not any(self._offloadable(x) for x in leaves):
            return _Kept(obj)
        # the same tensor saved twice in one block (e.g. an input used by two ops) goes down once; keyed by
        # identity with a weakref check, as a freed tensor's address can be reused by the next one
        key = None
        t = original
        if t is not None:
            key = (id(t), t._version)
            hit = group.seen.get(key)
            if hit is not None and hit[0]() is t and (prev := hit[1]()) is not None:
                prev.uses += 1
                return prev
        out = []
        for x in leaves:
            if self._offloadable(x):
                if not _dense(x):
                    # a strided view (q, k, v unbound from one qkv output): copy_ would stage it through a
                    # pageable buffer, synchronously, and permute it on the host; a dense copy on the device
                    # goes down as one async memcpy
                    x = x.contiguous()
                host = self.t.host_like(x)
                out.append((host, self.t.d2h(host, x)))
                self.bytes_offloaded += x.numel() * x.element_size()
            else:
                out.append(("keep", x))
        rec = _Rec(group, out, spec)
        group.recs.append(weakref.ref(rec))
        if key is not None:
            # weak both ways: a record points at its group, so a strong one here would be a cycle that keeps
            # the group's pinned buffers until the GC runs (a caller that never calls `end`: the profiler's probe)
            group.seen[key] = (weakref.ref(t), weakref.ref(rec))
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

    def unpack(self, x):
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
        return obj
