"""A transformers `TrainerCallback` that applies a memtune plan to the Trainer's model and optimizer.

```python
from memtune.integrations.transformers import MemtuneCallback

trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[MemtuneCallback("plan.yaml")])
trainer.train()
```

Hooks: `on_train_begin` is the first event that is handed both the model and the optimizer: Trainer.train
creates the optimizer and runs accelerate's prepare (which wraps it in an AcceleratedOptimizer) just before
it, and nothing has run forward yet. The plan is applied to the real torch optimizer inside the wrapper (its
param_groups and state are the wrapper's, so the LR scheduler and the Trainer see every change).
`on_train_end` undoes it, so the model the Trainer returns (and saves after train) is the unpatched one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("memtune.integrations.transformers needs transformers: pip install 'memtune[hf]'") from e

from memtune.integrations._common import AppliesPlan, PlanApplier
from memtune.plan import Plan

__all__ = ["MemtuneCallback"]


class MemtuneCallback(AppliesPlan, TrainerCallback):
    """Apply `plan` (a plan file, a dict or a Plan) when training starts; undo it when training ends.

    `blocks`: a glob over module paths for the repeated blocks (as `--blocks`), by default found as
    `memtune profile` finds them. `log`: where the notes go (default: printed by the main process, as the
    Trainer prints its logs). After training, `notes` holds what was done, `(strategy, text)` rows.
    """

    def __init__(self, plan: Plan | dict | str | Path, *, blocks: str | None = None,
                 log: Callable[[str], None] | None = None):
        self._applier = PlanApplier(plan, blocks)
        self._log = log

    def _logger(self, state: Any) -> Callable[[str], None]:
        if self._log is not None:
            return self._log
        if getattr(state, "is_world_process_zero", True):
            return print
        return lambda line: None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._applier.apply(model, [optimizer], self._logger(state), "the Trainer")

    def on_train_end(self, args, state, control, **kwargs):
        self._applier.undo(self._logger(state))
