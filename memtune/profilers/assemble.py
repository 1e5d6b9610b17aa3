"""Assembling the Profile from what the recorder saw: blocks, activations, transients, the peak and its
phase, times, optimizers, hardware."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from memtune.capture import Session
from memtune.profile import BlockProfile, Hardware, OptimizerProfile, Peak, Profile
from memtune.profilers import memory as mem
from memtune.profilers.probes import OTHER_PROBE
from memtune.profilers.recorder import _PHASE, Profiler, StepRecord, block_of
from memtune.profilers.timing import median


def _intervals(rec: StepRecord):
    """(label, start mark, end mark) for consecutive marks."""
    ms = rec.marks
    return [(ms[i].label, ms[i], ms[i + 1]) for i in range(len(ms) - 1)]


def _hardware(device: str, measure: bool) -> Hardware:
    from memtune.profilers import hardware as hw

    env = hw.environment()
    h = Hardware(device=device, host_ram_bytes=env["host"]["ram_total_bytes"],
                 cpu_cores=env["host"]["cpu_cores_physical"] or env["host"]["cpu_cores_logical"] or 0)
    nv = env["nvml"]
    if device == "cuda":
        h.gpu_name = torch.cuda.get_device_name()
        free, total = torch.cuda.mem_get_info()
        h.gpu_total_bytes, h.gpu_free_bytes = int(total), int(free)
        if nv.get("available"):
            h.driver = nv["driver"]
    if measure:
        r = hw.measure_rates(device)
        h.h2d_gbps, h.d2h_gbps, h.d2d_gbps = r.get("h2d_gbps", 0.0), r.get("d2h_gbps", 0.0), r.get("d2d_gbps", 0.0)
        h.matmul_tflops = {k.removeprefix("matmul_tflops_"): v for k, v in r.items() if k.startswith("matmul_tflops_")}
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        h.world_size = d.get_world_size()
        if h.world_size > 1 and hasattr(hw, "measure_collectives"):
            try:
                c = hw.measure_collectives()
                h.allgather_gbps = c.get("allgather_gbps")
                h.reduce_scatter_gbps = c.get("reduce_scatter_gbps")
            except Exception as e:  # a broken collective is worth a note, not a lost profile
                h.allgather_gbps = None
                _ = e
    return h


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return str(v)


def assemble(p: Profiler, s: Session, prof: Profile) -> None:
    model = s.model
    prof.model_cls = f"{type(model).__module__}.{type(model).__qualname__}"
    prof.device = p.device.type  # where it ran (a script may move it back when it ends: Lightning)
    models = s.models or [model]
    seen_storages: set[int] = set()
    stats = [mem.param_stats(m, seen_storages) for m in models]  # each storage once (tied, shared)
    prof.param_bytes = sum(sum(st["param_bytes"].values()) for st in stats)
    prof.trainable_param_bytes = sum(st["trainable"] for st in stats)
    prof.buffer_bytes = sum(mem.buffer_bytes(m) for m in models)
    prof.other_module_bytes, others = p.other_modules
    if len(models) > 1:
        prof.notes.append(f"{len(models)} trained models ({', '.join(type(m).__name__ for m in models)}): "
                          f"blocks are {type(model).__name__}'s; the others' memory is counted, their activations "
                          "outside every block")
    if prof.other_module_bytes:
        prof.notes.append(f"{prof.other_module_bytes / 2**20:.0f} MiB of modules no optimizer trains "
                          f"({', '.join(others)}: an EMA copy, a frozen teacher...) stay on the device")
    prof.batch_size, prof.seq_len, prof.autocast = p.batch_size, p.seq_len, p.autocast
    prof.autocast_cache = p.autocast_cache
    prof.grad_scaler = bool(s.grad_scalers)
    prof.hf_gradient_checkpointing = _hf_checkpointing(model)
    prof.world_size, prof.rank, prof.ddp = s.world_size, s.rank, s.ddp
    prof.step_start_bytes = p.step_start_bytes
    prof.grads_persist = p.grads_persist

    memrec = next((r for r in p.records if r.mode in ("memory", "both")), None)
    timerec = next((r for r in p.records if r.mode in ("timing", "both")), None)
    clean = [r for r in p.records if r.mode == "clean"]
    if memrec is not None:
        prof.micro_batches_per_step = max(1, memrec.forwards)

    # blocks: observed forward order first, then any block the forward never reached
    order = {n: i for i, n in enumerate(p.first_order)}
    refs = sorted(s.blocks, key=lambda b: (order.get(b.name, len(order) + b.index)))
    counter = p.counter
    seen_params: set[int] = set()
    blocks: dict[str, BlockProfile] = {}
    for i, b in enumerate(refs):
        bst = mem.param_stats(b.module, seen_params)
        bp = BlockProfile(name=b.name, cls=type(b.module).__name__, kind=b.kind, index=i,
                          param_bytes=bst["param_bytes"], trainable_param_bytes=bst["trainable"],
                          frozen_param_bytes=bst["frozen"], n_params=bst["n_params"])
        if memrec is not None and counter is not None:
            bp.activation_bytes = counter.bytes.get(b.name, 0)
            bp.activation_bytes_by_dtype = dict(counter.by_dtype.get(b.name, {}))
            bp.input_bytes, bp.output_bytes = p.io_bytes.get(b.name, [0, 0])
            bp.shared_input_bytes = p.shared_input_bytes.get(b.name, 0)
            bp.calls_per_step = max(1, memrec.block_calls.get(b.name, 1) // max(1, memrec.forwards))
        blocks[b.name] = bp
    if memrec is not None and counter is not None:
        before = counter.bytes.get(mem.BEFORE_BLOCKS, 0)
        prof.other_activation_bytes = counter.bytes.get(None, 0) + before
        prof.other_activation_before_bytes = before if p.repeated_ran else 0  # no blocks: no "before"
    for bp in blocks.values():  # one probe per class stands for every repeated block of it
        if bp.kind == "repeated" and bp.cls in p.probe_bytes:
            bp.activation_bytes_bf16_params = p.probe_bytes[bp.cls]
        if bp.kind == "repeated" and bp.cls in p.mode_probes:
            bp.what_ifs = dict(p.mode_probes[bp.cls])
        elif bp.kind != "repeated" and OTHER_PROBE + bp.name in p.mode_probes:  # probed on itself
            bp.what_ifs = dict(p.mode_probes[OTHER_PROBE + bp.name])

    # memory intervals: transients, loss transient, peak and its phase
    if memrec is not None and p.cuda:
        best = (0, "unknown", None)
        rpeak = 0
        loss_start_alloc = None
        forward_peak: int | None = 0  # up to the first call of backward; None once it is known
        first_loss = False  # inside the first micro-batch's loss: its forward ("loss"), then its backward
        for label, a, b in _intervals(memrec):
            peak = b.peak_before
            rpeak = max(rpeak, b.reserved_peak_before)
            name = block_of(label)
            if label[0] == "bwd_call" and forward_peak is not None:
                prof.extra["forward_peak_bytes"] = forward_peak
                forward_peak = None
            elif forward_peak is not None:
                forward_peak = max(forward_peak, peak)
            if b.label == ("opt_end",) and label[0] in ("opt", "bwd_end"):
                # the script's own optimizer update (after its closure's backward, under Lightning): its
                # temporaries, measured
                prof.extra["optimizer_transient_bytes"] = max(0, peak - a.alloc)
            if label[0] == "fwd" and name in blocks:
                blocks[name].transient_bytes = max(blocks[name].transient_bytes, peak - a.alloc)
            elif label[0] == "bwd" and name in blocks:
                blocks[name].bwd_transient_bytes = max(blocks[name].bwd_transient_bytes, peak - a.alloc)
            if label[0] == "loss" and loss_start_alloc is None:
                loss_start_alloc, first_loss = a.alloc, True
            elif label[0] != "bwd_call":
                first_loss = False
            if first_loss:
                prof.loss_transient_bytes = max(prof.loss_transient_bytes,
                                                peak - loss_start_alloc - prof.other_activation_bytes, 0)
            where = name if label[0] in ("fwd", "bwd") else None
            if peak > best[0]:
                best = (peak, _PHASE.get(label[0], "unknown"), where)
        prof.peak = Peak(allocated_bytes=best[0], reserved_bytes=rpeak, phase=best[1], measured=True, where=best[2])

    # times
    if timerec is not None:
        for label, a, b in _intervals(timerec):
            name = block_of(label)
            if name not in blocks:
                continue
            dt = p.clock.elapsed(a.clock, b.clock)
            if label[0] == "fwd":
                blocks[name].fwd_s += dt / max(1, timerec.forwards)
            elif label[0] == "bwd":
                blocks[name].bwd_s += dt / max(1, timerec.forwards)
    prof.blocks = list(blocks.values())

    steps_for_time = clean or [r for r in p.records if r.mode in ("timing", "both")]
    fwd, bwd, opt = [], [], []
    for r in steps_for_time:
        f = b_ = o = 0.0
        inside = 0.0  # forward and backward run inside optimizer.step(closure) (Lightning): not the update
        t_model = t_bwd = t_opt = None
        for m in r.marks:
            k = m.label[0]
            if k == "model":
                t_model = m.clock
            elif k == "loss" and t_model is not None:
                dt = p.clock.elapsed(t_model, m.clock)
                f += dt
                inside += dt if t_opt is not None else 0.0
                t_model = None
            elif k == "bwd" and m.label[1] is None:
                t_bwd = m.clock
            elif k == "bwd_end" and t_bwd is not None:
                dt = p.clock.elapsed(t_bwd, m.clock)
                b_ += dt
                inside += dt if t_opt is not None else 0.0
                t_bwd = None
            elif k == "opt":
                t_opt = m.clock
            elif k == "opt_end" and t_opt is not None:
                o += max(0.0, p.clock.elapsed(t_opt, m.clock) - inside)
        nf = max(1, r.forwards)
        fwd.append(f / nf)
        bwd.append(b_ / nf)
        opt.append(o)
    prof.fwd_s, prof.bwd_s, prof.optimizer_s = median(fwd), median(bwd), median(opt)
    ends = s.step_end_times
    between = s.step_durations()  # between[i - 1]: step i, our callbacks after step i - 1 left out
    durations = []
    for r in steps_for_time:
        i = r.index
        if i >= 1 and i < len(ends):
            durations.append(between[i - 1])
    if not durations and ends and s.ready_time is not None:
        durations.append(ends[0] - s.ready_time)
    prof.step_s = median(durations)
    if not clean and prof.step_s:
        p.notes.append("no clean step was left (raise --steps to 3 or more): step time includes instrumentation")
    after = [i for i in p.compiled_done[1:] if 1 <= i <= len(between)]
    steady = [i for i in after if i not in p.compiled_again] or after  # steps that compiled nothing again
    measured = [between[i - 1] for i in steady]
    if measured:  # the compiled steps after the one that compiled (recorder.py COMPILED_STEPS)
        prof.extra["compiled"] = {"step_s": median(measured), "steps": len(measured),
                                  "peak_bytes": p.compiled_peak if p.cuda else None}

    # optimizers
    for i, o in enumerate(s.optimizers):
        params = [q for g in o.param_groups for q in g["params"]]
        hp = {k: _jsonable(v) for k, v in o.param_groups[0].items() if k != "params"} if o.param_groups else {}
        cls = type(o)
        prof.optimizers.append(OptimizerProfile(
            cls=f"{cls.__module__}.{cls.__qualname__}", kind=cls.__name__.lower(),
            n_param_groups=len(o.param_groups), n_params=sum(q.numel() for q in params),
            param_bytes=sum(q.numel() * q.element_size() for q in params),
            state_bytes=p.opt_state_bytes_at.get(i, mem.optimizer_state_bytes(o)), hyperparams=hp,
            step_s=prof.optimizer_s if i == 0 else 0.0))
    prof.optimizer_state_bytes = sum(o.state_bytes for o in prof.optimizers)
    prof.grad_bytes = p.grad_bytes or (prof.trainable_param_bytes if memrec is not None else 0)

    tok = prof.batch_size * prof.seq_len if prof.batch_size and prof.seq_len else None
    prof.tokens_per_step = tok * prof.micro_batches_per_step if tok else None

    if memrec is not None and not p.cuda:
        _cpu_peak(prof)


def _hf_checkpointing(model: nn.Module) -> bool:
    import warnings

    with warnings.catch_warnings():  # newer transformers renamed the property and warn on the old name
        warnings.simplefilter("ignore")
        for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
            v = getattr(model, attr, None)
            if isinstance(v, bool):
                return v
    return False


def _cpu_peak(prof: Profile) -> None:
    """On CPU there is no allocator to read: the peak is the sum of the measured parts."""
    states = prof.param_bytes + prof.buffer_bytes + prof.other_module_bytes + prof.optimizer_state_bytes
    acts = sum(b.activation_bytes for b in prof.blocks) + prof.other_activation_bytes
    grads_fwd = prof.grad_bytes if prof.grads_persist else 0
    at_loss = states + grads_fwd + acts
    at_opt = states + prof.grad_bytes
    phase, total = ("loss", at_loss) if at_loss >= at_opt else ("optimizer", at_opt)
    # the cost model's own sum of these parts over the step's events (accumulation's gradients, the head's
    # output): the peak `tune` compares a budget with is then the one `estimate` shows for the baseline
    from memtune.costmodel.build import build_sim
    from memtune.costmodel.timeline import simulate

    try:
        r = simulate(build_sim(prof, calibrate=False))
    except Exception:  # a profile the cost model cannot read yet: the plain sum stands
        r = None
    if r is not None and r.peak_bytes > total:
        total, phase = r.peak_bytes, r.peak_phase or phase
    prof.peak = Peak(allocated_bytes=int(total), reserved_bytes=0, phase=phase, measured=False)
    if not prof.step_start_bytes:
        prof.step_start_bytes = int(states + grads_fwd)
