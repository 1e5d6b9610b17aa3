"""Blocks, the unit every per-block strategy works on: finding them in a model, and naming them in a plan.

A model's blocks are its repeated layers (the longest run of same-class children holding most parameters,
kind "repeated") and the other top-level pieces that hold parameters (embeddings, final norm, head, stem:
kind "other"). A plan names blocks as: "all" (every repeated block), an int i (the i-th repeated block,
negative counts from the end), "a-b" (a range of repeated blocks, inclusive), or a module path ("lm_head").

This is the ground floor: it imports nothing of memtune but its errors.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memtune.errors import InputError, PlanError

if TYPE_CHECKING:
    import torch.nn as nn

@dataclass
class BlockRef:
    """A live block of the model, found the same way `memtune profile` finds them."""

    name: str  # module path inside the model
    module: nn.Module
    kind: str = "repeated"  # or "other"
    index: int = 0  # position among all blocks, forward order


# --- finding blocks in a live model -------------------------------------------------------------------

_WRAPPERS = ("OptimizedModule", "DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")


def unwrap_model(module: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel / FSDP(1) / DataParallel / torch.compile wrappers."""
    import torch.nn as nn

    seen = set()
    while id(module) not in seen:
        seen.add(id(module))
        inner = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            module = inner
            continue
        if type(module).__name__ in ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel") \
                and isinstance(getattr(module, "module", None), nn.Module):
            module = module.module
            continue
        break
    return module


def unwrap_optimizer(opt: Any) -> Any:
    """The torch optimizer inside a framework's wrapper: accelerate's AcceleratedOptimizer (`.optimizer`, the one
    HF Trainer holds) or Lightning's LightningOptimizer (`._optimizer`); followed while the inner object is a
    torch.optim.Optimizer, as capture does, so a plan changes the optimizer that really steps."""
    import torch

    seen: set[int] = set()
    while id(opt) not in seen:
        seen.add(id(opt))
        for attr in ("optimizer", "_optimizer"):
            inner = getattr(opt, attr, None)
            if isinstance(inner, torch.optim.Optimizer) and inner is not opt:
                opt = inner
                break
        else:
            break
    return opt


def is_wrapper(module: Any) -> bool:
    return type(module).__name__ in _WRAPPERS


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _signature(m: nn.Module) -> tuple:
    return tuple((n, tuple(p.shape)) for n, p in m.named_parameters())


def _run_candidate(model: nn.Module) -> tuple[int, int, list[str], type | None]:
    """The longest run of consecutive same-class children (searched recursively) holding most parameters,
    plus the other outermost instances of that class (a ResNet's bottlenecks sit in four stages). Containers
    (Sequential, ModuleList) count as a class only when the run's members are identical in structure, so
    `stem` next to `layers` is not a run. (total parameters, members, paths, class)."""
    import torch.nn as nn

    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    best: tuple[int, int, list[str], type | None] = (0, 0, [], None)  # (params, length, names, class)
    for path, mod in model.named_modules():
        children = list(mod.named_children())
        i = 0
        while i < len(children):
            cls = type(children[i][1])
            sig = _signature(children[i][1]) if issubclass(cls, containers) else None
            j = i + 1
            while j < len(children) and type(children[j][1]) is cls and (
                    sig is None or _signature(children[j][1]) == sig):
                j += 1
            if j - i >= 2:
                run = children[i:j]
                n = sum(_n_params(c) for _, c in run)
                if n > 0 and (n, j - i) > best[:2]:
                    best = (n, j - i, [f"{path}.{name}" if path else name for name, _ in run], cls)
            i = j if j > i + 1 else i + 1
    cls = best[3]
    if cls is None or issubclass(cls, containers):
        return best
    return (best[0], best[1], _outermost(model, cls), cls)  # scored by the run itself


def _outermost(model: nn.Module, cls: type) -> list[str]:
    out: list[str] = []
    for path, mod in model.named_modules():
        if type(mod) is cls and path and not any(path.startswith(o + ".") for o in out):
            out.append(path)
    return out


def _class_candidate(model: nn.Module) -> tuple[int, int, list[str], type | None]:
    """The user-defined module class (not torch.nn's own layers or containers) whose outermost instances hold
    the most parameters, with two or more of them: blocks that do not sit side by side (a UNet's ResBlocks
    between its down- and up-sampling layers)."""
    import torch.nn as nn

    best: tuple[int, int, list[str], type | None] = (0, 0, [], None)
    classes = {type(m) for _, m in model.named_modules()}
    for cls in classes:
        if cls.__module__.startswith("torch.") or issubclass(cls, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            continue
        out = _outermost(model, cls)
        if len(out) < 2:
            continue
        mods = [model.get_submodule(p) for p in out]
        if not all(any(True for _ in m.children()) for m in mods):
            continue
        n = sum(_n_params(m) for m in mods)
        if n > 0 and (n, len(out)) > best[:2]:
            best = (n, len(out), out, cls)
    return best


def _repeated_run(model: nn.Module) -> list[str]:
    """Paths of the repeated blocks. The run of same-class siblings, unless a user-defined class's instances
    hold clearly more parameters; and when that is a couple of
    large pieces each made of a long run of blocks of its own (T5's encoder and decoder stacks of T5Blocks),
    those runs."""
    run, cls_c = _run_candidate(model), _class_candidate(model)
    best = cls_c if cls_c[0] > run[0] * 1.05 else run
    names = best[2]
    # a couple of distinct, named pieces (not members of one list, which are layers already)
    if 2 <= len(names) <= 3 and not all(n.rsplit(".", 1)[-1].isdigit() for n in names):
        inner: list[str] = []
        for name in names:
            sub = model.get_submodule(name)
            sub_run = _run_candidate(sub)
            members = [sub.get_submodule(p) for p in sub_run[2]]
            if len(members) < 4 or sub_run[0] < 0.7 * _n_params(sub) \
                    or not all(any(True for _ in m.children()) for m in members):
                inner = []
                break
            inner += [f"{name}.{p}" for p in sub_run[2]]
        if inner:
            return inner
    return names


def find_blocks(model: nn.Module, pattern: str | None = None) -> list[BlockRef]:
    """The model's blocks: its repeated layers (kind="repeated") and the other top-level pieces that hold
    parameters (kind="other"), in registration order, which is the forward order for the usual
    `for block in self.blocks` model (the profiler records the observed order).

    `pattern` is a glob over module paths (e.g. "layers.*" or "encoder.layer.*") that replaces the automatic
    repeated set; a match inside another match is dropped, so "blocks.*" means blocks.0, blocks.1, ...
    """
    model = unwrap_model(model)
    modules = dict(model.named_modules())
    if pattern:
        matched = [n for n in modules if n and fnmatch.fnmatchcase(n, pattern)]
        repeated = [n for n in matched if not any(n.startswith(m + ".") for m in matched if m != n)]
        if not repeated:
            sample = [n for n in modules if n and n.count(".") <= 2][:12]
            raise InputError(
                f"--blocks {pattern!r} matches no module of {type(model).__name__}; module paths look like "
                f"{', '.join(sample)}"
            )
    else:
        repeated = _repeated_run(model)
    rep = set(repeated)
    refs: list[BlockRef] = []

    def walk(path: str, mod: nn.Module) -> None:
        for name, child in mod.named_children():
            p = f"{path}.{name}" if path else name
            if p in rep:
                refs.append(BlockRef(p, child, "repeated"))
            elif any(r.startswith(p + ".") for r in rep):
                walk(p, child)
            elif any(True for _ in child.parameters()):
                refs.append(BlockRef(p, child, "other"))

    walk("", model)
    if not refs and any(True for _ in model.parameters()):
        refs.append(BlockRef("", model, "other"))  # a model with its parameters all on the root
    for i, b in enumerate(refs):
        b.index = i
    return refs


# --- naming blocks in a plan --------------------------------------------------------------------------


def validate_block_refs(value: Any, where: str) -> tuple[int | str, ...] | str:
    """A plan's block references, checked without the model: "all", or a tuple of ints, ranges, paths."""
    if value == "all":
        return "all"
    if isinstance(value, (int, str)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise PlanError(f"{where}: give a list of block indices or module paths, or 'all'")
    out: list[int | str] = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise PlanError(f"{where}: {v!r} is not a block; use an index, a range 'a-b' or a module path")
        out.append(v)
    return tuple(out)


def refs_to_yaml(refs: tuple[int | str, ...] | str) -> list[int | str] | str:
    return refs if refs == "all" else list(refs)


def _is_range(r: str) -> bool:
    return "-" in r and all(p.strip().lstrip("-").isdigit() for p in r.split("-", 1))


def resolve_block_refs(refs: Any, repeated: list[str], all_blocks: list[str], where: str) -> list[str]:
    """Block references -> module paths, in the given order of `all_blocks`."""
    if refs == "all":
        return list(repeated)
    chosen: set[str] = set()
    for r in refs:
        if isinstance(r, int):
            if not -len(repeated) <= r < len(repeated):
                raise PlanError(f"{where}: block {r} is out of range; the model has {len(repeated)} repeated blocks")
            chosen.add(repeated[r])
        elif _is_range(r):
            a, b = (int(p) for p in r.split("-", 1))
            if not (0 <= a <= b < len(repeated)):
                raise PlanError(f"{where}: range {r!r} is out of range; the model has {len(repeated)} repeated blocks")
            chosen.update(repeated[a : b + 1])
        elif r in all_blocks:
            chosen.add(r)
        else:
            raise PlanError(f"{where}: no block {r!r}; blocks are 0..{len(repeated) - 1} or one of {all_blocks}")
    return [b for b in all_blocks if b in chosen]


def block_ref_keys(refs: Any) -> set[int | str]:
    """Block references as comparable keys without the model: 'a-b' ranges expand to their indices.
    (A negative index or a module path that aliases an index is only caught once the model is known.)"""
    out: set[int | str] = set()
    for r in refs:
        if isinstance(r, str) and "-" in r and all(x.strip().isdigit() for x in r.split("-", 1)):
            a, b = (int(x) for x in r.split("-", 1))
            out.update(range(a, b + 1))
        else:
            out.add(r)
    return out


def shared_block_refs(a: Any, b: Any) -> set[int | str]:
    """What two sections' block references both name ('all' is every repeated block, so it shares each index)."""
    if a == "all" and b == "all":
        return {"all"}
    if a == "all" or b == "all":
        other = b if a == "all" else a
        return {r for r in block_ref_keys(other) if isinstance(r, int)}
    return block_ref_keys(a) & block_ref_keys(b)
