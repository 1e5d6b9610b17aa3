"""Memory observers: bytes saved for backward per block, model states, and the CUDA allocator's peaks.

Saved tensors are counted through `torch.autograd.graph.saved_tensors_hooks`: every tensor autograd saves
passes through `pack`; its storage is counted once (keyed by the storage's data pointer, so the q/k/v views
of one qkv output, or a tensor saved by two ops, count once) and parameters and buffers are left out (they
are model states, not activations). Under autocast the 16-bit weight copies *are* counted: they are
allocated per forward and freed with its backward, like any activation.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch

DTYPE_NAMES = {  # torch.float32 -> "float32"
    getattr(torch, n): n for n in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
                                   "uint8", "bool", "float8_e4m3fn", "float8_e5m2", "complex64")
    if hasattr(torch, n)
}


def dtype_name(dt: torch.dtype) -> str:
    return DTYPE_NAMES.get(dt, str(dt).replace("torch.", ""))


def storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    """(data pointer, bytes) of the storage behind `t`, or None for tensors without one (meta, sparse)."""
    try:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        n = s.nbytes()
    except Exception:
        return None
    if ptr == 0 and n == 0:
        return None
    return ptr, n


def state_ptrs(model: torch.nn.Module) -> set[int]:
    """Storage pointers of the model's parameters and buffers (excluded from activations)."""
    out = set()
    for t in [*model.parameters(), *model.buffers()]:
        k = storage_key(t)
        if k is not None:
            out.add(k[0])
    return out


def iter_tensors(obj: Any, depth: int = 0) -> Iterable[torch.Tensor]:
    """Tensors inside nested args/kwargs/outputs (tuples, lists, dicts, HF ModelOutput, dataclasses)."""
    if depth > 6:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from iter_tensors(x, depth + 1)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from iter_tensors(x, depth + 1)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from iter_tensors(getattr(obj, name, None), depth + 1)


def tensors_bytes(obj: Any, exclude: set[int] = frozenset()) -> int:
    """Bytes of the unique storages of the tensors in `obj`, leaving out `exclude`d pointers."""
    seen: dict[int, int] = {}
    for t in iter_tensors(obj):
        k = storage_key(t)
        if k is not None and k[0] not in exclude:
            seen[k[0]] = k[1]
    return sum(seen.values())


class SharedInputs:
    """Which block inputs an earlier block of the step took too. Storages are matched by pointer while a
    tensor of the earlier call is still alive (a weak reference), so a pointer the allocator reused for a
    new tensor is not taken for the old one."""

    def __init__(self) -> None:
        self._seen: dict[int, list[weakref.ref]] = {}

    def clear(self) -> None:
        self._seen.clear()

    def take(self, obj: Any, exclude: set[int] = frozenset()) -> tuple[int, int]:
        """(bytes of the unique storages in `obj`, the part of them an earlier `take` saw alive)."""
        mine: dict[int, int] = {}
        shared: set[int] = set()
        new: list[tuple[int, torch.Tensor]] = []
        for t in iter_tensors(obj):
            k = storage_key(t)
            if k is None or k[0] in exclude:
                continue
            mine[k[0]] = k[1]
            if any(r() is not None for r in self._seen.get(k[0], ())):
                shared.add(k[0])
            new.append((k[0], t))
        for ptr, t in new:  # recorded after the check: a storage twice in one call is not shared with itself
            self._seen[ptr] = [r for r in self._seen.get(ptr, []) if r() is not None] + [weakref.ref(t)]
        return sum(mine.values()), sum(mine[p] for p in shared)


# the owner of what is saved outside every block before the first repeated block's forward
BEFORE_BLOCKS = "\0before blocks"


class SavedTensorCounter:
    """Counts bytes saved for backward, per owner (a block name, or None for outside every block).

    `owner()` is asked at pack time; counting is on while `active` is True. Use `hooks()` as the
    saved_tensors_hooks context.
    """

    def __init__(self, owner: Callable[[], str | None], exclude: set[int]):
        self.owner = owner
        self.exclude = exclude
        self.active = False
        self.seen: dict[int, str | None] = {}
        self.bytes: dict[str | None, int] = {}
        self.by_dtype: dict[str | None, dict[str, int]] = {}

    def reset(self) -> None:
        self.seen.clear()
        self.bytes.clear()
        self.by_dtype.clear()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            k = storage_key(t)
            if k is not None and k[0] not in self.exclude and k[0] not in self.seen:
                who = self.owner()
                self.seen[k[0]] = who
                self.bytes[who] = self.bytes.get(who, 0) + k[1]
                d = self.by_dtype.setdefault(who, {})
                name = dtype_name(t.dtype)
                d[name] = d.get(name, 0) + k[1]
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def param_stats(module: torch.nn.Module, seen: set[int] | None = None) -> dict[str, Any]:
    """Parameter bytes by dtype, trainable and frozen, each storage counted once (tied weights)."""
    seen = set() if seen is None else seen
    by_dtype: dict[str, int] = {}
    trainable = frozen = n = 0
    for p in module.parameters():
        k = storage_key(p)
        if k is None or k[0] in seen:
            continue
        seen.add(k[0])
        b = p.numel() * p.element_size()
        by_dtype[dtype_name(p.dtype)] = by_dtype.get(dtype_name(p.dtype), 0) + b
        n += p.numel()
        if p.requires_grad:
            trainable += b
        else:
            frozen += b
    return {"param_bytes": by_dtype, "trainable": trainable, "frozen": frozen, "n_params": n}


def _bytes_once_per_storage(tensors: Iterable[torch.Tensor], whole_storage: bool = False) -> int:
    """Bytes of `tensors`, a storage shared by several counted once: the tensor's own bytes, or with
    `whole_storage` the storage's (an optimizer's state may be views into one flat buffer)."""
    seen: dict[int, int] = {}
    for t in tensors:
        k = storage_key(t)
        if k is not None:
            seen[k[0]] = k[1] if whole_storage else t.numel() * t.element_size()
    return sum(seen.values())


def buffer_bytes(module: torch.nn.Module) -> int:
    return _bytes_once_per_storage(module.buffers())


def grad_bytes(module: torch.nn.Module) -> int:
    return _bytes_once_per_storage(p.grad for p in module.parameters() if p.grad is not None)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in the optimizer's state (moments, step counters...), each storage once."""
    return _bytes_once_per_storage((t for st in opt.state.values()
                                    for t in iter_tensors(dict(st) if isinstance(st, dict) else st)),
                                   whole_storage=True)


class PeakTracker:
    """Splits a step into intervals at marks and reads the CUDA allocator's peak for each one.

    At every mark the peak since the previous mark is read and the peak counter reset, so the peak of the
    whole step, its phase and the largest transient inside a block all come from one pass.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled and torch.cuda.is_available()

    def read(self) -> tuple[int, int, int, int]:
        """(allocated now, peak allocated since last read, reserved now, peak reserved) and reset."""
        if not self.enabled:
            return 0, 0, 0, 0
        c = torch.cuda
        out = (c.memory_allocated(), c.max_memory_allocated(), c.memory_reserved(), c.max_memory_reserved())
        c.reset_peak_memory_stats()
        return out


def other_module_bytes(models: list[torch.nn.Module], device: torch.device) -> tuple[int, list[str]]:
    """Bytes of the parameters and buffers of modules on `device` that are none of the trained `models`: an
    EMA copy, a frozen teacher, a reference model. They stay for the whole step, whatever the batch. Returns
    (bytes, the classes of the outermost such modules)."""
    import gc

    known: set[int] = set()
    for m in models:
        known |= state_ptrs(m)
    seen: dict[int, int] = {}
    owners: list[torch.nn.Module] = []
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.nn.Module):
            continue
        found = False
        for t in [*obj.parameters(recurse=False), *obj.buffers(recurse=False)]:
            if t.device.type != device.type:
                continue
            k = storage_key(t)
            if k is not None and k[0] not in known and k[0] not in seen:
                seen[k[0]] = k[1]
                found = True
        if found:
            owners.append(obj)
    inner = {id(c) for o in owners for c in o.modules() if c is not o}
    classes = sorted({type(o).__name__ for o in owners if id(o) not in inner})
    return sum(seen.values()), classes
