"""The contract every strategy module fulfils (see ../../DESIGN notes in docs/strategies.md).

A strategy is one module in memtune/strategies/ holding a `Strategy` subclass, decorated with `@register`:
- `validate(section)`: the plan's YAML section -> normalized dict; unknown keys/values -> PlanError that
  names them and lists the allowed ones.
- `conflicts(plan, section)`: problems with other sections (e.g. a block both recomputed and offloaded).
- `lossy(section)`: True where it changes the numbers (labelled in every output, excluded by --lossless-only).
- `space(trial, profile, opts)`: its Optuna choices -> a section, or None to leave it absent.
- `effect(profile, section, sim)`: change the cost model's simulated step (memtune.costmodel.SimStep).
- `install(section, session)`: optional global patch made before the script starts (e.g. take over the
  script's DDP wrapping, replace F.cross_entropy); returns an undo. Most strategies need none.
- `apply(ctx, section)`: patch the live run (ApplyContext) and return an undo callable. The patcher calls it
  once the model and its optimizer exist, before the first forward, in `order`.

How `effect` talks to the simulator (memtune/costmodel.py), e.g. for a checkpointed block `b`:
    b.mode = "recompute"; b.kept_bytes = b.input_bytes; b.bwd_extra_bytes = b.act_bytes; b.recompute_s = b.fwd_s
an offloaded block: b.mode = "offload"; b.kept_bytes = 0; b.d2h_bytes = b.h2d_bytes = b.act_bytes;
b.bwd_extra_bytes = b.act_bytes (it is back on device for its backward); the simulator hides transfers behind
the compute they overlap at the profile's measured bandwidth. Global fields (opt_state_bytes, grad_bytes,
param_bytes, ...) are scaled the same way. Append to `sim.lossy` when lossy and to `sim.notes` to explain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from memtune.costmodel import SimStep
    from memtune.plan import Plan
    from memtune.profile import Profile

Undo = Callable[[], None]


def _noop() -> None:
    pass


def replace_on_instance(obj: Any, name: str, value: Any) -> Undo:
    """Set `obj.name = value` on this instance only (its class untouched); the undo restores exactly what the
    instance had: its own attribute, or none so the class's shows again."""
    had = name in obj.__dict__
    previous = obj.__dict__.get(name)
    setattr(obj, name, value)

    def undo() -> None:
        if had:
            setattr(obj, name, previous)
        else:
            obj.__dict__.pop(name, None)

    return undo


def patch_functions(targets: list[tuple[Any, str]], wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
                    marker: str | None = None) -> Undo:
    """Replace each function `owner.attr` (a module's or a class's) by `wrap(current)`; the undo puts the
    originals back, newest first. With `marker`, a function already wrapped with that marker is left alone
    (installing twice wraps once) and each new wrapper gets it. Install before a script binds the names."""
    done: list[tuple[Any, str, Any]] = []
    for owner, attr in targets:
        f = getattr(owner, attr, None)
        if f is None or (marker and getattr(f, marker, False)):
            continue
        w = wrap(f)
        if marker:
            setattr(w, marker, True)
        setattr(owner, attr, w)
        done.append((owner, attr, f))

    def undo() -> None:
        for owner, attr, f in reversed(done):
            setattr(owner, attr, f)

    return undo


def run_closure(closure: Callable[[], Any] | None) -> Any:
    """What `optimizer.step(closure)` does first: re-evaluate the loss with grad enabled (steps run under
    no_grad), or None without a closure."""
    if closure is None:
        return None
    import torch

    with torch.enable_grad():
        return closure()


def wrap_forward(module: Any, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Undo:
    """Replace module.forward on the instance with make(current forward), so state_dict keys never change."""
    return replace_on_instance(module, "forward", make(module.forward))


@dataclass
class BlockRef:
    """A live block of the model, found the same way `memtune profile` finds them."""

    name: str  # module path inside the model
    module: torch.nn.Module
    kind: str = "repeated"  # or "other"
    index: int = 0  # position among all blocks, forward order


@dataclass
class SearchOptions:
    lossless_only: bool = False
    world_size: int = 1
    device: str = "cuda"


@dataclass
class ApplyContext:
    """What a strategy's `apply` may touch. Built by the patcher inside a Session (or by `apply_plan`)."""

    model: torch.nn.Module
    optimizers: list[torch.optim.Optimizer]
    blocks: list[BlockRef]
    device: torch.device
    plan: Plan
    profile: Profile | None = None
    # (strategy, what it did or why it left something alone): shown as the apply table
    notes: list[tuple[str, str]] = field(default_factory=list)
    # scratch shared between strategies of one application (e.g. offload reads compress's packer)
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def repeated(self) -> list[str]:
        return [b.name for b in self.blocks if b.kind == "repeated"]

    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def resolve(self, refs: list[int | str] | str, where: str) -> list[str]:
        """A plan section's block references -> module paths of this run (`plan.resolve_block_refs`)."""
        from memtune.plan import resolve_block_refs

        return resolve_block_refs(refs, self.repeated, self.block_names, where)

    def module(self, name: str) -> torch.nn.Module:
        for b in self.blocks:
            if b.name == name:
                return b.module
        return self.model.get_submodule(name)

    def note(self, strategy: str, text: str) -> None:
        self.notes.append((strategy, text))


class Strategy:
    name: ClassVar[str] = ""
    order: ClassVar[int] = 100  # apply order: lower first
    summary: ClassVar[str] = ""

    def validate(self, section: Any) -> dict[str, Any]:
        raise NotImplementedError

    def conflicts(self, plan: Plan, section: dict[str, Any]) -> list[str]:
        return []

    def lossy(self, section: dict[str, Any]) -> bool:
        return False

    def space(self, trial: Any, profile: Profile, opts: SearchOptions) -> dict[str, Any] | None:
        return None

    def effect(self, profile: Profile, section: dict[str, Any], sim: SimStep) -> None:
        pass

    def install(self, section: dict[str, Any], session: Any) -> Undo:
        return _noop

    def apply(self, ctx: ApplyContext, section: dict[str, Any]) -> Undo:
        return _noop

    def describe(self, section: dict[str, Any]) -> str:
        """One line for tables: what this section does."""
        return ", ".join(f"{k}={v}" for k, v in section.items())


_REGISTRY: dict[str, Strategy] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a `name` (its plan section)")
    _REGISTRY[cls.name] = cls()
    return cls
