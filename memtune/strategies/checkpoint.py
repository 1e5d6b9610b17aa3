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
from dataclasses import dataclass
from typing import Any

import torch

from memtune.blocks import refs_to_yaml, validate_block_refs
from memtune.costmodel import measured_mode, note_sources
from memtune.errors import PlanError
from memtune.plan import SectionConfig, check_choice, check_keys
from memtune.strategies.base import ApplyContext, Strategy, register
from memtune.strategies.layout import RECOMPUTE, compact
from memtune.undo import Undo, Undos, wrap_forward

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


@dataclass(frozen=True)
class CheckpointConfig(SectionConfig):
    blocks: tuple[int | str, ...] | str
    mode: str = "full"

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": refs_to_yaml(self.blocks), "mode": self.mode}

    def describe(self) -> str:
        return f"{self.mode} checkpointing of blocks {refs_to_yaml(self.blocks)}"


@register
class Checkpoint(Strategy):
    name = "checkpoint"
    order = 50
    summary = "recompute chosen blocks in backward instead of keeping their activations"

    def validate(self, section: Any) -> CheckpointConfig:
        if isinstance(section, (list, int)) or section == "all":
            section = {"blocks": section}
        if not isinstance(section, dict):
            raise PlanError("checkpoint: write it as {blocks: all | [indices], mode: full | selective}")
        check_keys(section, KEYS, "checkpoint")
        if "blocks" not in section:
            raise PlanError("checkpoint: missing `blocks`; e.g. `checkpoint: {blocks: all}`")
        return CheckpointConfig(blocks=validate_block_refs(section["blocks"], "checkpoint.blocks"),
                                mode=check_choice(section.get("mode", "full"), MODES, "checkpoint.mode"))

    def block_modes(self, config: CheckpointConfig) -> dict[str, Any]:
        return {"recompute" if config.mode == "full" else "selective": config.blocks}

    def space(self, trial: Any, profile: Any, layout: Any, opts: Any) -> dict[str, Any] | None:
        blocks = compact(layout.blocks("recompute"), len(profile.repeated_blocks))
        if not blocks:
            return None
        return {"blocks": blocks, "mode": layout.recompute_mode}

    def effect(self, profile: Any, config: CheckpointConfig, sim: Any) -> None:
        """A recomputed block keeps its inputs [ckpt] and re-creates its activations in its own backward. The
        working set of that backward and the recompute time are the profiler's measurement of this block's
        class in the mode when it has one [whatif]; otherwise the activations and one more forward."""
        names = set(profile.resolve_blocks(config.blocks, "checkpoint.blocks"))
        mode = "recompute" if config.mode == "full" else "selective"
        measured, formula = [], []
        for b in sim.blocks:
            if b.name not in names:
                continue
            m = measured_mode(profile, b, mode)
            b.mode = mode
            if m is not None:
                measured.append(b.name)
                b.kept_bytes = b.input_bytes if mode == "recompute" else b.input_bytes + m.mode.kept_bytes * m.scale
                b.bwd_extra_bytes = m.extra_bwd_peak()
                b.recompute_s = m.recompute_s()
                continue
            formula.append(b.name)
            if mode == "recompute":
                b.kept_bytes = b.input_bytes
                b.bwd_extra_bytes = b.act_bytes
                b.recompute_s = b.fwd_s
            else:
                b.kept_bytes = b.input_bytes + SELECTIVE_KEEP * b.act_bytes
                b.bwd_extra_bytes = (1 - SELECTIVE_KEEP) * b.act_bytes
                b.recompute_s = SELECTIVE_RECOMPUTE * b.fwd_s
        how = ("the activations again in backward and one more forward" if mode == "recompute" else
               f"{SELECTIVE_KEEP:.0%} of the activations kept, {SELECTIVE_RECOMPUTE:.0%} of the forward recomputed")
        note_sources(sim, f"checkpoint ({mode})", measured, formula, f"formula: {how}")

    def apply(self, ctx: ApplyContext, config: CheckpointConfig) -> Undo:
        names = ctx.layout.names(*RECOMPUTE)
        mode = config.mode
        hf_off = 0
        with Undos() as undos:
            for name in names:
                mod = ctx.module(name)
                off = hf_checkpointing_off(mod)
                if off is not None:
                    undos.add(off)
                    hf_off += 1
                undos.add(wrap_forward(mod, lambda f, _m=mode: checkpointed(f, _m)))
        ctx.note(self.name, f"{mode} checkpointing on {len(names)} block(s): {_short(names)}")
        if hf_off:
            ctx.note(self.name, f"transformers' gradient checkpointing was on: switched off on the {hf_off} "
                                "block(s) memtune checkpoints (never both)")
        return undos


def _short(names: list[str], n: int = 4) -> str:
    return ", ".join(names) if len(names) <= n else f"{', '.join(names[:2])}, ..., {names[-1]}"
