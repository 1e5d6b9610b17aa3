"""Offload to host memory: the saved activations of chosen blocks, and the optimizer state (ZeRO-Offload style).

Plan section: `offload: {activations: [0, 1, "2-5"] | all, optimizer_state: true | false}`.

- `transport.py`: how bytes move (pinned buffers, one side stream per direction; a CPU stand-in for tests).
- `activations.py`: the transport stage of the saved-tensor pipeline for offloaded blocks; a block that
  `compress` also handles is packed by the codec first, then its compressed bytes go to the host.
- `optimizer_state.py`: optimizer state on the host, the update on the CPU, gradients down and parameters
  back overlapped with compute.

Needs a CUDA GPU; `simulate_host()` (tests) runs the same logic on CPU with plain clones as "host" copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memtune.blocks import refs_to_yaml, validate_block_refs
from memtune.costmodel import measured_mode, note_sources
from memtune.errors import EnvironmentNotSupported, PlanError
from memtune.plan import SectionConfig, check_bool, check_keys
from memtune.strategies.base import ApplyContext, PlanFacts, Strategy, register
from memtune.strategies.checkpoint import hf_checkpointing_off
from memtune.strategies.layout import COMPRESSED, OFFLOADED, compact
from memtune.strategies.offload import transport as _transport
from memtune.strategies.offload.activations import ActivationOffloader
from memtune.strategies.offload.optimizer_state import (
    CHUNK_BYTES,
    CLIP_ON_HOST,
    HOST_UPDATE_GBPS,
    OptimizerOffload,
    install_clip_patch,
)
from memtune.strategies.offload.transport import (
    NO_GPU,
    CloneTransport,
    CudaTransport,
    make_transport,
    simulate_host,
)
from memtune.undo import Undo, Undos, noop

__all__ = ["CHUNK_BYTES", "CLIP_ON_HOST", "HOST_UPDATE_GBPS", "ActivationOffloader", "CloneTransport",
           "CudaTransport", "Offload", "OffloadConfig", "OptimizerOffload", "install_clip_patch", "make_transport",
           "simulate_host"]

KEYS = {"activations": "blocks whose saved activations go to host memory (all, indices, 'a-b', paths)",
        "optimizer_state": "true: optimizer state on the host, update on the CPU"}


@dataclass(frozen=True)
class OffloadConfig(SectionConfig):
    activations: tuple[int | str, ...] | str = ()
    optimizer_state: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"activations": refs_to_yaml(self.activations), "optimizer_state": self.optimizer_state}

    def describe(self) -> str:
        parts = []
        if self.activations:
            parts.append(f"activations of blocks {refs_to_yaml(self.activations)}")
        if self.optimizer_state:
            parts.append("optimizer state (CPU update)")
        return "offload " + " and ".join(parts)


@register
class Offload(Strategy):
    name = "offload"
    order = 70
    summary = "saved activations and/or optimizer state in pinned host memory, overlapped with compute"

    def validate(self, section: Any) -> OffloadConfig:
        if not isinstance(section, dict):
            raise PlanError("offload: write it as {activations: [blocks], optimizer_state: true|false}")
        check_keys(section, KEYS, "offload")
        acts = section.get("activations", [])
        acts = validate_block_refs(acts, "offload.activations") if acts not in (None, [], False) else ()
        opt = section.get("optimizer_state", False)
        check_bool(opt, "offload.optimizer_state")
        if not acts and not opt:
            raise PlanError("offload: nothing to offload; give `activations` blocks and/or `optimizer_state: true`")
        return OffloadConfig(activations=acts, optimizer_state=opt)

    def block_modes(self, config: OffloadConfig) -> dict[str, Any]:
        return {"offload": config.activations} if config.activations else {}

    def declare(self, config: OffloadConfig, facts: PlanFacts) -> None:
        facts.update_on_host = facts.update_on_host or config.optimizer_state

    def conflicts(self, config: OffloadConfig, facts: PlanFacts) -> list[str]:
        oname = facts.optimizer
        if config.optimizer_state and oname not in (None, "adamw", "adafactor", "inbackward"):
            # (inbackward: the optimizer section reports that one itself)
            return [f"offload.optimizer_state runs the update on the CPU; optimizer {oname!r} keeps its state "
                    "in device kernels: drop one of the two, or use optimizer adamw/adafactor"]
        return []

    def preflight(self, config: OffloadConfig, device: torch.device | None) -> None:
        if _transport.simulated():
            return
        if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
            raise EnvironmentNotSupported(NO_GPU)

    def space(self, trial: Any, profile: Any, layout: Any, opts: Any) -> dict[str, Any] | None:
        if opts.device != "cuda":
            return None
        acts = compact(layout.blocks(*OFFLOADED), len(profile.repeated_blocks))
        opt_state = trial.suggest_categorical("offload.optimizer_state", [False, True])
        if not acts and not opt_state:
            return None
        return {"activations": acts, "optimizer_state": opt_state}

    def effect(self, profile: Any, config: OffloadConfig, sim: Any) -> None:
        """Offloaded blocks keep only what the transport leaves on the device [offl]; their copies run on the
        copy engines at the measured pinned bandwidth (the simulator hides what the compute covers). What a
        block's saved tensors really send comes from the profiler's measurement of this block's class
        offloaded [whatif] when it has one. The optimizer update
        runs on the host at the profile's measured rate for the script's optimizer, else a default rate."""
        if config.activations:
            names = set(profile.resolve_blocks(config.activations, "offload.activations"))
            measured, formula = [], []
            prev_moved = 0.0
            for b in sim.blocks:
                if b.name not in names:
                    continue
                m = measured_mode(profile, b, "offload")
                moved = b.kept  # compressed size when compress ran first
                if m is not None and m.block.activation_bytes > 0:
                    # what the transport really moves (small tensors stay); its time alone is not used: a block
                    # offloaded on its own cannot hide its copies, and the first pinned allocations of a
                    # process dominate it (H200, the zoo, 2026-12-01: 100-1000 ms against +10-60 ms in the run)
                    measured.append(b.name)
                    moved *= min(1.0, m.mode.moved_bytes / m.block.activation_bytes)
                else:
                    formula.append(b.name)
                b.mode = "compress+offload" if b.mode == "compress" else "offload"
                b.d2h_bytes = b.h2d_bytes = moved
                b.kept_bytes = max(0.0, b.kept - moved)
                # in its backward its tensors are back, and so are those of the offloaded block before it,
                # prefetched one block ahead (activations.py)
                b.bwd_extra_bytes = max(b.bwd_extra_bytes, moved + prev_moved)
                prev_moved = moved
            note_sources(sim, "offload (activations)", measured, formula, "formula: every saved byte moves, no overhead")
        if config.optimizer_state:
            n_params = sum(o.n_params for o in profile.optimizers) or profile.trainable_param_bytes / 4
            sim.opt_state_host_bytes += sim.opt_state_bytes + sim.master_bytes
            sim.opt_state_bytes = 0.0
            sim.master_bytes = 0.0
            sim.opt_transient_bytes = 0.0
            sim.opt_d2h_bytes = sim.grad_bytes
            sim.opt_h2d_bytes = sim.param_bytes
            rate = profile.hardware.host_update_params_per_s
            if rate:
                cpu_s = n_params / rate
                sim.source("offload (optimizer state)", f"host update measured on this host: {rate / 1e9:.2f}G "
                                                        "params/s with the script's optimizer")
            else:
                cpu_s = n_params * 28 / (HOST_UPDATE_GBPS * 1e9)
                sim.source("offload (optimizer state)", f"formula: host update at {HOST_UPDATE_GBPS:g} GB/s of "
                                                        "state traffic (28 B/param, AdamW; H100 host)")
            h2d_s = sim.param_bytes / (sim.h2d_gbps * 1e9) if sim.h2d_gbps else 0.0
            d2h_s = sim.grad_bytes / (sim.d2h_gbps * 1e9) if sim.d2h_gbps else 0.0
            sim.opt_s = max(cpu_s, h2d_s)  # pipelined per chunk: the slower of CPU update and copy-back
            sim.opt_overlap_s = d2h_s  # gradients go down during the backward

    def install(self, config: OffloadConfig, session: Any) -> Undo:
        if config.optimizer_state:
            return install_clip_patch()  # before the script binds `from torch.nn.utils import clip_grad_norm_`
        return noop

    def apply(self, ctx: ApplyContext, config: OffloadConfig) -> Undo:
        self.preflight(config, ctx.device)
        transport = make_transport(ctx.device)
        with Undos() as undos:
            if config.activations:
                self._activations(ctx, transport, undos)
            if config.optimizer_state:
                self._optimizer_state(ctx, transport, undos)
        return undos

    def _activations(self, ctx: ApplyContext, transport: Any, undos: Undos) -> None:
        names = ctx.layout.names(*OFFLOADED)
        storages = {p.untyped_storage().data_ptr() for p in ctx.model.parameters()}
        storages |= {b.untyped_storage().data_ptr() for b in ctx.model.buffers()}
        off = ActivationOffloader(transport, ctx.device, storages)
        hf = 0
        for name in names:
            u = hf_checkpointing_off(ctx.module(name))
            if u is not None:
                undos.add(u)
                hf += 1
        undos.add(ctx.saved_tensors.add_transport(names, off), "offload")
        ctx.activation_offloader = off
        withc = [n for n in names if ctx.layout.mode(n) in COMPRESSED]
        ctx.note(self.name, f"activations of {len(names)} block(s) to pinned host memory, prefetched one "
                            f"block ahead in backward" + (f"; {len(withc)} compressed first" if withc else ""))
        if hf:
            ctx.note(self.name, f"transformers' gradient checkpointing switched off on the {hf} offloaded "
                                "block(s) (a block is recomputed or offloaded, not both)")

    def _optimizer_state(self, ctx: ApplyContext, transport: Any, undos: Undos) -> None:
        masters = ctx.master_params
        undos.add(install_clip_patch())  # no-op when `install` already patched it
        for opt in ctx.optimizers:
            o = OptimizerOffload(opt, transport, masters)
            undos.add(lambda o=o: o.undo(restore_state=not ctx.run_over), "offload")
            ctx.optimizer_offloads.append(o)
            n = sum(p.numel() for p in o.params)
            how = "fused CPU kernel" if o.overrides else f"{type(opt).__name__}'s own CPU code"
            ctx.note(self.name, f"{type(opt).__name__} state of {n / 1e6:.1f}M params on the host, update on "
                                f"the CPU ({how})" + ("; fp32 master weights on the host" if masters else "")
                                + ("; clip_grad_norm_'s coefficient applied to the host copy"
                                   if o.clip_on_host else ""))
