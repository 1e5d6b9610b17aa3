"""The contract every strategy module fulfils.

A strategy is one module (or small package) in memtune/strategies/ holding a `Strategy` subclass, decorated
with `@register`. It reads one plan section:
- `validate(section) -> SectionConfig`: the YAML section -> a frozen config dataclass; unknown keys/values ->
  PlanError that names them and lists the allowed ones.
- `block_modes(config) -> {mode: block references}`: the per-block modes the section asks for (checkpoint:
  recompute/selective, offload: offload, compress: compress). The patcher, the cost model and the tuner
  combine every section's into one layout (strategies/layout.py), where one check finds a block given two
  modes that do not compose.
- `declare(config, facts)`: typed facts other strategies need (`PlanFacts`: the optimizer update runs on
  the host, the parameters' dtype...). `conflicts(config, facts)`: rules against other sections, read
  from those facts.
- `space(trial, profile, layout, opts) -> section | None`: its Optuna choices. Block strategies take their
  blocks from `layout`, the one per-block assignment the tuner proposed for this trial.
- `effect(profile, config, sim)`: change the cost model's simulated step (memtune.costmodel.SimStep). Where
  the profile measured a what-if for a block in this mode (`BlockProfile.what_ifs`), the measurement wins
  over a formula, and `sim.source(name, how)` records which one was used.
- `memory_seed(profile, opts) -> {trial parameter: value}`: optional, its choices that save the most memory
  without changing the numbers; the tuner evaluates all strategies' together (with every block recomputed)
  as a starting point, since memory-bound plans need several sections at once (a 7B model in 24 GiB).
- `install(config, session)`: optional global patch made before the script starts (take over the script's
  DDP wrapping, guard clip_grad_norm_); returns an undo. Most strategies need none.
- `apply(ctx, config)`: patch the live run (ApplyContext) and return an undo. The patcher calls it once the
  model and its optimizer exist, before the first forward, in `order`; `add_optimizer(ctx, config, optimizer)` for
  an optimizer the script builds later (a GAN's second one), then `add_model(ctx, config, model)` when that
  optimizer trains a model not seen yet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from memtune.strategies.context import ApplyContext, Layout, PlanFacts, SearchOptions, ShardingState
from memtune.undo import Undo, noop

if TYPE_CHECKING:
    from memtune.costmodel import SimStep
    from memtune.plan import SectionConfig
    from memtune.profile import Profile
    from memtune.strategies.layout import Proposal

__all__ = ["ApplyContext", "Layout", "PlanFacts", "SearchOptions", "ShardingState", "Strategy", "register"]


class Strategy:
    name: ClassVar[str] = ""
    order: ClassVar[int] = 100  # apply order: lower first
    summary: ClassVar[str] = ""

    def validate(self, section: Any) -> SectionConfig:
        raise NotImplementedError

    def block_modes(self, config: Any) -> dict[str, Any]:
        return {}

    def declare(self, config: Any, facts: PlanFacts) -> None:
        pass

    def conflicts(self, config: Any, facts: PlanFacts) -> list[str]:
        return []

    def space(self, trial: Any, profile: Profile, layout: Proposal, opts: SearchOptions) -> dict[str, Any] | None:
        return None

    def effect(self, profile: Profile, config: Any, sim: SimStep) -> None:
        pass

    def memory_seed(self, profile: Profile, opts: SearchOptions) -> dict[str, Any]:
        return {}

    def lossy_seed(self, profile: Profile, opts: SearchOptions) -> dict[str, Any]:
        """(lossy strategies) the choice that saves the most where it is the only way in (a frozen base in
        NF4): a start for the tuner's descent when lossy plans are allowed, since the lossless floor may
        exclude it (a conflict) and one change at a time from there never reaches it."""
        return {}

    def install(self, config: Any, session: Any) -> Undo:
        return noop

    def apply(self, ctx: ApplyContext, config: Any) -> Undo:
        return noop

    def add_optimizer(self, ctx: ApplyContext, config: Any, optimizer: Any) -> Undo:
        """Another optimizer appeared after `apply` (already in `ctx.optimizers`): patch it too where this
        strategy works optimizer by optimizer. Most strategies need nothing."""
        return noop

    def add_model(self, ctx: ApplyContext, config: Any, model: Any) -> Undo:
        """Another trained model appeared after `apply` (its optimizer was built later): patch it too where
        this strategy works model by model. Most strategies need nothing."""
        return noop


_REGISTRY: dict[str, Strategy] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a `name` (its plan section)")
    _REGISTRY[cls.name] = cls()
    return cls
