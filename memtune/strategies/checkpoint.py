"""Activation checkpointing per block: keep only the block's inputs in forward, recompute it in backward.

Plan section: `checkpoint: {blocks: all | [0, 1, "4-7", "lm_head"], mode: full | selective}`.
- full: non-reentrant `torch.utils.checkpoint` around the block's forward (RNG state preserved, so dropout
  gives the same numbers; kwargs pass through).
- selective: PyTorch's selective-checkpoint policy (`create_selective_checkpoint_contexts`): matmul and
  attention outputs are saved, cheap pointwise ops are recomputed.
We wrap the block's `forward` on the instance, not the module, so `state_dict()` keys never change.
Transformers' own gradient checkpointing is detected per block and switched off where memtune takes over
(never both, which would recompute twice).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from memtune.errors import PlanError
from memtune.plan import check_choice, check_keys, validate_block_refs
from memtune.strategies.base import ApplyContext, Strategy, Undo, register, wrap_forward

MODES = ("full", "selective")
KEYS = {"blocks": "block references: all, indices, 'a-b' ranges or module paths", "mode": "full | selective"}

# Selective mode: fraction of a block's saved bytes still kept, and of its forward time recomputed. Assumed
# for a transformer block (matmul/attention outputs kept, norms/activations/residual adds recomputed); the
# profile does not split saved bytes by op.
SELECTIVE_KEEP = 0.55
SELECTIVE_RECOMPUTE = 0.15


def _save_ops() -> set:
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
             "_efficient_attention_forward", "convolution"]
    ops = set()
    for n in names:
        op = getattr(aten, n, None)
        if op is not None:
            ops.add(op.default if hasattr(op, "default") else op)
    return ops


def _selective_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    save = _save_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def checkpointed(forward, mode: str = "full"):
    """`forward` wrapped with non-reentrant checkpointing while gradients are on (no-op under no_grad)."""
    from torch.utils.checkpoint import checkpoint

    kw: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        kw["context_fn"] = _selective_context

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, **kw, **kwargs)

    wrapper._memtune_checkpoint = mode  # type: ignore[attr-defined]
    return wrapper


def hf_checkpointing_off(module: torch.nn.Module) -> Undo | None:
    """Switch transformers' gradient checkpointing off inside `module`; None if it was not on."""
    flagged = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]
    if not flagged:
        return None
    for m in flagged:
        m.gradient_checkpointing = False

    def undo() -> None:
        for m in flagged:
            m.gradient_checkpointing = True

    return undo


@register
class Checkpoint(Strategy):
    name = "checkpoint"
    order = 50
    summary = "recompute chosen blocks in backward instead of keeping their activations"

    def validate(self, section: Any) -> dict[str, Any]:
        if isinstance(section, (list, int)) or section == "all":
            section = {"blocks": section}
        if not isinstance(section, dict):
            raise PlanError("checkpoint: write it as {blocks: all | [indices], mode: full | selective}")
        check_keys(section, KEYS, "checkpoint")
        if "blocks" not in section:
            raise PlanError("checkpoint: missing `blocks`; e.g. `checkpoint: {blocks: all}`")
        return {"blocks": validate_block_refs(section["blocks"], "checkpoint.blocks"),
                "mode": check_choice(section.get("mode", "full"), MODES, "checkpoint.mode")}

    def describe(self, section: dict[str, Any]) -> str:
        return f"{section['mode']} checkpointing of blocks {section['blocks']}"

    def space(self, trial: Any, profile: Any, opts: Any) -> dict[str, Any] | None:
        # Compact: checkpoint the LAST k repeated blocks (offload takes the first ones, which have the most
        # forward time after them to hide their copies), one mode for all.
        n = len(profile.repeated_blocks)
        k = trial.suggest_int("checkpoint.k", 0, n)
        if k == 0:
            return None
        mode = trial.suggest_categorical("checkpoint.mode", list(MODES))
        return {"blocks": "all" if k == n else [f"{n - k}-{n - 1}"], "mode": mode}

    def effect(self, profile: Any, section: dict[str, Any], sim: Any) -> None:
        names = profile.resolve_blocks(section["blocks"], "checkpoint.blocks")
        for b in sim.blocks:
            if b.name not in names:
                continue
            if section["mode"] == "full":
                b.mode = "recompute"
                b.kept_bytes = b.input_bytes
                b.bwd_extra_bytes = b.act_bytes
                b.recompute_s = b.fwd_s
            else:
                b.mode = "selective"
                b.kept_bytes = b.input_bytes + SELECTIVE_KEEP * b.act_bytes
                b.bwd_extra_bytes = (1 - SELECTIVE_KEEP) * b.act_bytes
                b.recompute_s = SELECTIVE_RECOMPUTE * b.fwd_s
        if section["mode"] == "selective":
            sim.notes.append(f"selective checkpointing assumed to keep {SELECTIVE_KEEP:.0%} of a block's "
                             f"activations and recompute {SELECTIVE_RECOMPUTE:.0%} of its forward")

    def apply(self, ctx: ApplyContext, section: dict[str, Any]) -> Undo:
        names = ctx.resolve(section["blocks"], "checkpoint.blocks")
        mode = section["mode"]
        undos: list[Undo] = []
        hf_off = 0
        for name in names:  # names resolved above: nothing below raises on a valid plan
            mod = ctx.module(name)
            off = hf_checkpointing_off(mod)
            if off is not None:
                undos.append(off)
                hf_off += 1
            undos.append(wrap_forward(mod, lambda f, _m=mode: checkpointed(f, _m)))
        ctx.shared.setdefault("checkpointed_blocks", set()).update(names)
        ctx.note(self.name, f"{mode} checkpointing on {len(names)} block(s): {_short(names)}")
        if hf_off:
            ctx.note(self.name, f"transformers' gradient checkpointing was on: switched off on the {hf_off} "
                                "block(s) memtune checkpoints (never both)")

        def undo() -> None:
            for u in reversed(undos):
                u()

        return undo


def _short(names: list[str], n: int = 4) -> str:
    return ", ".join(names) if len(names) <= n else f"{', '.join(names[:2])}, ..., {names[-1]}"
