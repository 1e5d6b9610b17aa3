"""Framework integrations: apply a plan from inside a framework's own training loop, or say which of its
settings a plan maps to.

- `memtune.integrations.transformers.MemtuneCallback`: a transformers `TrainerCallback`.
- `memtune.integrations.lightning.MemtuneCallback`: a Lightning `Callback` (lightning.pytorch and pytorch_lightning).
- `memtune.integrations.export`: a plan as TrainingArguments / lightning.Trainer / Accelerator settings
  (`memtune export`), and what has no equivalent there.

Nothing here is imported by `import memtune`; each callback module imports its framework when imported.
This package imports memtune's patcher and strategies, never the other way round.
"""
