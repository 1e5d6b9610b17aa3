"""The one owner of per-block saved-tensor hooks.

Autograd honours only the innermost `saved_tensors_hooks`, so two strategies that each wrapped a block in
their own hooks would silently lose one (compressed tensors that never reach the host). Instead each block
gets one wrapper and a pipeline of stages:

    pack:   tensor --codec.pack--> packed object --transport.pack--> host record
    unpack: host record --transport.unpack--> packed object --codec.unpack--> tensor

compress adds a codec stage (`add_codec`), offload a transport stage (`add_transport`); the order in which
they are applied does not matter, and each one's undo removes only its stage (the wrapper goes with the last).
A transport also hears about every other repeated block's forward (`trigger`), which is how offload starts
bringing a block back one block ahead of its backward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

import torch

from memtune.undo import Undo, wrap_forward

Codec = tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]  # (pack, unpack)


class Transport(Protocol):
    """What a transport stage does per forward call of one of its blocks (strategies/offload/activations.py)."""

    def begin(self, block: str) -> Any: ...  # a group for this call's saved tensors
    def pack(self, group: Any, obj: Any, original: torch.Tensor | None) -> Any: ...
    def unpack(self, record: Any) -> Any: ...
    def end(self, group: Any, output: Any) -> None: ...
    def trigger(self, output: Any) -> None: ...  # a block it does not move ran its forward


class SavedTensorPipeline:
    def __init__(self, module_of: Callable[[str], torch.nn.Module], repeated: list[str]):
        self.module_of = module_of  # block name -> its live module
        self.repeated = list(repeated)
        self.codecs: dict[str, Codec] = {}
        self.transport: Transport | None = None
        self.moved: set[str] = set()  # blocks whose saved tensors the transport moves
        self._undo_wrap: dict[str, Undo] = {}

    # --- stages -------------------------------------------------------------------------------------------
    def add_codec(self, blocks: list[str], codec: Codec) -> Undo:
        for b in blocks:
            self.codecs[b] = codec
            self._wrap(b)

        def undo() -> None:
            for b in blocks:
                self.codecs.pop(b, None)
                self._unwrap_if_idle(b)

        return undo

    def add_transport(self, blocks: list[str], transport: Transport) -> Undo:
        """`transport` moves the saved tensors of `blocks`; every repeated block triggers it."""
        self.transport = transport
        self.moved = set(blocks)
        touched = list(dict.fromkeys([*blocks, *self.repeated]))
        for b in touched:
            self._wrap(b)

        def undo() -> None:
            self.transport = None
            self.moved = set()
            for b in touched:
                self._unwrap_if_idle(b)

        return undo

    def stages(self, block: str) -> list[str]:
        """What the pipeline does to `block`'s saved tensors, in pack order (for notes and tests)."""
        out = []
        if block in self.codecs:
            out.append("codec")
        if self.transport is not None and block in self.moved:
            out.append("transport")
        return out

    # --- the one wrapper per block ----------------------------------------------------------------------
    def _wrap(self, block: str) -> None:
        if block not in self._undo_wrap:
            self._undo_wrap[block] = wrap_forward(self.module_of(block), functools.partial(self._wrapper, block))

    def _unwrap_if_idle(self, block: str) -> None:
        busy = block in self.codecs or (self.transport is not None and (block in self.moved
                                                                         or block in self.repeated))
        if not busy and block in self._undo_wrap:
            self._undo_wrap.pop(block)()

    def _wrapper(self, block: str, forward: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(forward)
        def run(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            codec = self.codecs.get(block)
            transport = self.transport if block in self.moved else None
            if codec is None and transport is None:
                out = forward(*args, **kwargs)
                if self.transport is not None:
                    self.transport.trigger(out)
                return out
            group = transport.begin(block) if transport is not None else None

            def pack(t: torch.Tensor) -> Any:
                obj = codec[0](t) if codec is not None else t
                if transport is None:
                    return obj
                return transport.pack(group, obj, t if codec is None else None)

            def unpack(x: Any) -> torch.Tensor:
                obj = transport.unpack(x) if transport is not None else x
                return codec[1](obj) if codec is not None else obj

            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                out = forward(*args, **kwargs)
            if transport is not None:
                transport.end(group, out)
            return out

        # saved-tensor hooks cannot be traced by torch.compile: inside a compiled model the block runs eagerly
        disable = getattr(getattr(torch, "_dynamo", None), "disable", None)
        return disable(run) if disable is not None else run
