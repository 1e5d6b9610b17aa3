"""What offload's host-update mechanisms do to the simulated step: gradients streamed to the host, the exact
and the delayed schedule of the host update, weights streamed from the host. (Activation offload and the
original optimizer-state offload keep their effect in `__init__.py`, unchanged.)

Sources: [offl] ZeRO-Offload (Ren et al. 2021): gradients go down during the backward, the update runs on the
CPU, the weights come back; its one-step delayed update hides the CPU behind the next step. [alloc] the
caching allocator frees a streamed gradient once its copy ran. Rates: the profile's measured pinned
bandwidth (`hardware.h2d_gbps`/`d2h_gbps`) and host update rate (`hardware.host_update_params_per_s`,
measured with the script's optimizer on fp32 tensors; `HOST_UPDATE_GBPS` when the profile has none).

What goes into the SimStep: `opt_s` (optimizer seconds not hidden, the gradient copies' exposed part
included), `extra_s` (weight fetches the compute did not hide), `host_bytes` / `opt_state_host_bytes` (host
RAM), the device's parameters, gradients and per-block transients; the PCIe bytes per step are noted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memtune.errors import PlanError

if TYPE_CHECKING:
    from memtune.costmodel import SimStep
    from memtune.profile import Profile

STATE_TRAFFIC = 28  # bytes a fused AdamW step moves per parameter (p, g, m, v read; p, m, v written)
# per parameter with an fp32 master and a 16-bit gradient: the gradient upcast into the chunk scratch (2 read,
# 4 written) and the updated master rounded into the 16-bit copy that goes up (4 read, 2 written); memory-bound
# at the rate the fused update moves bytes (the H100 host: 432 ms for 1.1B params with bf16 weights against
# 289 ms with fp32 ones, 1.49x, docs/strategies.md; 40/28 = 1.43x)
CAST_BYTES = 12
# the same with optimizer_state.py's sliced fused AdamW (torch AdamW with streamed gradients), its three passes
# on cache-sized slices: measured on the H200 machine's host as 2.9G params/s against 4.2G for the fused
# kernel alone (benchmarks/results/run12-13/host_update.json), 28 x (4.2 / 2.9 - 1) = 12.6 B/param. Where the
# profile measured the one-pass kernel (kernels/host_adamw.py, which runs instead where the host builds it),
# the masters' update is charged at its measured rate instead
SLICED_CAST_BYTES = 12
# accumulating one later micro-batch's gradient on the host: staging read (2, bf16), accumulator read and
# written (4 + 4, fp32)
ACCUMULATE_BYTES = 10

def host_rate(profile: Profile, sim: SimStep) -> float:
    """Parameters per second of the host update (the profile's measurement, else the default)."""
    from memtune.strategies.offload.optimizer_state import HOST_UPDATE_GBPS

    rate = profile.hardware.host_update_params_per_s
    if rate:
        sim.source("offload (host update)", f"measured on this host: {rate / 1e9:.2f}G params/s with the "
                                            "script's optimizer")
        return float(rate)
    sim.source("offload (host update)", f"formula: {HOST_UPDATE_GBPS:g} GB/s of state traffic (28 B/param, "
                                        "AdamW; the H100 host)")
    return HOST_UPDATE_GBPS * 1e9 / STATE_TRAFFIC


def _bw(gbps: float) -> float:
    return max(gbps, 1e-3) * 1e9


def host_update(profile: Profile, config: Any, sim: SimStep) -> None:
    """The optimizer on the host with streamed gradients, streamed weights or the delayed schedule."""
    m = max(1, sim.micro_batches)
    n = sum(o.n_params for o in profile.optimizers) or profile.trainable_param_bytes / 4
    rate = host_rate(profile, sim)
    host_bw = rate * STATE_TRAFFIC
    mastered = sim.master_bytes / 4  # elements with fp32 masters (a 16-bit copy on the device)
    params = sim.param_bytes  # device weights before streaming
    streamed = _stream_params(profile, config, sim) if config.params else 0.0

    # gradients: what goes down per micro-batch, in the device's dtype
    ref_grad = sim.grad_bytes  # the script's gradients (fp32 for cast: autocast weights)
    dev_grad = sim.grad_bytes - (sim.cast_grad_bytes / 2 if config.gradients else 0.0)
    fwd_mb = sum(b.fwd_s + b.extra_fwd_s for b in sim.blocks)
    bwd_mb = sum(b.bwd_s + b.recompute_s + b.extra_bwd_s for b in sim.blocks)
    d2h_mb = dev_grad / _bw(sim.d2h_gbps)
    exposed_d2h = m * max(0.0, d2h_mb - bwd_mb)
    exposed_acc = 0.0
    if config.gradients:
        ratio = dev_grad / sim.grad_bytes if sim.grad_bytes else 1.0
        for b in sim.blocks:
            b.grad_bytes *= ratio
            b.bwd_transient = max(b.bwd_transient, b.grad_bytes)  # one block's gradients until they went down
        sim.grads_freed_in_backward = True
        sim.grads_persist = False
        if m > 1:
            acc_mb = (ref_grad / 4) * ACCUMULATE_BYTES / host_bw
            exposed_acc = (m - 1) * max(0.0, acc_mb - (fwd_mb + bwd_mb))  # beside the next micro-batch

    # passes over every host gradient before the update can start
    pre = 0.0
    if config.gradients and profile.extra.get("clip_grad_norm") is not None and m > 1:
        pre += ref_grad / host_bw  # the norm of accumulated gradients on the host (one micro-batch: on device)
    if config.gradients and profile.grad_scaler:
        pre += (ref_grad if m > 1 else dev_grad) / host_bw  # the inf/nan check of the host copies
    sliced = config.gradients and all(o.kind == "adamw" for o in profile.optimizers) and profile.optimizers
    one_pass = profile.hardware.host_one_pass_params_per_s if sliced else None
    cast = SLICED_CAST_BYTES if sliced else CAST_BYTES
    if one_pass:
        update = max(0.0, n - mastered) / rate + mastered / one_pass
        sim.source("offload (host update)", f"measured on this host: {rate / 1e9:.2f}G params/s with the "
                                            f"script's optimizer, {one_pass / 1e9:.2f}G with fp32 masters of "
                                            "16-bit weights (the one-pass kernel)")
    else:
        update = n / rate + mastered * cast / host_bw
    up_bytes = max(0.0, params - streamed)  # resident weights copied back (streamed: fetched)
    h2d = up_bytes / _bw(sim.h2d_gbps)
    from memtune.strategies.offload.optimizer_state import CHUNK_BYTES

    chunks = max(1.0, n * 2 / CHUNK_BYTES)
    if config.schedule == "delayed":
        # the update runs beside the next step's forward and backward; step() copies the last one's weights up
        opt = pre + max(0.0, update - m * (fwd_mb + bwd_mb)) + h2d
        how = "delayed: the host update overlaps the next step"
    else:
        # exact, overlapping the next forward (optimizer_state.py `update_order`): the weights outside the
        # repeated blocks first (the forward waits for them), then block by block, each block's forward
        # waiting for its own; so the update hides behind the next forward's blocks but one
        rep = [b for b in sim.blocks if b.kind == "repeated"]
        rep_bytes = sum(b.grad_bytes for b in rep) or 1.0
        share = min(1.0, rep_bytes / max(sum(b.grad_bytes for b in sim.blocks), 1.0))
        u0 = update * (1 - share)  # the weights outside the blocks (embedding, head, norms)
        u1 = update * share / max(1, len(rep))  # one block's
        f_rep = sum(b.fwd_s + b.extra_fwd_s for b in rep)
        f1 = f_rep / max(1, len(rep))
        opt = pre + max(u0 + u1, update - f_rep + f1, h2d) + h2d / chunks
        how = "exact: the host update overlaps the next forward, block by block"
    sim.opt_s = opt + exposed_d2h + exposed_acc
    sim.opt_overlap_s = 0.0
    sim.opt_d2h_bytes = sim.opt_h2d_bytes = 0.0

    # host memory: state and masters; copies of weights without a master; gradient landing buffers (+ the
    # fp32 accumulators under accumulation); the 16-bit copies of updated weights (streamed ones: the store)
    subs = max(0.0, params - 2 * mastered)
    stage = max(0.0, 2 * mastered - streamed)
    acc = ref_grad if (config.gradients and m > 1) else 0.0
    sim.opt_state_host_bytes += sim.opt_state_bytes + sim.master_bytes
    sim.host_bytes += subs + dev_grad + acc + stage + streamed
    sim.opt_state_bytes = sim.master_bytes = sim.opt_transient_bytes = 0.0
    sim.notes.append(
        f"offload ({how}): host update {update * 1e3:.0f} ms ({n / 1e9:.2f}B params at {rate / 1e9:.2f}G/s"
        + (f", the masters' at {one_pass / 1e9:.2f}G/s in one pass" if mastered and one_pass
           else f", +{cast} B/param of 16-bit conversions" if mastered else "")
        + f"); PCIe per step: "
        f"{m * dev_grad / 1e9:.2f} GB down, {up_bytes / 1e9 + streamed * (2 * m) / 1e9:.2f} GB up; exposed "
        f"{sim.opt_s * 1e3:.0f} ms")


def _stream_params(profile: Profile, config: Any, sim: SimStep) -> float:
    """Streamed weights: a block's are on the device while it (or the `prefetch` blocks before it) runs;
    the last `prefetch + 1` stay from their forward to their backward. Returns the bytes streamed."""
    names = set(profile.resolve_blocks(config.params, "offload.params"))
    blocks = [b for b in sim.blocks if b.name in names]
    bad = [b.name for b in blocks if b.mode not in ("recompute", "selective")]
    if bad:
        raise PlanError(f"offload.params streams the weights of recomputed blocks only; {bad[:3]} are not "
                        "checkpointed")
    k = config.prefetch
    size = [b.param_bytes for b in blocks]
    total = sum(size)
    tail = set(range(max(0, len(blocks) - k - 1), len(blocks)))
    sim.param_bytes += sum(size[i] for i in tail) - total
    for i, b in enumerate(blocks):
        ahead = [j for j in range(i + 1, min(len(blocks), i + 1 + k)) if j not in tail]
        b.gather_bytes += (0.0 if i in tail else size[i]) + sum(size[j] for j in ahead)
        b.param_bytes = 0.0
    bw = _bw(sim.h2d_gbps)
    fwd = _exposed([b.fwd_s + b.extra_fwd_s for b in blocks], size, set(), k, bw)
    order = list(reversed(range(len(blocks))))
    bwd = _exposed([blocks[i].bwd_s + blocks[i].recompute_s + blocks[i].extra_bwd_s for i in order],
                   [size[i] for i in order], {order.index(i) for i in tail}, k, bw)
    m = max(1, sim.micro_batches)
    sim.extra_s += m * (fwd + bwd)
    sim.notes.append(f"offload (params): {len(blocks)} block(s), {total / 1e9:.2f} GB of weights on the host, "
                     f"fetched {k} block(s) ahead; fetches not hidden {m * (fwd + bwd) * 1e3:.0f} ms per step")
    return total


def _exposed(times: list[float], size: list[float], resident: set[int], k: int, bw: float) -> float:
    """Seconds the blocks (in execution order) wait for their weights: a block's fetch is issued at its own
    start at the latest and `k` blocks ahead at the earliest; one copy engine, in issue order."""
    free = 0.0
    t = 0.0
    done: dict[int, float] = {}
    waited = 0.0

    def issue(j: int, at: float) -> None:
        nonlocal free
        if j in done or j in resident or j >= len(times):
            return
        free = max(at, free) + size[j] / bw
        done[j] = free

    for i in range(len(times)):
        issue(i, t)
        start = max(t, done.get(i, t))
        waited += start - t
        t = start
        for j in range(i + 1, i + 1 + k):
            issue(j, t)
        t += times[i]
    return waited
