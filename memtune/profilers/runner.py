"""`profile_script`: run a training script in a Session and measure what its memory and time are made of.

Steps (a step is one optimizer.step()):
    warm-up steps (W)      nothing per block, only cheap model-level marks
    step W   "memory"      saved-tensor hooks, per-block marks reading the CUDA allocator's peak
    step W+1 "timing"      per-block marks recording CUDA events (no saved-tensor hooks)
    the rest "clean"       model-level marks only: step_s, fwd_s, bwd_s, optimizer_s are their medians
With --steps 2 the memory and timing passes share step W; with --steps 1 step_s is that instrumented step.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.optim.optimizer as _optim_mod

from memtune import __version__
from memtune.capture import ScriptFailure, Session
from memtune.errors import ScriptError
from memtune.profile import BlockProfile, Hardware, OptimizerProfile, Peak, Profile
from memtune.profilers import memory as mem
from memtune.profilers.timing import Clock, median
from memtune.strategies.base import patch_functions


class ScriptFailed(ScriptError):
    """The user's script raised; `profile` holds what was measured before it did."""

    def __init__(self, failure: ScriptFailure, profile: Profile, saved_to: str | None = None):
        self.failure = failure
        self.profile = profile
        self.saved_to = saved_to
        where = f"; what was measured is saved in {saved_to}" if saved_to else ""
        super().__init__(f"the script raised {failure}{where}: fix the script (its traceback is above)")


@dataclass
class _Mark:
    label: tuple  # ("fwd", block) ("fwd_end", block) ("model", ) ("loss", ) ("bwd_call", ) ("bwd", block) ("bwd_end", )
    #               ("opt", ) ("opt_end", )
    clock: Any
    alloc: int = 0  # allocated at the mark
    peak_before: int = 0  # peak allocated in the interval that this mark closes
    reserved_peak_before: int = 0


_PHASE = {"model": "forward", "fwd": "forward", "fwd_end": "forward", "loss": "loss", "bwd_call": "loss",
          "bwd": "backward",
          "bwd_end": "optimizer", "opt": "optimizer", "opt_end": "optimizer"}


@dataclass
class _StepRecord:
    index: int
    mode: str
    marks: list[_Mark] = field(default_factory=list)
    forwards: int = 0
    block_calls: dict[str, int] = field(default_factory=dict)


def _block_of(label: tuple) -> str | None:
    return label[1] if len(label) > 1 else None


class _Profiler:
    def __init__(self, session: Session, *, on_progress: Callable[[int, int | None], None] | None = None):
        self.s = session
        self.on_progress = on_progress
        self.cuda = False
        self.clock: Clock | None = None
        self.peaks: mem.PeakTracker | None = None
        self.counter: mem.SavedTensorCounter | None = None
        self.stack: list[str] = []
        self.model_handles: list[Any] = []
        self.block_handles: list[Any] = []
        self.step: _StepRecord | None = None
        self.records: list[_StepRecord] = []
        self.mode = "warmup"
        self.in_backward = False
        self.saved_ctx = None
        self.inputs_seen = False
        self.batch_size: int | None = None
        self.seq_len: int | None = None
        self.autocast: str | None = None
        self.io_bytes: dict[str, list[int]] = {}  # block -> [input, output]
        self.first_order: list[str] = []  # blocks in observed forward order
        self.step_start_bytes = 0
        self.grads_persist = False
        self.grad_bytes = 0
        self.opt_state_bytes_at: dict[int, int] = {}
        self.undo_compile: Callable[[], None] | None = None
        self.notes: list[str] = []
        self.state_ptrs: set[int] = set()
        self.mem_forward_done = False
        self.clip_grad_norm: float | None = None  # max_norm of the script's global-norm clipping, if any
        self.memory_timeline = False  # record the allocator's history over the memory step (CUDA)
        self.recording = False
        self.snapshot: dict[str, Any] | None = None
        # bf16-weights what-if probe: class -> (module, host copy of its first call's args/kwargs) taken in
        # the memory step; class -> saved bytes, measured in `end`
        self.probe_inputs: dict[str, tuple[nn.Module, Any]] = {}
        self.probe_bytes: dict[str, int] = {}

    # --- plan of the steps ---------------------------------------------------------------------------
    def mode_for(self, i: int) -> str:
        w, n = self.s.warmup, self.s.steps
        if i < w:
            return "warmup"
        if n is not None and i >= w + n:
            return "off"
        k = i - w
        if n is not None and n <= 2:
            return "both" if k == 0 else "clean"
        return {0: "memory", 1: "timing"}.get(k, "clean")

    # --- session callbacks ---------------------------------------------------------------------------
    def ready(self, s: Session) -> None:
        model = s.model
        self.cuda = s.device.type == "cuda"
        self.clock = Clock(self.cuda)
        self.peaks = mem.PeakTracker(self.cuda)
        self.counter = mem.SavedTensorCounter(lambda: self.stack[-1] if self.stack else None, self.state_ptrs)
        if s.compiled or getattr(model, "_compiled_call_impl", None) is not None:
            self.undo_compile = _run_eagerly(s)
        self.model_handles = [
            model.register_forward_pre_hook(self.model_pre, with_kwargs=True),
            model.register_forward_hook(self.model_post),
            _optim_mod.register_optimizer_step_pre_hook(self.opt_pre),
        ]
        self.set_mode(self.mode_for(0))

    def set_mode(self, mode: str) -> None:
        if self.memory_timeline and self.cuda:
            if mode in ("memory", "both") and not self.recording and self.snapshot is None:
                torch.cuda.memory._record_memory_history(max_entries=1_000_000)
                self.recording = True
            elif mode not in ("memory", "both"):
                self._stop_recording()
        self.mode = mode
        for h in self.block_handles:
            h.remove()
        self.block_handles = []
        if mode in ("memory", "timing", "both"):
            for b in self.s.blocks:
                self.block_handles.append(b.module.register_forward_pre_hook(self._block_pre(b.name, b.kind),
                                                                             with_kwargs=True))
                self.block_handles.append(b.module.register_forward_hook(self._block_post(b.name)))

    def on_step(self, s: Session, i: int) -> None:
        rec = self.step
        if rec is not None and rec.index == i:
            self.finish_step(rec)
        self.step = None
        if self.on_progress:
            self.on_progress(s.steps_done, s.target_steps)
        nxt = self.mode_for(i + 1)
        if nxt != self.mode:
            self.set_mode(nxt)

    def before_run(self, s: Session) -> Callable[[], None] | None:
        """torch.compile'd code runs eagerly while profiling: per-module hooks and saved-tensor hooks must see
        every module, and compiling would be measured as the first steps' time. Global-norm clipping is
        recorded: update-in-backward cannot honour it, so the tuner must know."""
        undos = [self._watch_clipping(), self._watch_backward()]
        stance = getattr(torch.compiler, "set_stance", None)
        if stance is not None:
            stance("force_eager")
            undos.append(lambda: stance("default"))

        def undo() -> None:
            for u in reversed(undos):
                u()

        return undo

    def _watch_backward(self) -> Callable[[], None]:
        """Mark the call of backward in the memory step: the peak before it is the forward's, while autocast's
        cache still holds the 16-bit weight copies (freed when the autocast region ends, before backward in
        the usual script), which a checkpointed block's copies outlive."""

        def wrap(orig):
            def watched(*args, **kwargs):
                rec = self.step
                if rec is not None and not self.in_backward and rec.mode in ("memory", "both"):
                    self.mark("bwd_call")
                return orig(*args, **kwargs)

            return watched

        return patch_functions([(torch.autograd, "backward")], wrap)

    def _watch_clipping(self) -> Callable[[], None]:
        import torch.nn.utils as nu
        import torch.nn.utils.clip_grad as cg

        def wrap(orig):
            def watched(parameters, max_norm, *args, **kwargs):
                self.clip_grad_norm = float(max_norm)
                return orig(parameters, max_norm, *args, **kwargs)

            return watched

        return patch_functions([(m, a) for m in (nu, cg) for a in ("clip_grad_norm_", "clip_grad_norm")], wrap)

    def _stop_recording(self) -> None:
        """Keep the allocator's history of the memory step (PyTorch's memory snapshot), then stop recording."""
        if self.recording:
            self.snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            self.recording = False

    def end(self, s: Session) -> None:
        if self.cuda:
            self._stop_recording()
        if s.compiled or getattr(s.model, "_compiled_call_impl", None) is not None:
            self.notes.append(
                "the model is torch.compile'd: profiled eagerly (compiled kernels fuse some activations, so the "
                "measured activations are an upper bound)")
        self._close_saved_hooks()
        for h in self.block_handles + self.model_handles:
            h.remove()
        self.block_handles, self.model_handles = [], []
        self._probe_bf16_params(s)
        if self.undo_compile is not None:
            self.undo_compile()

    # --- what-if: bf16 weights -----------------------------------------------------------------------
    def _stash_probe_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Keep a host copy of the first call's inputs of one repeated block per class: a copy, so that the
        memory step's allocator peak is unchanged (only this step's times pay for the device-to-host copy)."""
        cls = type(module).__name__
        if cls in self.probe_inputs or not _probe_worthy(module):
            return
        self.probe_inputs[cls] = (module, _map_tensors((args, kwargs), _to_host))

    def _probe_bf16_params(self, s: Session) -> None:
        """Saved bytes of each stashed block class with bf16 weights and bf16 floating inputs, under the
        script's autocast: the dtypes an fp32 profile cannot show (HF RMSNorm's `.to(input_dtype)`, a bf16
        residual stream). Measured after the measured steps; the copies are freed at once."""
        stash, self.probe_inputs = self.probe_inputs, {}
        if not stash or s.failure is not None or (s.world_size > 1 and not s.ddp):
            return  # a sharded block's forward would run collectives on this rank alone
        for cls, (module, inputs) in stash.items():
            try:
                self.probe_bytes[cls] = _saved_bytes_bf16_params(s.model, module, inputs, s.device, self.autocast)
            except Exception as e:  # the probe is an extra: a failure costs its number, not the profile
                self.notes.append(f"bf16-weights probe of {cls} failed ({type(e).__name__}: {str(e)[:200]}): "
                                  "estimates of bf16 parameters fall back to dropping autocast's weight copies")
        del stash

    # --- marks ---------------------------------------------------------------------------------------
    def mark(self, *label) -> None:
        rec = self.step
        if rec is None or self.clock is None:
            return
        m = _Mark(label, self.clock.mark())
        if rec.mode in ("memory", "both") and self.peaks.enabled:
            alloc, peak, _, rpeak = self.peaks.read()
            m.alloc, m.peak_before, m.reserved_peak_before = alloc, peak, rpeak
        rec.marks.append(m)

    def model_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        s = self.s
        if self.mode == "off":
            return
        if self.step is None:
            self.step = _StepRecord(s.steps_done, self.mode)
            self.in_backward = False
            if self.mode in ("memory", "both"):
                self.begin_memory_step()
        rec = self.step
        rec.forwards += 1
        if not self.inputs_seen:
            self.inputs_seen = True
            self.observe_inputs(args, kwargs)
        self.mark("model")

    def model_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        rec = self.step
        if rec is None:
            return
        self.mark("loss")
        if rec.forwards == 1 and rec.mode in ("memory", "both"):
            self.mem_forward_done = True
        t = _first_grad_tensor(output)
        if t is not None:
            t.register_hook(self._bwd_start)

    def _bwd_start(self, grad):
        if not self.in_backward:
            self.in_backward = True
            self._on_backward_start()
            self.mark("bwd", None)
            torch.autograd.Variable._execution_engine.queue_callback(self._bwd_end)
        return None

    def _on_backward_start(self) -> None:
        if self.counter is not None:
            self.counter.active = False  # the first micro-batch's saved tensors are all counted

    def _bwd_end(self) -> None:
        self.mark("bwd_end")
        self.in_backward = False

    def opt_pre(self, opt, args, kwargs) -> None:
        if self.step is None or not self.s._primary(opt):
            return
        if self.step.mode in ("memory", "both"):
            self.grad_bytes = mem.grad_bytes(self.s.model)
            self._close_saved_hooks()
        self.mark("opt")

    def begin_memory_step(self) -> None:
        model = self.s.model
        self.state_ptrs.clear()
        self.state_ptrs.update(mem.state_ptrs(model))
        self.grads_persist = any(p.grad is not None for p in model.parameters() if p.requires_grad)
        self.counter.reset()
        self.counter.active = True
        self.io_bytes.clear()
        self.saved_ctx = self.counter.hooks()
        self.saved_ctx.__enter__()
        if self.cuda:
            self.peaks.read()  # start the step's first interval fresh
            self.step_start_bytes = torch.cuda.memory_allocated()

    def _close_saved_hooks(self) -> None:
        if self.saved_ctx is not None:
            ctx, self.saved_ctx = self.saved_ctx, None
            ctx.__exit__(None, None, None)
        if self.counter is not None:
            self.counter.active = False

    def _block_pre(self, name: str, kind: str = "repeated"):
        def hook(module, args, kwargs):
            rec = self.step
            if rec is None:
                return
            self.stack.append(name)
            calls = rec.block_calls.get(name, 0)
            rec.block_calls[name] = calls + 1
            if rec.mode in ("memory", "both") and calls == 0:
                self.io_bytes[name] = [mem.tensors_bytes((args, kwargs), self.state_ptrs), 0]
                if name not in self.first_order:
                    self.first_order.append(name)
                if kind == "repeated" and rec.forwards == 1:
                    self._stash_probe_input(module, args, kwargs)
            self.mark("fwd", name)
        return hook

    def _block_post(self, name: str):
        def hook(module, args, output):
            rec = self.step
            if rec is None:
                return
            self.mark("fwd_end", name)
            if self.stack and self.stack[-1] == name:
                self.stack.pop()
            if rec.mode in ("memory", "both") and name in self.io_bytes and rec.block_calls.get(name) == 1:
                self.io_bytes[name][1] = mem.tensors_bytes(output, self.state_ptrs)
            t = _first_grad_tensor(output)
            if t is not None:
                def on_grad(grad, name=name):
                    self._bwd_start(grad)
                    self.mark("bwd", name)
                t.register_hook(on_grad)
        return hook

    def observe_inputs(self, args: tuple, kwargs: dict) -> None:
        dev = self.s.device.type
        try:
            if torch.is_autocast_enabled(dev):
                self.autocast = str(torch.get_autocast_dtype(dev)).replace("torch.", "")
        except (TypeError, RuntimeError, AttributeError):
            pass
        cands = [kwargs[k] for k in ("input_ids", "inputs_embeds", "pixel_values", "x", "input", "inputs")
                 if isinstance(kwargs.get(k), torch.Tensor)]
        cands += [a for a in mem.iter_tensors(args)]
        cands += [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
        for t in cands:
            if t.dim() >= 1:
                self.batch_size = int(t.shape[0])
                if t.dim() == 2 and not t.is_floating_point():
                    self.seq_len = int(t.shape[1])  # token ids: (batch, sequence)
                elif t.dim() == 3 and t.is_floating_point() and t.shape[1] > 1:
                    self.seq_len = int(t.shape[1])  # embeddings: (batch, sequence, width)
                break

    def finish_step(self, rec: _StepRecord) -> None:
        if self.clock is not None:
            self.clock.sync()
        if rec.mode in ("memory", "both"):
            self._close_saved_hooks()
            if self.cuda:
                alloc, peak, _, rpeak = self.peaks.read()
                rec.marks.append(_Mark(("opt_end",), self.clock.mark(), alloc, peak, rpeak))
            for i, o in enumerate(self.s.optimizers):
                self.opt_state_bytes_at[i] = mem.optimizer_state_bytes(o)
        if not rec.marks or rec.marks[-1].label != ("opt_end",):
            rec.marks.append(_Mark(("opt_end",), self.clock.mark() if self.clock else 0.0))
        self.records.append(rec)


@dataclass
class _HostTensor:
    """A block input kept on the host for the probe, with what it was on the device."""

    t: torch.Tensor
    requires_grad: bool


def _to_host(t: torch.Tensor) -> _HostTensor:
    return _HostTensor(t.detach().to("cpu", copy=True), t.requires_grad)


def _map_tensors(obj: Any, fn: Callable[[Any], Any], depth: int = 0) -> Any:
    """`obj` with every tensor (or _HostTensor) replaced by fn(it); tuples, lists and dicts rebuilt, anything
    else (None, flags, cache objects) kept as it is."""
    if isinstance(obj, (torch.Tensor, _HostTensor)):
        return fn(obj)
    if depth > 6:
        return obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_map_tensors(x, fn, depth + 1) for x in obj)
    if isinstance(obj, list):
        return [_map_tensors(x, fn, depth + 1) for x in obj]
    if isinstance(obj, dict) and type(obj) is dict:
        return {k: _map_tensors(v, fn, depth + 1) for k, v in obj.items()}
    return obj


def _probe_worthy(module: nn.Module) -> bool:
    """fp32 weights to cast, all of them plain tensors (a DTensor/FSDP block is left alone)."""
    ps = list(module.parameters())
    return any(p.dtype == torch.float32 for p in ps) and all(type(p.data) is torch.Tensor for p in ps)


def _saved_bytes_bf16_params(model: nn.Module, module: nn.Module, inputs: Any, device: torch.device,
                             autocast: str | None) -> int:
    """Bytes `module` saves for backward when its fp32 parameters are bf16 (precision `params: bf16`) and so
    are its floating inputs (the residual stream that bf16 weights upstream produce), counted like the memory
    step counts them (unique storages, parameters and buffers excluded)."""
    import contextlib

    bf16 = torch.bfloat16
    params = {n: (p.detach().to(bf16).requires_grad_(p.requires_grad) if p.dtype == torch.float32 else p)
              for n, p in module.named_parameters()}

    def to_device(h: _HostTensor) -> torch.Tensor:
        t = h.t.to(device, dtype=bf16 if h.t.dtype == torch.float32 else h.t.dtype)
        return t.requires_grad_(True) if h.requires_grad and t.is_floating_point() else t

    args, kwargs = _map_tensors(inputs, to_device)
    exclude = mem.state_ptrs(model) | {k[0] for p in params.values() if (k := mem.storage_key(p)) is not None}
    counter = mem.SavedTensorCounter(lambda: "probe", exclude)
    counter.active = True
    amp = (torch.autocast(device.type, dtype=getattr(torch, autocast)) if autocast and hasattr(torch, autocast)
           else contextlib.nullcontext())
    try:
        with torch.enable_grad(), amp, counter.hooks():
            out = torch.func.functional_call(module, params, args, kwargs)
        del out
        return counter.bytes.get("probe", 0)
    finally:
        del args, kwargs, params


def _first_grad_tensor(obj: Any) -> torch.Tensor | None:
    for t in mem.iter_tensors(obj):
        if t.requires_grad and t.grad_fn is not None:
            return t
    return None


def _run_eagerly(s: Session) -> Callable[[], None]:
    """Make a torch.compile'd model run its eager forward while profiling (hooks see every module)."""
    undo: list[Callable[[], None]] = []
    w = s.wrapper
    if w is not None and hasattr(w, "_orig_mod") and "forward" in w.__dict__:
        old = w.__dict__["forward"]
        w.forward = w._orig_mod.__call__
        undo.append(lambda: setattr(w, "forward", old))
    m = s.model
    if getattr(m, "_compiled_call_impl", None) is not None:
        old_impl = m._compiled_call_impl
        m._compiled_call_impl = None
        undo.append(lambda: setattr(m, "_compiled_call_impl", old_impl))

    def run_undo():
        for u in reversed(undo):
            u()
    return run_undo


# --- assembling the Profile ------------------------------------------------------------------------------


def _intervals(rec: _StepRecord):
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


def _assemble(p: _Profiler, s: Session, prof: Profile) -> None:
    model = s.model
    prof.model_cls = f"{type(model).__module__}.{type(model).__qualname__}"
    prof.device = s.device.type
    st = mem.param_stats(model)
    prof.param_bytes = sum(st["param_bytes"].values())
    prof.trainable_param_bytes = st["trainable"]
    prof.buffer_bytes = mem.buffer_bytes(model)
    prof.batch_size, prof.seq_len, prof.autocast = p.batch_size, p.seq_len, p.autocast
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
            bp.calls_per_step = max(1, memrec.block_calls.get(b.name, 1) // max(1, memrec.forwards))
        blocks[b.name] = bp
    if memrec is not None and counter is not None:
        prof.other_activation_bytes = counter.bytes.get(None, 0)
    for bp in blocks.values():  # one probe per class stands for every repeated block of it
        if bp.kind == "repeated" and bp.cls in p.probe_bytes:
            bp.activation_bytes_bf16_params = p.probe_bytes[bp.cls]

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
            name = _block_of(label)
            if label[0] == "bwd_call" and forward_peak is not None:
                prof.extra["forward_peak_bytes"] = forward_peak
                forward_peak = None
            elif forward_peak is not None:
                forward_peak = max(forward_peak, peak)
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
            name = _block_of(label)
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
        t_model = t_bwd = t_opt = None
        for m in r.marks:
            k = m.label[0]
            if k == "model":
                t_model = m.clock
            elif k == "loss" and t_model is not None:
                f += p.clock.elapsed(t_model, m.clock)
                t_model = None
            elif k == "bwd" and m.label[1] is None:
                t_bwd = m.clock
            elif k == "bwd_end" and t_bwd is not None:
                b_ += p.clock.elapsed(t_bwd, m.clock)
                t_bwd = None
            elif k == "opt":
                t_opt = m.clock
            elif k == "opt_end" and t_opt is not None:
                o += p.clock.elapsed(t_opt, m.clock)
        nf = max(1, r.forwards)
        fwd.append(f / nf)
        bwd.append(b_ / nf)
        opt.append(o)
    prof.fwd_s, prof.bwd_s, prof.optimizer_s = median(fwd), median(bwd), median(opt)
    ends = s.step_end_times
    durations = []
    for r in steps_for_time:
        i = r.index
        if i >= 1 and i < len(ends):
            durations.append(ends[i] - ends[i - 1])
    if not durations and ends and s.ready_time is not None:
        durations.append(ends[0] - s.ready_time)
    prof.step_s = median(durations)
    if not clean and prof.step_s:
        p.notes.append("no clean step was left (raise --steps to 3 or more): step time includes instrumentation")

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
    states = prof.param_bytes + prof.buffer_bytes + prof.optimizer_state_bytes
    acts = sum(b.activation_bytes for b in prof.blocks) + prof.other_activation_bytes
    grads_fwd = prof.grad_bytes if prof.grads_persist else 0
    at_loss = states + grads_fwd + acts
    at_opt = states + prof.grad_bytes
    phase, total = ("loss", at_loss) if at_loss >= at_opt else ("optimizer", at_opt)
    prof.peak = Peak(allocated_bytes=int(total), reserved_bytes=0, phase=phase, measured=False)
    if not prof.step_start_bytes:
        prof.step_start_bytes = int(states + grads_fwd)


def profile_script(script: str | None = None, *, module: str | None = None, argv: Sequence[str] = (),
                   steps: int = 5, warmup: int = 1, stop: bool = True, blocks_pattern: str | None = None,
                   output: str | os.PathLike | None = None, force: bool = False, measure_hardware: bool = True,
                   on_progress: Callable[[int, int | None], None] | None = None,
                   memory_timeline: bool = False) -> Profile:
    """Run `script` (or `-m module`) with `argv` for `warmup + steps` optimizer steps and return its Profile.

    Writes it to `output` when given (refusing an existing file unless `force`; rank 0 only). A script that
    raises -> `ScriptFailed` carrying the partial profile (saved to `output` first); one that builds no
    optimizer or never steps -> `ScriptError` saying what was seen. `memory_timeline`: on a GPU, record the
    allocator's history over the memory step and write it beside `output` (PROFILE.memory.pickle, a
    `torch.cuda.memory._snapshot()`; pytorch.org/memory_viz opens it too), named in `extra.memory_timeline`.
    """
    from memtune.io import check_writable

    out_path = check_writable(output, force) if output is not None else None
    session = Session(script, module=module, argv=argv, steps=steps, warmup=warmup, stop=stop,
                      blocks_pattern=blocks_pattern)
    prof_state = _Profiler(session, on_progress=on_progress)
    prof_state.memory_timeline = memory_timeline
    session.on_before_run.append(prof_state.before_run)
    session.on_ready.append(prof_state.ready)
    session.on_step.append(prof_state.on_step)
    session.on_end.append(prof_state.end)
    start = datetime.datetime.now(datetime.timezone.utc)
    session.run()

    prof = Profile(memtune_version=__version__, torch_version=torch.__version__,
                   created=start.isoformat(timespec="seconds"), script=script, module=module, argv=list(argv),
                   cwd=os.getcwd(), steps=0, warmup=warmup)
    prof.extra["session"] = {"steps_done": session.steps_done, "stopped": session.stopped,
                             "scaler_skipped_steps": session.scaler_skipped,
                             "wall_s": (session.end_time or 0) - (session.start_time or 0)}
    if session.model is not None:
        try:
            _assemble(prof_state, session, prof)
        except Exception as e:  # a half-measured step after a crash must not hide the script's own error
            if session.failure is None:
                raise
            prof.notes.append(f"profile incomplete ({type(e).__name__}: {e})")
        prof.hardware = _hardware(prof.device, measure_hardware)
    prof.steps = max(0, session.steps_done - warmup)
    if prof_state.clip_grad_norm is not None:
        prof.extra["clip_grad_norm"] = prof_state.clip_grad_norm
    prof.notes.extend(prof_state.notes)
    if len(session.optimizers) > 1:
        prof.notes.append(f"{len(session.optimizers)} optimizers: steps counted on the first "
                          f"({type(session.optimizers[0]).__name__})")
    if session.scaler_skipped:
        prof.notes.append(f"GradScaler skipped {session.scaler_skipped} optimizer step(s) (inf/nan gradients)")
    if steps and session.steps_done < warmup + steps and session.failure is None:
        prof.notes.append(f"the script ended after {session.steps_done} steps, before the {warmup + steps} asked for")

    is_main = session.rank == 0
    if session.failure is not None:
        prof.extra["script_failure"] = {"exc_type": session.failure.exc_type, "message": session.failure.message}
        saved = None
        if out_path is not None and is_main and session.model is not None:
            prof.save(out_path)
            saved = str(out_path)
        raise ScriptFailed(session.failure, prof, saved)
    if not session.optimizers:
        raise ScriptError(
            f"{session.name} built no torch.optim optimizer (it ran to its end"
            f"{' and exited' if not session.stopped else ''}): memtune profiles training scripts that call "
            "optimizer.step(); check the arguments after --")
    if session.model is None:
        raise ScriptError(
            f"{session.name} built {type(session.optimizers[0]).__name__} but no nn.Module holding its parameters "
            "ran a forward: memtune needs the model as a torch.nn.Module")
    if session.steps_done == 0:
        raise ScriptError(
            f"{session.name} built {type(session.optimizers[0]).__name__} for {type(session.model).__name__} "
            f"({len(prof.blocks)} blocks) but never called optimizer.step(): check its arguments (e.g. --steps)")
    if session.steps_done <= warmup:
        raise ScriptError(
            f"{session.name} ran only {session.steps_done} optimizer step(s), all of them warm-up: "
            f"lower --warmup (now {warmup}) or let the script run more steps")
    if memory_timeline:
        _save_memory_timeline(prof, prof_state.snapshot, out_path if is_main else None)
    if out_path is not None and is_main:
        prof.save(out_path)
    return prof


def _save_memory_timeline(prof: Profile, snapshot: dict[str, Any] | None, out_path: Any) -> None:
    import pickle

    from memtune.io import write_bytes_atomic

    if snapshot is None:
        prof.notes.append("--memory-timeline needs a CUDA GPU (PyTorch's allocator history): not recorded")
        return
    if out_path is None:
        prof.notes.append("--memory-timeline is written beside the profile file: give -o to keep it")
        return
    path = out_path.with_name(out_path.stem + ".memory.pickle")
    write_bytes_atomic(path, pickle.dumps(snapshot))
    prof.extra["memory_timeline"] = path.name  # relative: the report looks beside the profile


# --- rendering (the CLI's summary) -----------------------------------------------------------------------


def render_profile(prof: Profile, console: Any, top: int = 5) -> None:
    """Rich summary: model states, top blocks by activation memory, peak and its phase, step time."""
    from rich.table import Table

    from memtune.units import format_bytes as fb
    from memtune.units import format_seconds as fs

    where = prof.script or f"-m {prof.module}"
    hw = prof.hardware
    dev = hw.gpu_name or f"CPU ({hw.cpu_cores} cores)"
    t = Table(title=f"memtune profile: {where} on {dev}", show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("model", f"{prof.model_cls.rsplit('.', 1)[-1]}: {len(prof.repeated_blocks)} repeated "
              f"{prof.repeated_blocks[0].cls if prof.repeated_blocks else ''} blocks, {len(prof.blocks)} blocks in all")
    t.add_row("parameters", f"{fb(prof.param_bytes)} ({fb(prof.trainable_param_bytes)} trainable)")
    t.add_row("gradients", fb(prof.grad_bytes) + (" (kept between steps)" if prof.grads_persist else ""))
    for o in prof.optimizers:
        t.add_row("optimizer", f"{o.kind}: state {fb(o.state_bytes)}, step {fs(o.step_s)}")
    acts = sum(b.activation_bytes * b.calls_per_step for b in prof.blocks)
    t.add_row("activations", f"{fb(acts)} in blocks + {fb(prof.other_activation_bytes)} outside (loss, glue)"
              + (f", per micro-batch ({prof.micro_batches_per_step} per step)" if prof.micro_batches_per_step > 1 else ""))
    label = "measured (allocator)" if prof.peak.measured else "sum of measured parts (CPU: no allocator)"
    at = f" in {prof.peak.where}" if prof.peak.where else ""
    t.add_row("peak", f"{fb(prof.peak.allocated_bytes)} during {prof.peak.phase}{at}, {label}"
              + (f"; reserved {fb(prof.peak.reserved_bytes)}" if prof.peak.reserved_bytes else ""))
    t.add_row("step time", f"{fs(prof.step_s)} (forward {fs(prof.fwd_s)}, backward {fs(prof.bwd_s)}, "
              f"optimizer {fs(prof.optimizer_s)}), median of clean steps")
    batch = []
    if prof.batch_size:
        batch.append(f"batch {prof.batch_size}")
    if prof.seq_len:
        batch.append(f"sequence {prof.seq_len}")
    if prof.tokens_per_step:
        batch.append(f"{prof.tokens_per_step} tokens/step")
    if batch:
        t.add_row("inputs", ", ".join(batch))
    run = [f"{prof.steps} steps after {prof.warmup} warm-up"]
    if prof.autocast:
        run.append(f"autocast {prof.autocast}")
    if prof.grad_scaler:
        run.append("GradScaler")
    if prof.hf_gradient_checkpointing:
        run.append("HF gradient checkpointing on")
    if prof.world_size > 1:
        run.append(f"world size {prof.world_size}" + (" (DDP)" if prof.ddp else ""))
    t.add_row("run", ", ".join(run))
    console.print(t)

    if prof.blocks:
        bt = Table(title=f"top {min(top, len(prof.blocks))} blocks by activation memory", title_justify="left")
        shown = sorted(prof.blocks, key=lambda b: -b.activation_bytes)[:top]
        # no class column (the model line names the repeated class): the path, which a plan refers to, gets
        # the room and folds rather than truncates
        for c in ("block", "params", "activations", "transient", "fwd", "bwd"):
            bt.add_column(c, justify="left" if c == "block" else "right", overflow="fold" if c == "block" else "ellipsis",
                          min_width=min(28, max(len(b.name) for b in shown)) if c == "block" else None)
        for b in shown:
            bt.add_row(b.name, fb(sum(b.param_bytes.values())), fb(b.activation_bytes),
                       fb(max(b.transient_bytes, b.bwd_transient_bytes)), fs(b.fwd_s), fs(b.bwd_s))
        console.print(bt)
    for n in prof.notes:
        console.print(f"note: {n}", highlight=False)
