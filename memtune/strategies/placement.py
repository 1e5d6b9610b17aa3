"""Placement: the script's own `model.to("cuda")` / `model.cuda()` waits for the plan (plan section
`placement: {defer: true, min_mib: 64}`).

A 7B model's fp32 weights (27 GB) moved to the device as the script writes it would set the run's peak before
the plan could shrink them (bf16 matmul weights, masters and optimizer state on the host, streamed blocks),
and the whole run's `max_memory_allocated` counts model construction too. So `install` (before the script
starts) patches `nn.Module.to` and `nn.Module.cuda`: until the plan is applied, a move to an accelerator of a
module holding at least `min_mib` MiB of floating parameters, all on the host, is recorded instead of done
(a dtype in the same call is applied on the host); the call returns the module, as `.to` does. The patcher
then applies the plan for the recorded device (`target_device`): precision casts on the host and keeps the
script's fp32 tensors as the host masters (no copy), offload builds its host copies and pins the streamed
weights from there, and this strategy's `apply` (last, order 80) moves what is left (16-bit weights, fp32
embeddings and norms, buffers) to the device: each tensor where the plan says, once.

Guards: a deferred module that runs forward before the plan is applied (the script used it before building
its optimizer) is moved then, as written; modules below `min_mib` (a loss module, a small head) move at once;
moves after the plan was applied are not touched; everything is undone when the script ends. What it cannot
see: a script that reads `next(model.parameters()).device` between its `.to("cuda")` and its optimizer
gets "cpu"; a model built directly on the device (`with torch.device("cuda"):`) is already there.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from memtune.errors import PlanError
from memtune.plan import SectionConfig, check_bool, check_keys
from memtune.strategies.base import ApplyContext, PlanFacts, Strategy, register
from memtune.undo import Undo, noop

KEYS = {"defer": "true: the script's model.to(<device>) waits until the plan places each tensor",
        "min_mib": "modules with fewer MiB of floating parameters move at once (default 64)"}


@dataclass(frozen=True)
class PlacementConfig(SectionConfig):
    defer: bool = True
    min_mib: int = 64

    def describe(self) -> str:
        return "model placed by the plan (the script's .to(device) deferred)" if self.defer else "as the script"


@dataclass
class _Deferred:
    device: torch.device
    non_blocking: bool


# deferred roots -> where the script asked them to go; submodules of a deferred root -> the root
_PENDING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MEMBER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ORIG: dict[str, Any] = {}  # the unpatched nn.Module.to / .cuda while installed


def _resolve(device: torch.device) -> torch.device:
    """The device a deferred move finally goes to (tests map an accelerator they lack onto the CPU)."""
    return device


def _root(module: nn.Module) -> nn.Module | None:
    if module in _PENDING:
        return module
    ref = _MEMBER.get(module)
    root = ref() if ref is not None else None
    return root if root is not None and root in _PENDING else None


def _host_bytes(module: nn.Module) -> int | None:
    """Floating parameter bytes of a module whose parameters are all on the host, else None."""
    n = 0
    for p in module.parameters():
        if p.device.type != "cpu":
            return None
        if p.is_floating_point():
            n += p.numel() * p.element_size()
    return n


def _move(module: nn.Module, device: torch.device, non_blocking: bool = False) -> None:
    """The deferred move itself (the unpatched nn.Module.to)."""
    to = _ORIG.get("to", nn.Module.to)
    with torch.no_grad():
        to(module, _resolve(device), non_blocking=non_blocking)


def _materialize(root: nn.Module) -> None:
    d = _PENDING.pop(root, None)
    if d is not None:
        _move(root, d.device, d.non_blocking)


def deferred_root(model: nn.Module) -> nn.Module | None:
    """The deferred module that holds `model`, or that `model` holds: a wrapper built around the model after
    its deferred move (peft's get_peft_model) holds it, and its adapters live inside it."""
    root = _root(model)
    if root is None:
        for r in list(_PENDING.keys()):
            if any(m is model for m in r.modules()) or any(m is r for m in model.modules()):
                return r
    return root


def target_device_of(model: nn.Module) -> torch.device | None:
    """Where the script asked a deferred model (or the deferred module holding it or held by it) to go."""
    root = deferred_root(model)
    return _resolve(_PENDING[root].device) if root is not None else None


def install_placement(config: PlacementConfig, session: Any) -> Undo:
    if "to" in _ORIG:  # installed already (one plan, one session)
        return noop
    orig_to, orig_cuda = nn.Module.to, nn.Module.cuda
    _ORIG.update(to=orig_to, cuda=orig_cuda)
    min_bytes = int(config.min_mib) * 2**20

    def deferred(module: nn.Module, device: torch.device | None, dtype: torch.dtype | None, non_blocking: bool) -> bool:
        if getattr(session, "ready", False) or device is None or device.type in ("cpu", "meta"):
            return False
        root = _root(module)
        if root is None:
            n = _host_bytes(module)
            if n is None or n < min_bytes:
                return False
            _PENDING[module] = _Deferred(torch.device(device), bool(non_blocking))
            for sub in module.modules():
                if sub is not module:
                    _MEMBER[sub] = weakref.ref(module)
        if dtype is not None:
            orig_to(module, dtype=dtype)  # the dtype part of the call, on the host
        return True

    def to(self, *args, **kwargs):
        try:
            device, dtype, non_blocking, fmt = torch._C._nn._parse_to(*args, **kwargs)
        except (TypeError, RuntimeError):
            return orig_to(self, *args, **kwargs)
        if fmt is None and deferred(self, device, dtype, non_blocking):
            return self
        return orig_to(self, *args, **kwargs)

    def cuda(self, device=None):
        d = torch.device("cuda") if device is None else torch.device("cuda", device) if isinstance(device, int) \
            else torch.device(device)
        if deferred(self, d, None, False):
            return self
        return orig_cuda(self, device)

    to.__wrapped__ = orig_to  # type: ignore[attr-defined]
    cuda.__wrapped__ = orig_cuda  # type: ignore[attr-defined]

    def before_forward(module, args):
        root = _root(module) if _PENDING else None
        if root is not None:  # used before the plan could place it: move it as the script asked
            _materialize(root)

    nn.Module.to = to  # type: ignore[method-assign]
    nn.Module.cuda = cuda  # type: ignore[method-assign]
    hook = nn.modules.module.register_module_forward_pre_hook(before_forward)

    def undo() -> None:
        nn.Module.to, nn.Module.cuda = orig_to, orig_cuda  # type: ignore[method-assign]
        hook.remove()
        _PENDING.clear()
        _MEMBER.clear()
        _ORIG.clear()

    return undo


@register
class Placement(Strategy):
    name = "placement"
    order = 80  # after precision and offload: what is left on the host moves last
    summary = "the script's model.to(device) waits for the plan, which places each tensor once"

    def validate(self, section: Any) -> PlacementConfig:
        if section is True:
            section = {"defer": True}
        if not isinstance(section, dict):
            raise PlanError("placement: write it as {defer: true}")
        check_keys(section, KEYS, "placement")
        defer = section.get("defer", True)
        check_bool(defer, "placement.defer")
        mib = section.get("min_mib", 64)
        if not isinstance(mib, int) or isinstance(mib, bool) or mib < 0:
            raise PlanError(f"placement.min_mib: {mib!r} is not a whole number of MiB >= 0")
        return PlacementConfig(defer=defer, min_mib=mib)

    def declare(self, config: PlacementConfig, facts: PlanFacts) -> None:
        pass

    def space(self, trial: Any, profile: Any, layout: Any, opts: Any) -> dict[str, Any] | None:
        if opts.device != "cuda":
            return None
        return {"defer": True} if trial.suggest_categorical("placement.defer", [False, True]) else None

    def memory_seed(self, profile: Any, opts: Any) -> dict[str, Any]:
        return {"placement.defer": True}

    def effect(self, profile: Any, config: PlacementConfig, sim: Any) -> None:
        """The device at apply time holds what the plan leaves there (not the script's model as built)."""
        if config.defer:
            sim.load_bytes = sim.param_bytes + sim.buffer_bytes + sim.master_bytes
            sim.notes.append(f"placement: {sim.load_bytes / 2**30:.2f} GiB on the device when the plan is applied "
                             "(the script's model.to(device) deferred)")

    def install(self, config: PlacementConfig, session: Any) -> Undo:
        return install_placement(config, session) if config.defer else noop

    def target_device(self, config: PlacementConfig, model: nn.Module) -> torch.device | None:
        """(patcher) the device the plan is applied for, when the script's move was deferred."""
        return target_device_of(model) if config.defer else None

    def apply(self, ctx: ApplyContext, config: PlacementConfig) -> Undo:
        root = deferred_root(ctx.model) if config.defer else None
        if root is None:
            if config.defer:
                ctx.note(self.name, "the model was on the device before the plan was applied: nothing deferred "
                                    "(built there, or moved by a call this patch does not see)")
            return noop
        d = _PENDING.pop(root)
        if any(m is root for m in ctx.model.modules()):
            root = ctx.model  # a wrapper around the deferred model (peft): its own modules move with it
        before = sum(p.numel() * p.element_size() for p in root.parameters() if p.device.type == "cpu")
        _move(root, d.device, d.non_blocking)
        for o in ctx.optimizer_offloads:
            o.sync_versions()
        for w in ctx.master_weights:
            w.sync_versions()
        ctx.note(self.name, f"the script's .to({d.device}) was deferred: {before / 2**30:.2f} GiB of weights "
                            f"and buffers moved once the plan had placed the rest")
        return noop
