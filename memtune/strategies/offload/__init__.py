"""Offload to host memory: saved activations, the optimizer state and its update (ZeRO-Offload style),
gradients as they are produced, and whole blocks' weights between their uses.

Plan section:

```yaml
offload:
  activations: [0, 1, "2-5"] | all   # saved tensors of these blocks go to the host in forward
  optimizer_state: true              # optimizer state (and fp32 masters) on the host, the update on the CPU
  gradients: true                    # each gradient to the host as backward produces it, none kept (needs optimizer_state)
  params: all | [blocks]             # these (recomputed) blocks' weights live on the host, streamed in (needs gradients)
  prefetch: 1                        # blocks of weights fetched ahead (params)
  schedule: exact | delayed          # delayed: one-step-delayed update overlapped with the next step (LOSSY)
```

- `transport.py`: how bytes move (pinned buffers, one side stream per direction; a CPU stand-in for tests).
- `activations.py`: the transport stage of the saved-tensor pipeline for offloaded blocks; a block that
  `compress` also handles is packed by the codec first, then its compressed bytes go to the host.
- `optimizer_state.py`: optimizer state on the host, the update on the CPU, gradients down and parameters
  back overlapped with compute; the exact and the delayed schedule.
- `gradients.py`: gradients streamed to the host in backward, accumulated, unscaled and clipped there.
- `params.py`: weights of recomputed blocks streamed from the host, prefetched ahead in forward and backward.
- `costs.py`: what these mechanisms do to the simulated step (bytes, PCIe traffic, exposed time, host RAM).

Needs a CUDA GPU; `simulate_host()` (tests) runs the same logic on CPU with plain clones as "host" copies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from memtune.blocks import refs_to_yaml, resolve_block_refs, validate_block_refs
from memtune.costmodel import measured_mode, note_sources
from memtune.errors import EnvironmentNotSupported, PlanError
from memtune.plan import SectionConfig, check_bool, check_choice, check_keys
from memtune.strategies.base import ApplyContext, PlanFacts, Strategy, register
from memtune.strategies.checkpoint import hf_checkpointing_off
from memtune.strategies.layout import COMPRESSED, OFFLOADED, RECOMPUTE, compact
from memtune.strategies.offload import costs as _costs
from memtune.strategies.offload import transport as _transport
from memtune.strategies.offload.activations import ActivationOffloader
from memtune.strategies.offload.gradients import HostGradients
from memtune.strategies.offload.optimizer_state import (
    CHUNK_BYTES,
    CLIP_ON_HOST,
    HOST_UPDATE_GBPS,
    SCHEDULES,
    OptimizerOffload,
    install_clip_patch,
)
from memtune.strategies.offload.params import ParamStreamer
from memtune.strategies.offload.transport import (
    NO_GPU,
    CloneTransport,
    CudaTransport,
    make_transport,
    simulate_host,
)
from memtune.undo import Undo, Undos, noop, replace_on_instance

__all__ = ["CHUNK_BYTES", "CLIP_ON_HOST", "HOST_UPDATE_GBPS", "ActivationOffloader", "CloneTransport",
           "CudaTransport", "HostGradients", "Offload", "OffloadConfig", "OptimizerOffload", "ParamStreamer",
           "install_clip_patch", "make_transport", "simulate_host"]

KEYS = {"activations": "blocks whose saved activations go to host memory (all, indices, 'a-b', paths)",
        "optimizer_state": "true: optimizer state on the host, update on the CPU",
        "gradients": "true: each gradient to pinned host memory as backward produces it (needs optimizer_state)",
        "params": "recomputed blocks whose weights live on the host and are streamed in (needs gradients)",
        "prefetch": "blocks of weights fetched ahead when params are streamed (0-4, default 1)",
        "schedule": "exact (default) | delayed: one-step-delayed host update overlapped with the next step (lossy)"}
MAX_PREFETCH = 4


@dataclass(frozen=True)
class OffloadConfig(SectionConfig):
    activations: tuple[int | str, ...] | str = ()
    optimizer_state: bool = False
    gradients: bool = False
    params: tuple[int | str, ...] | str = ()
    prefetch: int = 1
    schedule: str = "exact"

    @property
    def lossy(self) -> bool:
        return self.schedule == "delayed"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"activations": refs_to_yaml(self.activations), "optimizer_state": self.optimizer_state}
        if self.gradients:  # (the keys a plan of the first two kinds has stay as they were)
            out["gradients"] = True
        if self.params:
            out["params"] = refs_to_yaml(self.params)
            out["prefetch"] = self.prefetch
        if self.schedule != "exact":
            out["schedule"] = self.schedule
        return out

    @property
    def new_path(self) -> bool:
        """Uses a mechanism beyond activations + the original optimizer-state offload."""
        return self.gradients or bool(self.params) or self.schedule != "exact"

    def describe(self) -> str:
        parts = []
        if self.activations:
            parts.append(f"activations of blocks {refs_to_yaml(self.activations)}")
        if self.optimizer_state:
            parts.append("optimizer state (CPU update" + (", delayed one step" if self.schedule == "delayed" else "")
                         + ")")
        if self.gradients:
            parts.append("gradients as produced")
        if self.params:
            parts.append(f"weights of blocks {refs_to_yaml(self.params)} (prefetch {self.prefetch})")
        return "offload " + ", ".join(parts)


def _one_compile_thread() -> Undo:
    """inductor compiles in one process while the host runs the optimizer update: its pool of compile workers
    (one per core, kept a minute after compiling) slowed the update of a compiled 554M-param model from 191 to
    928 ms per step (zoo compiled, H200 host of 16 cores, device call 26; the compile itself was no slower).
    A TORCHINDUCTOR_COMPILE_THREADS the user set is theirs."""
    if "TORCHINDUCTOR_COMPILE_THREADS" in os.environ:
        return noop
    try:
        import torch._inductor.config as inductor_config
    except ImportError:  # a torch without inductor compiles nothing here
        return noop
    was = inductor_config.compile_threads
    inductor_config.compile_threads = 1

    def undo() -> None:
        inductor_config.compile_threads = was

    return undo


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
        grads = section.get("gradients", False)
        check_bool(grads, "offload.gradients")
        params = section.get("params", [])
        params = validate_block_refs(params, "offload.params") if params not in (None, [], False) else ()
        prefetch = check_choice(section.get("prefetch", 1), tuple(range(MAX_PREFETCH + 1)), "offload.prefetch")
        schedule = check_choice(section.get("schedule", "exact"), SCHEDULES, "offload.schedule")
        if not acts and not opt:
            raise PlanError("offload: nothing to offload; give `activations` blocks and/or `optimizer_state: true`")
        if grads and not opt:
            raise PlanError("offload.gradients needs `optimizer_state: true`: the host gradients feed the host "
                            "update (a device update would need them back)")
        if params and not grads:
            raise PlanError("offload.params needs `gradients: true` (and `optimizer_state: true`): a streamed "
                            "block's weights are updated on the host, from its gradients there")
        if schedule != "exact" and not opt:
            raise PlanError("offload.schedule applies to the host update: add `optimizer_state: true`")
        if schedule == "delayed" and params:
            raise PlanError("offload.schedule delayed updates the host weights while the next step reads "
                            "them; streamed weights (offload.params) would need a second host copy: drop one")
        return OffloadConfig(activations=acts, optimizer_state=opt, gradients=grads, params=params,
                             prefetch=prefetch, schedule=schedule)

    def block_modes(self, config: OffloadConfig) -> dict[str, Any]:
        return {"offload": config.activations} if config.activations else {}

    def declare(self, config: OffloadConfig, facts: PlanFacts) -> None:
        facts.update_on_host = facts.update_on_host or config.optimizer_state
        facts.grads_on_host = facts.grads_on_host or config.gradients
        facts.params_streamed = facts.params_streamed or bool(config.params)

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
        section: dict[str, Any] = {"activations": acts, "optimizer_state": opt_state}
        if opt_state and trial.suggest_categorical("offload.gradients", [False, True]):
            section["gradients"] = True
            recomputed = compact(layout.blocks("recompute"), len(profile.repeated_blocks))
            if recomputed and trial.suggest_categorical("offload.params", [False, True]):
                section["params"] = recomputed  # the recomputed blocks (the last ones checkpoint takes)
                section["prefetch"] = trial.suggest_int("offload.prefetch", 1, 2)
        if opt_state and not section.get("params") and not opts.lossless_only \
                and trial.suggest_categorical("offload.schedule", ["exact", "delayed"]) == "delayed":
            section["schedule"] = "delayed"
        return section

    def memory_seed(self, profile: Any, opts: Any) -> dict[str, Any]:
        """Everything on the host the exact schedule allows: state, gradients, the recomputed blocks' weights."""
        return {"offload.optimizer_state": True, "offload.gradients": True, "offload.params": True,
                "offload.prefetch": 1, "offload.schedule": "exact"}

    def effect(self, profile: Any, config: OffloadConfig, sim: Any) -> None:
        """Offloaded blocks keep only what the transport leaves on the device [offl]; their copies run on the
        copy engines at the measured pinned bandwidth (the simulator hides what the compute covers). What a
        block's saved tensors really send comes from the profiler's measurement of this block's class
        offloaded [whatif] when it has one. The optimizer update
        runs on the host at the profile's measured rate for the script's optimizer, else a default rate."""
        if config.activations:
            names = set(profile.resolve_blocks(config.activations, "offload.activations"))
            measured, formula = [], []
            host_s = 0.0  # host seconds the hooks of offloaded blocks add per micro-batch (measured ones)
            prev_moved = 0.0  # what the repeated block that ran just before sent down (0: not offloaded)
            for b in sim.blocks:
                if b.name not in names:
                    if b.kind == "repeated":
                        # its backward brings back the offloaded block that ran just before it (activations.py)
                        b.bwd_extra_bytes += prev_moved
                        prev_moved = 0.0
                    continue
                m = measured_mode(profile, b, "offload")
                moved = b.kept  # compressed size when compress ran first
                if m is not None and m.block.activation_bytes > 0:
                    # what the transport really moves and leaves (small tensors stay); its time alone is not
                    # used: a block offloaded on its own cannot hide its copies, and the first pinned
                    # allocations of a process dominate it (H200, the zoo, 2026-12-01: 100-1000 ms against
                    # +10-60 ms in the run). Saved tensors that share a storage (views; an in-place ReLU's
                    # output saved by the next conv) go down and come back once each, so a plain block can
                    # move more than it saved (torchvision Bottleneck 1.31x, ViT block 1.05x, H200 zoo); codes
                    # of a compressed block are their own tensors.
                    measured.append(b.name)
                    host_s += m.extra_host_s() or 0.0
                    kept = b.kept * m.kept_share()
                    moved *= m.moved_share(cap=b.mode == "compress")
                else:
                    formula.append(b.name)
                    kept = 0.0  # formula: every saved byte moves
                b.mode = "compress+offload" if b.mode == "compress" else "offload"
                b.d2h_bytes = b.h2d_bytes = moved
                b.kept_bytes = kept
                # in its backward its tensors are back, and so are those of the offloaded block before it,
                # prefetched one block ahead (activations.py)
                b.bwd_extra_bytes = max(b.bwd_extra_bytes, moved + prev_moved)
                prev_moved = moved
            note_sources(sim, "offload (activations)", measured, formula, "formula: every saved byte moves, no overhead")
            if host_s > 0:
                # pack and unpack run on the host, ~0.2 ms per tensor moved (H200 host, torch 2.11: T5 and MoE
                # spent 63 and 80 ms per step in them, benchmarks/transport_costs.py 0.23 ms a tensor). What the
                # host's lead over the GPU cannot absorb delays the step, but it runs while the GPU waits on
                # the copies, so the simulator charges the larger of the two (H200 zoo, profile and rows in one
                # call: HF Trainer +43% -> +0.6%, MoE +6.9% -> +1.0% against their sum)
                lead = float(profile.extra.get("backward_lag_s") or 0.0)
                shown = max(0.0, host_s * sim.micro_batches - lead)
                sim.host_hooks_s += shown
                sim.source("offload (host time)", f"measured: the hooks add {host_s * 1e3:.1f} ms of host time per "
                                                  f"forward and backward; {shown * 1e3:.1f} ms beyond the host's "
                                                  f"{lead * 1e3:.1f} ms lead over the GPU, paid where longer than "
                                                  "the copies' exposed time")
        if config.optimizer_state and config.new_path:
            _costs.host_update(profile, config, sim)
        elif config.optimizer_state:
            n_params = sum(o.n_params for o in profile.optimizers) or profile.trainable_param_bytes / 4
            masters = sim.master_bytes
            sim.opt_state_host_bytes += sim.opt_state_bytes + sim.master_bytes
            sim.opt_state_bytes = 0.0
            sim.master_bytes = 0.0
            sim.opt_transient_bytes = 0.0
            sim.opt_d2h_bytes = sim.grad_bytes
            # the update writes back the optimizer's parameters only (16-bit where they have fp32 masters), not
            # the frozen ones: all of them made a 7.5 GB frozen-base LoRA's step 80 ms longer than measured
            # (H200 zoo peft_lora, predicted 308 against 241 ms)
            opt_bytes = sum(o.param_bytes for o in profile.optimizers) or profile.trainable_param_bytes
            sim.opt_h2d_bytes = min(sim.param_bytes, max(0.0, opt_bytes - masters / 2))
            rate = profile.hardware.host_update_params_per_s
            if rate:
                cpu_s = n_params / rate
                sim.source("offload (optimizer state)", f"host update measured on this host: {rate / 1e9:.2f}G "
                                                        "params/s with the script's optimizer")
            else:
                cpu_s = n_params * 28 / (HOST_UPDATE_GBPS * 1e9)
                sim.source("offload (optimizer state)", f"formula: host update at {HOST_UPDATE_GBPS:g} GB/s of "
                                                        "state traffic (28 B/param, AdamW; H100 host)")
            h2d_s = sim.opt_h2d_bytes / (sim.h2d_gbps * 1e9) if sim.h2d_gbps else 0.0
            d2h_s = sim.grad_bytes / (sim.d2h_gbps * 1e9) if sim.d2h_gbps else 0.0
            sim.opt_s = max(cpu_s, h2d_s)  # pipelined per chunk: the slower of CPU update and copy-back
            sim.opt_overlap_s = d2h_s  # gradients go down during the backward
            ahead = profile.extra.get("backward_lag_s")
            # a compiled backward is one graph: every gradient lands at its end, none while it runs
            compiled = profile.extra.get("compiled") is not None
            if ahead is not None and profile.extra.get("clip_grad_norm") is None and not profile.grad_scaler \
                    and not compiled:
                # nothing needs every gradient first: each chunk updates once its gradients are down, while
                # the GPU still runs the backward the script already queued (H200 zoo vit, no clipping: 8 ms
                # over the baseline measured with a 44 ms update, 35 ms predicted without this)
                sim.opt_ahead_s, sim.opt_host_s = float(ahead), cpu_s
                sim.opt_tail_bytes = min(sim.opt_h2d_bytes, CHUNK_BYTES)
                sim.opt_tail_share = min(1.0, CHUNK_BYTES / max(4.0 * n_params, 1.0))  # fp32 host copies
                sim.source("offload (update beside backward)", f"measured: step() called {ahead * 1e3:.0f} ms "
                                                               "before the GPU finished the backward")

    def install(self, config: OffloadConfig, session: Any) -> Undo:
        if config.optimizer_state:
            with Undos() as undos:
                undos.add(install_clip_patch())  # before the script binds `from torch.nn.utils import clip_grad_norm_`
                undos.add(_one_compile_thread())
            return undos
        return noop

    def apply(self, ctx: ApplyContext, config: OffloadConfig) -> Undo:
        self.preflight(config, ctx.device)
        transport = make_transport(ctx.device)
        with Undos() as undos:
            if config.activations:
                self._activations(ctx, transport, undos)
            if config.optimizer_state:
                self._optimizer_state(ctx, transport, undos, config)
            if config.params:
                self._params(ctx, transport, undos, config)
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

    def _optimizer_state(self, ctx: ApplyContext, transport: Any, undos: Undos, config: OffloadConfig) -> None:
        undos.add(install_clip_patch())  # no-op when `install` already patched it
        order = self._forward_order(ctx) if config.gradients and config.schedule == "exact" else None
        for opt in ctx.optimizers:
            undos.add(self._offload_one(ctx, transport, config, opt, order), "offload")
        if order is not None:
            undos.add(self._forward_waits(ctx), "offload")
            ctx.note(self.name, "the exact host update overlaps the next forward: weights outside the repeated "
                                "blocks first, then block by block, each block's forward waiting for its own")
        if config.gradients:
            undos.add(self._model_zero_grad(ctx), "offload")
            ctx.note(self.name, "gradients copied to pinned host memory as backward produces them and dropped on "
                                "the device; accumulated, unscaled and clipped on the host")

    def _offload_one(self, ctx: ApplyContext, transport: Any, config: OffloadConfig, opt: Any,
                     order: list[list[torch.Tensor]] | None) -> Undo:
        masters = ctx.master_params
        o = OptimizerOffload(opt, transport, masters, gradients=config.gradients,
                             ref_dtypes=ctx.reference_grad_dtypes, schedule=config.schedule, update_order=order)

        def undo() -> None:
            ctx.note(self.name, o.summary())
            o.undo(restore_state=not ctx.run_over)

        ctx.optimizer_offloads.append(o)
        n = sum(p.numel() for p in o.params)
        how = "fused CPU kernel" if o.overrides else f"{type(opt).__name__}'s own CPU code"
        ctx.note(self.name, f"{type(opt).__name__} state of {n / 1e6:.1f}M params on the host, update on "
                            f"the CPU ({how}, {config.schedule} schedule)"
                            + ("; fp32 master weights on the host" if masters else "")
                            + ("; clip_grad_norm_'s coefficient applied to the host copy"
                               if o.clip_on_host and not config.gradients else ""))
        return undo

    def add_optimizer(self, ctx: ApplyContext, config: OffloadConfig, optimizer: Any) -> Undo:
        """A second optimizer (a GAN's generator's): its state goes to the host too, as the cost model counts
        every optimizer's (gan on an H200: only the first was offloaded, measured peak 3.9% over)."""
        if not config.optimizer_state or any(o.opt is optimizer for o in ctx.optimizer_offloads):
            return noop
        # its update runs after its own gradients, not in the first model's forward order
        return self._offload_one(ctx, make_transport(ctx.device), config, optimizer, None)

    @staticmethod
    def _forward_order(ctx: ApplyContext) -> list[list[torch.Tensor]]:
        """The update's groups in forward order: the weights outside the repeated blocks (the model's own
        forward waits for them), then each repeated block's."""
        blocks = [ctx.module(n) for n in ctx.repeated]
        inside = {id(p) for m in blocks for p in m.parameters()}
        return [[p for p in ctx.model.parameters() if id(p) not in inside]] + [list(m.parameters()) for m in blocks]

    @staticmethod
    def _forward_waits(ctx: ApplyContext) -> Undo:
        """Forward pre-hooks: the model waits for group 0, each repeated block for its group; state_dict
        waits for all."""
        offs = [o for o in ctx.optimizer_offloads if o.order is not None]

        def wait(i: int, *_: Any) -> None:
            for o in offs:
                o.wait_group(i)

        def wait_all(*_: Any) -> None:
            for o in offs:
                o.wait_all()

        hs = [ctx.model.register_forward_pre_hook(lambda m, a: wait(0))]
        hs += [ctx.module(n).register_forward_pre_hook(lambda m, a, i=i + 1: wait(i))
               for i, n in enumerate(ctx.repeated)]
        hs.append(ctx.model.register_state_dict_pre_hook(wait_all))

        def undo() -> None:
            for h in hs:
                h.remove()

        return undo

    @staticmethod
    def _model_zero_grad(ctx: ApplyContext) -> Undo:
        """model.zero_grad() empties the host gradients too (it would empty the device ones)."""
        model, offs = ctx.model, list(ctx.optimizer_offloads)
        orig = model.zero_grad

        def zero_grad(*args, **kwargs):
            out = orig(*args, **kwargs)
            for o in offs:
                if o.hg is not None:
                    o.hg.reset()
            return out

        return replace_on_instance(model, "zero_grad", zero_grad)

    def _params(self, ctx: ApplyContext, transport: Any, undos: Undos, config: OffloadConfig) -> None:
        names = resolve_block_refs(config.params, ctx.repeated, ctx.block_names, "offload.params")
        bad = [n for n in names if ctx.layout.mode(n) not in RECOMPUTE]
        if bad:
            raise PlanError(f"offload.params streams the weights of recomputed blocks only; {bad[:3]} "
                            f"{'are' if len(bad) > 1 else 'is'} not checkpointed (a block keeping its activations "
                            "keeps views of its weights until its backward): add them to `checkpoint.blocks`")
        group = {n: i + 1 for i, n in enumerate(ctx.repeated)}
        offs = [o for o in ctx.optimizer_offloads if o.order is not None]

        def gate(name: str, wait: bool) -> bool:  # a fetch reads the host copy: after the update wrote it
            if not wait:
                return all(o.group_ready(group[name]) for o in offs)
            for o in offs:
                o.wait_group(group[name], stream=False)
            return True

        streamer = ParamStreamer([(n, ctx.module(n)) for n in names], transport, ctx.device, config.prefetch,
                                 gate=gate if offs else None)
        for o in ctx.optimizer_offloads:
            o.host_params.update({k: v for k, v in streamer.store.items() if k in o.ps})
            o.sync_versions()
        ctx.param_streamer = streamer

        def undo() -> None:
            if ctx.run_over:  # the script has ended: the weights stay on the host
                for h in streamer.handles:
                    h.remove()
                return
            streamer.remove()
            for o in ctx.optimizer_offloads:
                o.sync_versions()

        undos.add(undo, "offload")
        ctx.note(self.name, f"weights of {len(names)} recomputed block(s) ({streamer.bytes / 2**30:.2f} GiB) in "
                            f"pinned host memory, streamed in {config.prefetch} block(s) ahead in forward and "
                            "backward")
