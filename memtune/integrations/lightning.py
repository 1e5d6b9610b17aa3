"""A Lightning `Callback` that applies a memtune plan to the LightningModule and the Trainer's optimizers.

```python
from memtune.integrations.lightning import MemtuneCallback

trainer = lightning.Trainer(max_steps=1000, callbacks=[MemtuneCallback("plan.yaml")])
trainer.fit(module, loader)
```

Hooks: `on_fit_start` applies. It runs after `setup` and `configure_model`, after the strategy moved the
module to its device and called `configure_optimizers` (so `trainer.optimizers` exist), and before the
sanity check and the first training step. (`setup` is too early: no optimizer exists yet.) `on_train_end`
undoes it: it is the last hook before the strategy's teardown moves the module and the optimizer state to the
CPU, so undo sees them where the plan was applied. `on_fit_end` and `on_exception` undo whatever is still
applied (a fit whose loop never ran, or one that raised).

The class subclasses `lightning.pytorch.Callback` and, when that package is installed too,
`pytorch_lightning.Callback`, so either package's Trainer takes it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memtune.integrations._common import AppliesPlan, PlanApplier
from memtune.plan import Plan

__all__ = ["MemtuneCallback"]


def _packages() -> list[Any]:
    found = []
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            continue
    if not found:
        raise ImportError("memtune.integrations.lightning needs lightning (or pytorch_lightning): pip install lightning")
    return found


_PACKAGES = _packages()


def _rank_zero_info(line: str) -> None:
    # Lightning's own info channel: printed by rank 0, at the level Lightning logs its setup lines
    _PACKAGES[0].utilities.rank_zero_info(line)


class _Hooks(AppliesPlan):
    def __init__(self, plan: Plan | dict | str | Path, *, blocks: str | None = None,
                 log: Callable[[str], None] | None = None):
        super().__init__()
        self._applier = PlanApplier(plan, blocks)
        self._log = log or _rank_zero_info

    def on_fit_start(self, trainer, pl_module) -> None:
        self._applier.apply(pl_module, list(trainer.optimizers), self._log, "the Lightning Trainer")

    def on_train_end(self, trainer, pl_module) -> None:
        self._applier.undo(self._log)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._applier.undo(self._log)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._applier.undo(self._log)


_BASES = tuple(p.Callback for p in _PACKAGES)


class MemtuneCallback(_Hooks, *_BASES):
    """Apply `plan` (a plan file, a dict or a Plan) at fit start; undo it at train end.

    `blocks`: a glob over module paths for the repeated blocks (as `--blocks`), by default found as
    `memtune profile` finds them. `log`: where the notes go (default: Lightning's rank-zero info log). After
    fitting, `notes` holds what was done, `(strategy, text)` rows.
    """
