"""What strategies are handed: the search's options, and the live run's ApplyContext with the plan's typed
facts and its resolved block layout. Built by `memtune.strategies.make_context` (the patcher calls it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memtune.blocks import BlockRef

if TYPE_CHECKING:
    import torch

    from memtune.plan import Plan
    from memtune.profile import Profile
    from memtune.strategies.saved_tensors import SavedTensorPipeline


@dataclass(frozen=True)
class Layout:
    """Block name -> mode for one model (strategies/layout.py resolves it; blocks left as they are are absent)."""

    modes: dict[str, str] = field(default_factory=dict)

    def mode(self, name: str) -> str:
        return self.modes.get(name, "keep")

    def names(self, *modes: str) -> list[str]:
        return [n for n, m in self.modes.items() if m in modes]


@dataclass
class SearchOptions:
    lossless_only: bool = False
    world_size: int = 1
    device: str = "cuda"


@dataclass
class PlanFacts:
    """What one section says that another one needs, typed (each strategy's `declare` fills its part)."""

    update_on_host: bool = False  # offload.optimizer_state: optimizer state and update live on the host
    params_dtype: str | None = None  # precision.params when not fp32 ("bf16")
    master_weights: bool = False  # precision keeps fp32 master copies of low-precision params
    optimizer: str | None = None  # optimizer.name
    sharding_stage: int | None = None
    grads_on_host: bool = False  # offload.gradients: each gradient goes to the host as produced, none stay
    params_streamed: bool = False  # offload.params: some blocks' weights live on the host between uses
    cast_scope: str | None = None  # precision.cast when params are cast: "all" or "autocast" (matmul weights)


@dataclass
class ShardingState:
    stage: int
    world_size: int
    cpu_offload: bool = False


@dataclass
class ApplyContext:
    """What a strategy's `apply` may touch. Built by the patcher inside a Session (or by `apply_plan`).
    Strategies hand each other live objects through the typed fields below, never through string keys."""

    model: torch.nn.Module
    optimizers: list[torch.optim.Optimizer]
    blocks: list[BlockRef]
    device: torch.device
    plan: Plan
    profile: Profile | None = None
    facts: PlanFacts = field(default_factory=lambda: PlanFacts())  # make_context fills it from the plan
    layout: Layout = field(default_factory=lambda: Layout())  # each block's mode (make_context resolves it)
    # (strategy, what it did or why it left something alone): shown as the apply table
    notes: list[tuple[str, str]] = field(default_factory=list)
    # set by precision (fp32 masters of low-precision params, id(param) -> master) for offload's host update
    master_params: dict[int, torch.Tensor] | None = None
    activation_offloader: Any = None  # set by offload
    optimizer_offloads: list[Any] = field(default_factory=list)  # set by offload
    # set by precision (`cast: autocast`): id(param) -> the dtype of its gradient in the script as written,
    # which offload's host gradients accumulate, unscale and clip in
    reference_grad_dtypes: dict[int, Any] | None = None
    param_streamer: Any = None  # set by offload (params): the blocks whose weights are streamed from the host
    master_weights: list[Any] = field(default_factory=list)  # set by precision: fp32 masters updated on the device
    loss_stats: dict[str, Any] | None = None  # set by loss: fused calls and materializations
    sharding: ShardingState | None = None  # set by sharding
    run_over: bool = False  # the script has ended: undo need not restore what it moved off the device
    models: list[torch.nn.Module] = field(default_factory=list)  # other trained models (a GAN's generator)

    @property
    def all_models(self) -> list[torch.nn.Module]:
        """The model, then every other model an optimizer trains."""
        return [self.model, *(m for m in self.models if m is not self.model)]

    @functools.cached_property
    def saved_tensors(self) -> SavedTensorPipeline:
        """The one owner of per-block saved-tensor hooks: compress adds a codec stage, offload a transport."""
        from memtune.strategies.saved_tensors import SavedTensorPipeline

        return SavedTensorPipeline(self.module, self.repeated)

    @property
    def repeated(self) -> list[str]:
        return [b.name for b in self.blocks if b.kind == "repeated"]

    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def module(self, name: str) -> torch.nn.Module:
        for b in self.blocks:
            if b.name == name:
                return b.module
        return self.model.get_submodule(name)

    def note(self, strategy: str, text: str) -> None:
        self.notes.append((strategy, text))


