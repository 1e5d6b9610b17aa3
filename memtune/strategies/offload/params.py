"""Parameters streamed from the host block by block (`offload: {params: [blocks], gradients: true,
optimizer_state: true}`): for models whose weights alone do not fit the budget.

Each streamed block's parameters live in pinned host memory (the host copy the offloaded optimizer writes
its updated, rounded weights into); on the device a parameter's `.data` is an empty placeholder except while
its block runs. The Parameter objects stay (the optimizer, autograd and `state_dict` keys see the same ones).

- Forward: the block's forward pre-hook makes sure its weights are there (waiting on their copy's event) and
  starts copying the next `prefetch` blocks' weights on the H2D side stream; its forward hook drops them.
  The last `prefetch + 1` blocks keep theirs: backward needs them first.
- Backward: when the gradient of a block's output arrives (its backward, and its recomputation, are about to
  run), its weights are fetched if they are not there and the `prefetch` blocks before it start coming; once
  every parameter of the block has its gradient (post-accumulate-grad hooks, after the gradient went to the
  host), its weights are dropped; whatever is still there at the end of the backward is dropped then.
- Only recomputed blocks (checkpoint full or selective) are streamed: a block that keeps its activations
  saves views of its weights for backward (`F.linear` saves `weight.t()`), which would keep them on the
  device from forward to backward anyway.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
from torch.utils._pytree import tree_flatten


def in_backward() -> bool:
    """True inside a backward pass (a checkpoint recomputing a block calls its forward hooks there)."""
    return torch._C._current_graph_task_id() != -1


class _Block:
    __slots__ = ("devs", "ev", "index", "left", "name", "params", "resident")

    def __init__(self, index: int, name: str, params: list[torch.nn.Parameter]):
        self.index, self.name, self.params = index, name, params
        self.devs: list[torch.Tensor] | None = None  # device copies in flight or in place
        self.ev = None
        self.resident = False  # p.data points at devs
        self.left = 0  # parameters of this block still waiting for their gradient in this backward


class ParamStreamer:
    """Streams the parameters of `blocks` ([(name, module)] in forward order); see the module docstring."""

    def __init__(self, blocks: list[tuple[str, torch.nn.Module]], transport, device: torch.device,
                 prefetch: int = 1, gate: Any = None):
        self.t = transport
        # gate(block name, wait) -> whether the host copy of its weights is updated (waiting for it if `wait`)
        self.gate = gate
        self.device = device
        self.prefetch = max(0, int(prefetch))
        self.store: dict[int, torch.Tensor] = {}  # id(param) -> its pinned host copy
        seen: dict[int, int] = {}
        for _, m in blocks:
            for p in m.parameters():
                seen[id(p)] = seen.get(id(p), 0) + 1
        self.blocks: list[_Block] = []
        self._of: dict[int, _Block] = {}
        self._placeholders: dict[torch.dtype, torch.Tensor] = {}
        self.stats = {"fetched_bytes": 0, "fetches": 0, "waited_fetches": 0}
        with torch.no_grad():
            for i, (name, m) in enumerate(blocks):
                ps = [p for p in m.parameters() if seen[id(p)] == 1]  # a weight shared by two blocks stays put
                b = _Block(i, name, ps)
                self.blocks.append(b)
                for p in ps:
                    h = self.t.host_buffer(p.shape, p.dtype)
                    h.copy_(p.detach())
                    self.store[id(p)] = h
                    self._of[id(p)] = b
                    p.data = self._placeholder(p.dtype)
        self.bytes = sum(h.numel() * h.element_size() for h in self.store.values())
        self._callback_task: int | None = None
        me = weakref.ref(self)
        self.handles = []
        for b, (_, m) in zip(self.blocks, blocks, strict=True):
            self.handles.append(m.register_forward_pre_hook(functools.partial(_pre, me, b.index)))
            self.handles.append(m.register_forward_hook(functools.partial(_post, me, b.index)))
            for p in b.params:
                if p.requires_grad:
                    self.handles.append(p.register_post_accumulate_grad_hook(functools.partial(_grad, me)))

    def _placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._placeholders:
            self._placeholders[dtype] = torch.empty(0, dtype=dtype, device=self.device)
        return self._placeholders[dtype]

    # moving weights ------------------------------------------------------------------------------------------
    def fetch(self, b: _Block, wait: bool = True) -> None:
        """Start copying b's weights to the device (no-op when they are there or coming); `wait=False`
        (a prefetch) leaves a block whose host copy is still being updated for its own turn."""
        if b.devs is not None:
            return
        if self.gate is not None and not self.gate(b.name, wait):
            return
        devs, last = [], None
        for p in b.params:
            d, last = self.t.h2d_new(self.store[id(p)], self.device)
            devs.append(d)
        b.devs, b.ev = devs, last
        self.stats["fetched_bytes"] += sum(d.numel() * d.element_size() for d in devs)
        self.stats["fetches"] += 1

    def ensure(self, b: _Block) -> None:
        """b's weights are in place for the compute stream."""
        if b.resident:
            return
        if b.devs is None:
            self.stats["waited_fetches"] += 1
            self.fetch(b)
        self.t.use(b.ev)
        for p, d in zip(b.params, b.devs, strict=True):
            self.t.use(None, d)  # made on the side stream, used on the compute stream
            p.data = d
        b.resident = True
        b.left = sum(1 for p in b.params if p.requires_grad)

    def release(self, b: _Block) -> None:
        if b.devs is None:
            return
        for p in b.params:
            p.data = self._placeholder(p.dtype)
        b.devs, b.ev, b.resident = None, None, False

    def release_all(self) -> None:
        for b in self.blocks:
            self.release(b)

    def _ahead(self, i: int, step: int) -> None:
        for k in range(1, self.prefetch + 1):
            j = i + step * k
            if 0 <= j < len(self.blocks):
                self.fetch(self.blocks[j], wait=False)

    # hooks ---------------------------------------------------------------------------------------------------
    def before_forward(self, i: int) -> None:
        b = self.blocks[i]
        self.ensure(b)
        if not in_backward():
            self._ahead(i, +1)

    def after_forward(self, i: int, out: Any) -> None:
        if in_backward():  # a recomputation inside backward: its backward needs the weights next
            return
        if torch.is_grad_enabled():
            for x in tree_flatten(out)[0]:
                if isinstance(x, torch.Tensor) and x.requires_grad:
                    x.register_hook(functools.partial(_backward_start, weakref.ref(self), i))
                    break
        if i < len(self.blocks) - 1 - self.prefetch or not torch.is_grad_enabled():
            self.release(self.blocks[i])  # the last ones stay: the backward starts with them

    def before_backward(self, i: int) -> None:
        self.ensure(self.blocks[i])
        self._ahead(i, -1)
        task = torch._C._current_graph_task_id()
        if task != self._callback_task:  # once per backward: drop what is left at its end
            self._callback_task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_end)

    def _backward_end(self) -> None:
        self._callback_task = None
        self.release_all()

    def grad_done(self, p: torch.Tensor) -> None:
        b = self._of.get(id(p))
        if b is None or not b.resident:
            return
        b.left -= 1
        if b.left <= 0:
            self.release(b)

    def remove(self) -> None:
        """Put every weight back on the device (undo) and stop streaming."""
        for h in self.handles:
            h.remove()
        with torch.no_grad():
            for b in self.blocks:
                for p in b.params:
                    p.data = self.store[id(p)].to(self.device)
                b.devs, b.ev, b.resident = None, None, False


def _pre(ref, i, module, args):
    s = ref()
    if s is not None:
        s.before_forward(i)


def _post(ref, i, module, args, out):
    s = ref()
    if s is not None:
        s.after_forward(i, out)


def _grad(ref, p):
    s = ref()
    if s is not None:
        s.grad_done(p)


def _backward_start(ref, i, grad):
    s = ref()
    if s is not None:
        s.before_backward(i)
