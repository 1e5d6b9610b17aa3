"""What both callbacks share: one plan, applied to the framework's model and optimizers, undone once."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from memtune.blocks import BlockRef, unwrap_model, unwrap_optimizer
from memtune.errors import ScriptError
from memtune.plan import Plan


class PlanApplier:
    """Apply `plan` once per training run; `undo()` is safe to call from several end-of-run hooks."""

    def __init__(self, plan: Plan | dict | str | Path, blocks: str | list[BlockRef] | None = None):
        from memtune.strategies import load_plan

        self.plan = load_plan(plan)  # a bad plan fails when the callback is built, not mid-run
        self.blocks = blocks
        self.applied: Any = None
        self.notes: list[tuple[str, str]] = []

    @property
    def active(self) -> bool:
        return self.applied is not None

    def apply(self, model: torch.nn.Module, optimizers: Iterable[Any], log: Callable[[str], None],
              framework: str) -> None:
        from memtune.patcher import apply_plan

        self.undo(log)  # a second fit/train on the same callback starts from the unpatched model
        if model is None:
            raise ScriptError(f"MemtuneCallback: {framework} gave the callback no model to apply the plan to")
        opts: Sequence[Any] = [unwrap_optimizer(o) for o in optimizers if o is not None]
        other = [type(o).__name__ for o in opts if not isinstance(o, torch.optim.Optimizer)]
        if other:
            raise ScriptError(f"MemtuneCallback applies a plan to torch.optim optimizers; {framework}'s is "
                              f"{', '.join(other)} (DeepSpeed?): run without it, or use `memtune apply`")
        self.applied = apply_plan(unwrap_model(model), list(opts), self.plan, blocks=self.blocks)
        self.notes = list(self.applied.notes)
        for strategy, note in self.notes:
            log(f"memtune: {strategy}: {note}")
        if not self.notes:
            log("memtune: the plan has no strategy sections: nothing applied")

    def undo(self, log: Callable[[str], None] | None = None) -> None:
        applied, self.applied = self.applied, None
        if applied is None:
            return
        seen = len(applied.notes)
        applied()
        later = list(applied.notes[seen:])  # what strategies measured over the run, said at undo
        self.notes += later
        for strategy, note in later:
            if log is not None:
                log(f"memtune: {strategy}: {note}")


class AppliesPlan:
    """The read side both callbacks offer over their `_applier` (a PlanApplier)."""

    _applier: PlanApplier

    @property
    def plan(self) -> Plan:
        return self._applier.plan

    @property
    def notes(self) -> list[tuple[str, str]]:
        return self._applier.notes

    def undo(self) -> None:
        """Undo the plan now, if it is applied (the end hook does it; after a failed run, call it yourself)."""
        self._applier.undo()

    @property
    def active(self) -> bool:
        """Whether the plan is applied now (between the framework's start and end hooks)."""
        return self._applier.active
