"""The simulated step: the dataclasses strategies' `effect()` write and the simulator reads.

`build_sim(profile, batch_size)` (build.py) fills a `SimStep` as the profile measured it; each plan section's
strategy `effect(profile, config, sim)` then changes it, in strategy order; `simulate(sim)` (timeline.py)
walks the timeline (forward keeps each block's `kept_bytes`; backward re-materializes `bwd_extra_bytes`,
frees the block's activations and creates its gradients; the optimizer step adds its transient) and returns
an `Estimate`. An effect that used a measurement of the user's own run rather than a formula says so with
`sim.source(what, how)`; the Estimate carries those lines (`sources`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class BlockSim:
    name: str
    kind: str = "repeated"  # "repeated" or "other"
    act_bytes: float = 0.0  # saved for backward by the unmodified block (profile)
    input_bytes: float = 0.0
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    fwd_transient: float = 0.0
    bwd_transient: float = 0.0
    param_bytes: float = 0.0  # device-resident parameter bytes of this block
    grad_bytes: float = 0.0  # gradient bytes created in its backward
    # --- set by strategies' effect() ---
    mode: str = "keep"  # keep | recompute | selective | offload | compress | compress+offload
    kept_bytes: float | None = None  # on device from its forward to its backward; None -> act_bytes
    bwd_extra_bytes: float = 0.0  # extra live bytes during its backward (re-materialized activations)
    recompute_s: float = 0.0  # extra forward time during backward
    d2h_bytes: float = 0.0  # copied to the host during forward (overlaps later blocks' forward)
    h2d_bytes: float = 0.0  # copied back during backward (prefetched one block ahead)
    extra_fwd_s: float = 0.0  # kernel time added to forward (e.g. compression pack)
    extra_bwd_s: float = 0.0  # kernel time added to backward (e.g. unpack)
    gather_bytes: float = 0.0  # transient all-gathered parameters while it runs (sharding stage 3)
    # part of act_bytes that is autocast's 16-bit copies of fp32 weights (batch-independent); a strategy
    # that makes the weights 16-bit removes it with `drop_autocast_copies(sim)`
    autocast_copy_bytes: float = 0.0
    # the part of those copies autocast's cache holds until its region ends: casts of weights that require
    # grad (it caches only leaf tensors that do) [amp]; a frozen weight's copy goes with its block's graph
    autocast_cached_bytes: float = 0.0

    @property
    def kept(self) -> float:
        return self.act_bytes if self.kept_bytes is None else self.kept_bytes


@dataclass
class SimStep:
    blocks: list[BlockSim] = field(default_factory=list)
    param_bytes: float = 0.0  # device-resident parameters (all blocks + anything outside blocks)
    master_bytes: float = 0.0  # fp32 master copies kept on device (precision)
    buffer_bytes: float = 0.0
    other_model_bytes: float = 0.0  # modules no optimizer trains (EMA copy, frozen teacher): constant
    grad_bytes: float = 0.0  # all gradients, if they all coexist before the optimizer step
    grads_persist: bool = False  # gradients allocated for the whole step (set_to_none=False, accumulation)
    grads_freed_in_backward: bool = False  # update in backward: each gradient consumed at once
    # precision `cast: autocast`: bytes of fp32 gradients (the script's) of weights that compute in 16 bits;
    # their 16-bit values (half) are what an offload streaming gradients sends down
    cast_grad_bytes: float = 0.0
    opt_state_bytes: float = 0.0  # on device
    opt_state_host_bytes: float = 0.0  # optimizer state offloaded to pinned host memory
    host_bytes: float = 0.0  # other host memory a plan holds: gradient buffers, masters, streamed weights
    # on the device when the plan is applied (the model as the script placed it, before the first step):
    # the whole run's peak counts it; 0 = not modelled (placement sets it)
    load_bytes: float = 0.0
    opt_transient_bytes: float = 0.0  # extra live bytes during optimizer.step()
    opt_s: float = 0.0  # optimizer step seconds not hidden behind anything
    opt_overlap_s: float = 0.0  # optimizer work that overlaps the backward (offloaded CPU update)
    # an offloaded update that starts on each chunk as its gradients arrive: how long before the backward's end
    # the script called step() (measured, the profile's `backward_lag_s`), and the update's host seconds;
    # None: the update starts after the backward
    opt_ahead_s: float | None = None
    opt_host_s: float = 0.0
    opt_tail_bytes: float = 0.0  # the weights the last chunk of that update copies up
    opt_tail_share: float = 0.0  # the share of the update that chunk is
    # how far the script's host ran ahead of the GPU when the backward ended (the profile's `backward_lag_s`;
    # 0: not measured): an offloaded block nobody prefetches asks for its tensors when the autograd engine
    # reaches it on the host, that much before the GPU does by the backward's end
    cpu_ahead_s: float = 0.0
    # a torch.compile'd model, profiled eagerly, measured compiled (build.py `_compiled_factors`): what its
    # blocks that run compiled (not offloaded or compressed: saved-tensor hooks run those eagerly) save and
    # take per byte and second of the eager profile
    compiled_act_k: float = 1.0
    compiled_time_k: float = 1.0
    opt_h2d_bytes: float = 0.0  # per-step transfers of an offloaded optimizer
    opt_d2h_bytes: float = 0.0
    other_act_bytes: float = 0.0  # saved for backward outside every block (loss etc.)
    other_act_before_bytes: float = 0.0  # the part of it saved before the blocks: kept to the end of backward
    loss_transient_bytes: float = 0.0  # live at the loss, on top of the kept activations
    fixed_bytes: float = 0.0  # inputs/labels and whatever else sits on device at step start
    calib_bytes: float = 0.0  # what the profile's measured peak leaves unexplained (allocator, workspace)
    output_bytes: float = 0.0  # the model's output (logits): live from the end of forward into the loss
    # how far the measured peak before backward (the loss's forward, autocast's weight copies still cached)
    # lay under the modelled loss event in the unchanged step; None when the profile did not measure it
    loss_fwd_gap_bytes: float | None = None
    other_s: float = 0.0  # step time outside blocks and optimizer (data loading, loss, glue)
    extra_s: float = 0.0  # time added by strategies outside any block
    # host seconds offload's pack/unpack hooks add beyond the host's lead over the GPU: the host runs them while
    # the GPU waits on the copies, so the step pays only what the copies' exposed time does not cover
    host_hooks_s: float = 0.0
    comm_s: float = 0.0  # communication not hidden (sharding)
    h2d_gbps: float = 0.0
    d2h_gbps: float = 0.0
    world_size: int = 1
    micro_batches: int = 1  # forwards+backwards per optimizer step
    batch_size: int | None = None
    tokens_per_step: int | None = None
    lossy: list[str] = field(default_factory=list)  # sections that change the numbers
    notes: list[str] = field(default_factory=list)  # explanations a person reads in `estimate`
    # what each effect was computed from: {"recompute": "measured on blocks.0 (Block)", ...}
    sources: dict[str, str] = field(default_factory=dict)

    def source(self, what: str, how: str) -> None:
        """Record where an effect's numbers came from ("measured ..." or "formula: ...")."""
        self.sources[what] = how


@dataclass
class Estimate:
    peak_bytes: float
    peak_phase: str  # "forward", "loss", "backward", "optimizer"
    peak_where: str | None  # block at the peak, when any
    step_s: float
    throughput: float  # samples/s when the batch size is known, else steps/s
    throughput_unit: str  # "samples/s" or "steps/s"
    breakdown: dict[str, float]  # bytes at the peak by component
    time_breakdown: dict[str, float] = field(default_factory=dict)
    timeline: list[tuple[str, float]] = field(default_factory=list)  # (event, live bytes) over one step
    host_bytes: float = 0.0  # pinned host memory the plan needs
    lossy: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)
