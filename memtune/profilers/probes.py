"""What-if probes: one block of each repeated class re-run after the measured steps, on a host copy of the
inputs it had in the memory step, in a configuration the profile cannot otherwise show (its weights in
bf16, ...). Each probe measures on the user's own blocks what the cost model would otherwise guess."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from memtune.profilers import memory as mem


@dataclass
class HostTensor:
    """A block input kept on the host for the probe, with what it was on the device."""

    t: torch.Tensor
    requires_grad: bool


def to_host(t: torch.Tensor) -> HostTensor:
    return HostTensor(t.detach().to("cpu", copy=True), t.requires_grad)


def map_tensors(obj: Any, fn: Callable[[Any], Any], depth: int = 0) -> Any:
    """`obj` with every tensor (or HostTensor) replaced by fn(it); tuples, lists and dicts rebuilt, anything
    else (None, flags, cache objects) kept as it is."""
    if isinstance(obj, (torch.Tensor, HostTensor)):
        return fn(obj)
    if depth > 6:
        return obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(map_tensors(x, fn, depth + 1) for x in obj)
    if isinstance(obj, list):
        return [map_tensors(x, fn, depth + 1) for x in obj]
    if isinstance(obj, dict) and type(obj) is dict:
        return {k: map_tensors(v, fn, depth + 1) for k, v in obj.items()}
    return obj


def probe_worthy(module: nn.Module) -> bool:
    """fp32 weights to cast, all of them plain tensors (a DTensor/FSDP block is left alone)."""
    ps = list(module.parameters())
    return any(p.dtype == torch.float32 for p in ps) and all(type(p.data) is torch.Tensor for p in ps)


def saved_bytes_bf16_params(model: nn.Module, module: nn.Module, inputs: Any, device: torch.device,
                             autocast: str | None) -> int:
    """Bytes `module` saves for backward when its fp32 parameters are bf16 (precision `params: bf16`) and so
    are its floating inputs (the residual stream that bf16 weights upstream produce), counted like the memory
    step counts them (unique storages, parameters and buffers excluded)."""
    import contextlib

    bf16 = torch.bfloat16
    params = {n: (p.detach().to(bf16).requires_grad_(p.requires_grad) if p.dtype == torch.float32 else p)
              for n, p in module.named_parameters()}

    def to_device(h: HostTensor) -> torch.Tensor:
        t = h.t.to(device, dtype=bf16 if h.t.dtype == torch.float32 else h.t.dtype)
        return t.requires_grad_(True) if h.requires_grad and t.is_floating_point() else t

    args, kwargs = map_tensors(inputs, to_device)
    exclude = mem.state_ptrs(model) | {k[0] for p in params.values() if (k := mem.storage_key(p)) is not None}
    counter = mem.SavedTensorCounter(lambda: "probe", exclude)
    counter.active = True
    amp = (torch.autocast(device.type, dtype=getattr(torch, autocast)) if autocast and hasattr(torch, autocast)
           else contextlib.nullcontext())
    try:
        with torch.enable_grad(), amp, counter.hooks():
            out = torch.func.functional_call(module, params, args, kwargs)
        del out
        return counter.bytes.get("probe", 0)
    finally:
        del args, kwargs, params
