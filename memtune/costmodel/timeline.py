"""The simulator: one optimizer step as a timeline of live bytes (peak = its maximum) and its time with
the transfers that compute cannot hide."""

from __future__ import annotations

import copy
import dataclasses

from memtune.costmodel.sim import Estimate, SimStep

# --- the timeline -----------------------------------------------------------------------------------

COMPONENTS = ("parameters", "master weights", "buffers", "other models", "gradients", "optimizer state",
               "activations kept", "autocast weight copies", "model output", "recompute working set",
               "transient", "gathered parameters", "inputs and fixed", "allocator overhead")


def _memory(sim: SimStep) -> tuple[list[tuple[str, str, str | None, dict[str, float]]], float]:
    """Walk one optimizer step; return events (name, phase, block, live bytes by component)."""
    events: list[tuple[str, str, str | None, dict[str, float]]] = []
    base = {
        "parameters": sim.param_bytes, "master weights": sim.master_bytes, "buffers": sim.buffer_bytes,
        "other models": sim.other_model_bytes,
        "optimizer state": sim.opt_state_bytes, "inputs and fixed": sim.fixed_bytes,
        "allocator overhead": sim.calib_bytes,
    }
    block_grads = sum(b.grad_bytes for b in sim.blocks)
    grads = sim.grad_bytes if sim.grads_persist else 0.0

    def rec(name, phase, where, kept, grads_now, transient=0.0, recompute=0.0, gathered=0.0, output=0.0,
            copies=0.0):
        c = dict(base)
        c.update({"gradients": grads_now, "activations kept": kept, "model output": output,
                  "recompute working set": recompute, "transient": transient, "gathered parameters": gathered,
                  "autocast weight copies": copies})
        events.append((name, phase, where, c))

    if sim.load_bytes > 0:  # the model as placed when the plan is applied, before the first step
        events.append(("model load", "load", None, {k: 0.0 for k in COMPONENTS} | {"parameters": sim.load_bytes}))
    for m in range(sim.micro_batches):
        pre = f"mb{m}/" if sim.micro_batches > 1 else ""
        # After the first micro-batch the accumulated gradients stay allocated [alloc].
        grads_exist = sim.grads_persist or m > 0
        kept = 0.0
        rec(f"{pre}start", "forward", None, kept, grads)
        before = sim.other_act_before_bytes  # saved ahead of the blocks (a stem's pooling): until backward ends
        after = sim.other_act_bytes - before
        for b in sim.blocks:
            # while a block runs its own saved tensors are on device (even when offloaded or recomputed
            # later), plus its largest working allocation
            rec(f"{pre}fwd:{b.name}", "forward", b.name, kept, grads,
                transient=max(b.fwd_transient, b.act_bytes if b.mode != "recompute" else 0.0),
                gathered=b.gather_bytes)
            kept += b.kept
        kept += sim.other_act_bytes
        if sim.loss_fwd_gap_bytes is not None:
            # the loss's forward: autocast's cache keeps the 16-bit weight copies of every block until the
            # autocast region ends (before backward), also of blocks whose saved tensors are gone [amp]
            _loss_forward(rec, f"{pre}loss forward", sim, kept, grads)
        # the model's output (logits) is live until the loss's backward has used it [alloc]
        rec(f"{pre}loss", "loss", None, kept, grads, transient=sim.loss_transient_bytes, output=sim.output_bytes)
        kept -= after  # the loss's saved tensors go with its backward
        for b in reversed(sim.blocks):
            new = 0.0 if grads_exist else b.grad_bytes
            # re-materialized activations [ckpt][offl] + working set + the gradients it creates
            rec(f"{pre}bwd:{b.name}", "backward", b.name, kept, grads,
                transient=max(b.bwd_transient, new), recompute=b.bwd_extra_bytes, gathered=b.gather_bytes)
            kept -= b.kept
            if not sim.grads_freed_in_backward:
                grads += new
        kept -= before
        if not grads_exist and not sim.grads_freed_in_backward:
            grads += max(0.0, sim.grad_bytes - block_grads)  # gradients of parameters outside the blocks
    rec("optimizer", "optimizer", None, 0.0, grads, transient=sim.opt_transient_bytes)
    return events, block_grads


def _loss_forward(rec, name: str, sim: SimStep, kept: float, grads: float) -> None:
    """The loss event less the measured forward-to-loss gap, plus the weight copies only the cache holds."""
    copies = sum(min(b.autocast_cached_bytes, b.autocast_copy_bytes, max(0.0, b.act_bytes - b.kept))
                 for b in sim.blocks)
    gap = sim.loss_fwd_gap_bytes or 0.0
    transient = sim.loss_transient_bytes - gap
    output = sim.output_bytes + min(0.0, transient)  # a gap wider than the transient comes off the output,
    kept_now = kept + min(0.0, output)  # then off the activations
    rec(name, "loss", None, kept_now, grads, transient=max(0.0, transient), output=max(0.0, output),
        copies=copies)


def _step_time(sim: SimStep) -> dict[str, float]:
    """Seconds by part. Transfers run on their own copy engines (one per direction on H100) and only the
    part the compute cannot cover shows up [offl]."""
    h2d_bw = max(sim.h2d_gbps, 1e-3) * 1e9
    d2h_bw = max(sim.d2h_gbps, 1e-3) * 1e9
    # forward: block i's saved tensors leave once it ends; the copies queue on the d2h engine and
    # overlap the forwards of the blocks after i
    t = 0.0
    d2h_free = 0.0
    d2h_done: dict[str, float] = {}
    for b in sim.blocks:
        t += b.fwd_s + b.extra_fwd_s
        if b.d2h_bytes > 0:
            d2h_free = max(t, d2h_free) + b.d2h_bytes / d2h_bw
            d2h_done[b.name] = d2h_free
    fwd = t
    # backward: when the backward reaches a repeated block, the repeated block that ran just before it is
    # fetched if it is offloaded and not fetched yet (strategies/offload/activations.py `prefetch_before`:
    # one block ahead, so its copy overlaps only this block's backward); a block whose tensors were not
    # asked for yet fetches them itself. Copies queue on the h2d engine and start once their d2h copy has
    # finished; a block waits for its own.
    h2d_free = t
    compute_bwd = 0.0
    bwd_work = sum(b.bwd_s + b.recompute_s + b.extra_bwd_s for b in sim.blocks)
    repeated = [i for i, b in enumerate(sim.blocks) if b.kind == "repeated"]
    prev_repeated = dict(zip(repeated[1:], repeated, strict=False))
    h2d_done: dict[int, float] = {}
    grads_at: list[tuple[float, float]] = []  # (when a block's gradients are down, its gradient bytes)

    def fetch(i: int, at: float) -> None:
        nonlocal h2d_free
        b = sim.blocks[i]
        h2d_free = max(at, h2d_free, d2h_done.get(b.name, 0.0)) + b.h2d_bytes / h2d_bw
        h2d_done[i] = h2d_free

    for i in reversed(range(len(sim.blocks))):
        b = sim.blocks[i]
        j = prev_repeated.get(i)
        if j is not None and sim.blocks[j].h2d_bytes > 0 and j not in h2d_done:
            fetch(j, t)
        start = t
        if b.h2d_bytes > 0:
            if i not in h2d_done:
                # its first unpack fetches it: the host reaches it ahead of the GPU, by a lead taken to grow
                # from none at the backward's start to the measured one at its end (H200 zoo lstm_lm, an LSTM
                # before a 2 GB-logit head: offloading it measured +1 ms, charged +64 ms without this)
                ahead = sim.cpu_ahead_s * min(1.0, (t - fwd) / bwd_work) if bwd_work > 0 else 0.0
                fetch(i, max(fwd, t - ahead))
            start = max(t, h2d_done[i])
        work = b.bwd_s + b.recompute_s + b.extra_bwd_s
        compute_bwd += work
        t = start + work
        grads_at.append((t - fwd + b.grad_bytes / d2h_bw, b.grad_bytes))
    bwd_wall = t - fwd
    m = sim.micro_batches
    exposed = m * max(0.0, bwd_wall - compute_bwd)
    # An offloaded optimizer's gradient copies and CPU work overlap the backward; whatever is longer
    # than the backward shows, and the parameters coming back before the next forward do too [offl].
    bwd_total = m * compute_bwd
    overlap = sim.opt_overlap_s + sim.opt_d2h_bytes / d2h_bw
    opt = sim.opt_s + max(0.0, overlap - bwd_total) + sim.opt_h2d_bytes / h2d_bw
    if sim.opt_ahead_s is not None and m == 1:
        opt = min(opt, _update_beside_backward(sim, grads_at, bwd_wall, h2d_bw))
    return {
        "forward": m * sum(b.fwd_s for b in sim.blocks),
        "backward": m * sum(b.bwd_s for b in sim.blocks),
        "recompute": m * sum(b.recompute_s for b in sim.blocks),
        "kernels added": m * sum(b.extra_fwd_s + b.extra_bwd_s for b in sim.blocks),
        "exposed transfer": exposed,
        "optimizer": opt,
        "communication": sim.comm_s,
        "other": sim.other_s,
        "strategy extra": sim.extra_s + max(0.0, sim.host_hooks_s - exposed),
    }


def _update_beside_backward(sim: SimStep, grads_at: list[tuple[float, float]], bwd_wall: float,
                             h2d_bw: float) -> float:
    """The offloaded update's exposed seconds when it takes each block's parameters as their gradients come
    down (optimizer_state.py, the exact schedule without clipping or GradScaler): the host starts once the
    script reaches step(), `opt_ahead_s` before the backward ends, works in the order the gradients arrive,
    the parameters outside the blocks last; the last chunk's weights (`opt_tail_bytes`) go up after it."""
    total = max(sim.grad_bytes, sum(g for _, g in grads_at), 1.0)
    t = max(0.0, bwd_wall - (sim.opt_ahead_s or 0.0))
    for at, g in grads_at:
        t = max(t, at) + sim.opt_host_s * g / total
    rest = max(0.0, total - sum(g for _, g in grads_at))
    t = max(t, bwd_wall) + sim.opt_host_s * rest / total if rest else t
    # the update goes chunk by chunk: the last chunk starts after the last gradient is down
    t = max(t, bwd_wall + sim.opt_host_s * sim.opt_tail_share)
    return max(0.0, t - bwd_wall) + sim.opt_tail_bytes / h2d_bw


COMPILED_MODES = ("keep", "recompute", "selective")  # modes a compiled model's block keeps compiled


def _compiled_view(sim: SimStep) -> SimStep:
    """The step with the blocks scaled by the measured compiled/eager factors. A block that runs eagerly
    (offload, compress: dynamo-disabled for their saved-tensor hooks) breaks the graph, and the whole model
    was then measured as eager code (H200 zoo compiled.py, activation offload of half the blocks: 26.9 GB
    against 27.0 predicted eager, 22.1 with the other half compiled)."""
    out = copy.copy(sim)
    out.compiled_act_k = out.compiled_time_k = 1.0
    if any(b.mode not in COMPILED_MODES for b in sim.blocks):
        return out
    out.blocks = []
    for b in sim.blocks:
        nb = dataclasses.replace(b)
        if b.mode == "keep":
            nb.act_bytes = b.act_bytes * sim.compiled_act_k
            nb.kept_bytes = None if b.kept_bytes is None else b.kept_bytes * sim.compiled_act_k
        nb.fwd_s, nb.bwd_s = b.fwd_s * sim.compiled_time_k, b.bwd_s * sim.compiled_time_k
        nb.recompute_s = b.recompute_s * sim.compiled_time_k
        out.blocks.append(nb)
    return out


def simulate(sim: SimStep) -> Estimate:
    """Peak memory = the maximum of the live-bytes timeline [alloc], not a sum of per-phase maxima."""
    if sim.compiled_act_k != 1.0 or sim.compiled_time_k != 1.0:
        sim = _compiled_view(sim)
    events, _ = _memory(sim)
    timeline = [(name, sum(c.values())) for name, _, _, c in events]
    i = max(range(len(events)), key=lambda j: timeline[j][1])
    name, phase, where, comp = events[i]
    times = _step_time(sim)
    step_s = sum(times.values())
    if sim.batch_size:
        samples = sim.batch_size * sim.micro_batches * sim.world_size
        throughput, unit = (samples / step_s if step_s > 0 else 0.0), "samples/s"
    else:
        throughput, unit = (1.0 / step_s if step_s > 0 else 0.0), "steps/s"
    host = sim.opt_state_host_bytes + sim.host_bytes + sum(b.d2h_bytes for b in sim.blocks)
    return Estimate(
        peak_bytes=timeline[i][1], peak_phase=phase, peak_where=where, step_s=step_s,
        throughput=throughput, throughput_unit=unit,
        breakdown={k: comp.get(k, 0.0) for k in COMPONENTS},
        time_breakdown=times, timeline=timeline, host_bytes=host,
        lossy=list(dict.fromkeys(sim.lossy)), notes=list(sim.notes), sources=dict(sim.sources),
    )
