"""The recorder: the hooks `memtune profile` puts into a running script, and what they record per step.

Steps (a step is one optimizer.step()):
    warm-up steps (W)      nothing per block, only cheap model-level marks
    step W   "memory"      saved-tensor hooks, per-block marks reading the CUDA allocator's peak
    step W+1 "timing"      per-block marks recording CUDA events (no saved-tensor hooks)
    the rest "clean"       model-level marks only: step_s, fwd_s, bwd_s, optimizer_s are their medians
With --steps 2 the memory and timing passes share step W; with --steps 1 step_s is that instrumented step.
What-if probes (probes.py) run after the measured steps on inputs the memory step kept.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.optim.optimizer as _optim_mod

from memtune.capture import Session
from memtune.profilers import memory as mem
from memtune.profilers.probes import (
    OTHER_PROBE,
    has_fp32_weights,
    map_tensors,
    probe_modes,
    probe_worthy,
    saved_bytes_bf16_params,
    to_host,
)
from memtune.profilers.timing import Clock
from memtune.undo import Undos, patch_functions


@dataclass
class _Mark:
    label: tuple  # ("fwd", block) ("fwd_end", block) ("model", ) ("loss", ) ("bwd_call", ) ("bwd", block) ("bwd_end", )
    #               ("opt", ) ("opt_end", )
    clock: Any
    alloc: int = 0  # allocated at the mark
    peak_before: int = 0  # peak allocated in the interval that this mark closes
    reserved_peak_before: int = 0


# A torch.compile'd model is profiled eagerly (hooks must see every module), then run this many more steps
# compiled, without hooks: the first compiles, the others measure the peak and step time the script really
# has (compiled kernels fuse what eager code saves: zoo compiled.py's peak was 33% under the eager profile's)
COMPILED_STEPS = 4
# a compiled step that compiled again (a float that changes each step, as an LR schedule's, is specialised once
# before Dynamo makes it dynamic) is not the run's step time: such steps are left out of it


def _graphs_compiled() -> int:
    try:
        from torch._dynamo.utils import counters
    except Exception:  # no Dynamo: nothing compiled
        return 0
    return int(counters["stats"]["unique_graphs"])

_PHASE = {"model": "forward", "fwd": "forward", "fwd_end": "forward", "loss": "loss", "bwd_call": "loss",
          "bwd": "backward",
          "bwd_end": "optimizer", "opt": "optimizer", "opt_end": "optimizer"}


@dataclass
class StepRecord:
    index: int
    mode: str
    marks: list[_Mark] = field(default_factory=list)
    forwards: int = 0
    block_calls: dict[str, int] = field(default_factory=dict)
    closure: bool = False  # optimizer.step(closure) ran the forward and backward (Lightning)


def block_of(label: tuple) -> str | None:
    return label[1] if len(label) > 1 else None


class Profiler:
    def __init__(self, session: Session, *, on_progress: Callable[[int, int | None], None] | None = None):
        self.s = session
        self.on_progress = on_progress
        self.cuda = False
        self.clock: Clock | None = None
        self.peaks: mem.PeakTracker | None = None
        self.counter: mem.SavedTensorCounter | None = None
        self.repeated_ran = False  # a repeated block's forward ran in the memory step
        self.stack: list[str] = []
        self.model_handles: list[Any] = []
        self.block_handles: list[Any] = []
        self.step: StepRecord | None = None
        self.records: list[StepRecord] = []
        self.mode = "warmup"
        self.in_backward = False
        self.saved_ctx = None
        self.inputs_seen = False
        self.batch_size: int | None = None
        self.seq_len: int | None = None
        self.autocast: str | None = None
        self.autocast_cache = True  # autocast keeps its weight casts until the region ends (Lightning turns it off)
        self.io_bytes: dict[str, list[int]] = {}  # block -> [input, output]
        # block -> bytes of its inputs an earlier block of the step took as input too (a mask, a position
        # bias): a checkpointed block keeps them, but they are live once however many blocks take them
        self.shared_input_bytes: dict[str, int] = {}
        self._inputs = mem.SharedInputs()
        self.first_order: list[str] = []  # blocks in observed forward order
        self.step_start_bytes = 0
        self.grads_persist = False
        self.grad_bytes = 0
        self.opt_state_bytes_at: dict[int, int] = {}
        self.undo_compile: Callable[[], None] | None = None
        self.compiled_steps = 0  # steps added after the eager ones to run compiled
        self.compiled_done: list[int] = []  # indices of the compiled steps run
        self.compiled_again: set[int] = set()  # of those, the steps that compiled a graph
        self._graphs = 0
        self.script_compiles = False  # the script torch.compile'd a function (not its model): _watch_compile
        self.compiled_peak = 0  # allocator peak over the compiled steps after the first (CUDA)
        self.notes: list[str] = []
        self.state_ptrs: set[int] = set()
        self.mem_forward_done = False
        self.clip_grad_norm: float | None = None  # max_norm of the script's global-norm clipping, if any
        # how long the GPU still ran the step's backward after the script called optimizer.step() (the timing
        # step, on a GPU): what an offloaded update can overlap before the last gradient is even computed
        self.backward_lag_s: float | None = None
        self._lag_thread: threading.Thread | None = None
        self.memory_timeline = False  # record the allocator's history over the memory step (CUDA)
        self.device = torch.device("cpu")
        self.recording = False
        self.snapshot: dict[str, Any] | None = None
        # bf16-weights what-if probe: class -> (module, host copy of its first call's args/kwargs) taken in
        # the memory step; class -> saved bytes, measured in `end`
        self.probe_inputs: dict[str, tuple[nn.Module, Any]] = {}
        self.probe_bytes: dict[str, int] = {}
        self.mode_probes: dict[str, dict[str, Any]] = {}  # class -> mode -> WhatIf (CUDA only)
        self.other_modules: tuple[int, list[str]] = (0, [])  # modules no optimizer trains (EMA, teacher)
        self.head_node: Any = None  # autograd node of the linear head's output in the memory step
        self.head_output_uses: list[str] | None = None  # what feeds on it besides F.cross_entropy

    # --- plan of the steps ---------------------------------------------------------------------------
    def mode_for(self, i: int) -> str:
        w, n = self.s.warmup, self.s.steps
        if i < w:
            return "warmup"
        if n is not None and i >= w + n:
            return "off"
        if n is not None and self.compiled_steps:
            n -= self.compiled_steps
            if i >= w + n:
                return "compiled"
        k = i - w
        if n is not None and n <= 2:
            return "both" if k == 0 else "clean"
        return {0: "memory", 1: "timing"}.get(k, "clean")

    # --- session callbacks ---------------------------------------------------------------------------
    def _set_device(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.clock = Clock(self.cuda)
        self.peaks = mem.PeakTracker(self.cuda)

    def ready(self, s: Session) -> None:
        model = s.model
        self._set_device(s.device)
        self.counter = mem.SavedTensorCounter(self._owner, self.state_ptrs)
        if self._runs_compiled(s):
            self.undo_compile = _run_eagerly(s)
        self._add_compiled_steps(s)
        self.model_handles = [
            model.register_forward_pre_hook(self.model_pre, with_kwargs=True),
            model.register_forward_hook(self.model_post),
            _optim_mod.register_optimizer_step_pre_hook(self.opt_pre),
        ]
        self.set_mode(self.mode_for(0))

    def _runs_compiled(self, s: Session) -> bool:
        """The script runs compiled code of its own: a compiled model (wrapped, or `module.compile()`), or a
        function it compiled (`_watch_compile`)."""
        return (s.compiled or getattr(s.model, "_compiled_call_impl", None) is not None
                or self.script_compiles)

    def _add_compiled_steps(self, s: Session) -> None:
        """Once the model is seen compiled (at ready, or at a step's end when the script compiles it after
        building its optimizer): the compiled steps go after the eager ones."""
        if not self.compiled_steps and s.steps and s.model is not None and self._runs_compiled(s):
            self.compiled_steps = COMPILED_STEPS
            s.steps += COMPILED_STEPS

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
        if mode in ("memory", "both") and self.head_output_uses is None:
            head, why_not = _find_head(self.s.model)
            if head is not None:
                self.block_handles.append(head.register_forward_hook(self._head_post))
            else:
                self.head_output_uses = [why_not]
        if mode in ("memory", "timing", "both"):
            for b in self.s.blocks:
                self.block_handles.append(b.module.register_forward_pre_hook(self._block_pre(b.name, b.kind),
                                                                             with_kwargs=True))
                self.block_handles.append(b.module.register_forward_hook(self._block_post(b.name)))
        if mode == "compiled":
            self._enter_compiled()

    def _enter_compiled(self) -> None:
        """After the eager steps: probe (the blocks run eagerly), then give the script its compiled model back
        with no hook of ours on it."""
        self._close_saved_hooks()
        self._probe(self.s)
        for h in self.model_handles:
            h.remove()
        self.model_handles = []
        if self.undo_compile is not None:
            self.undo_compile()
            self.undo_compile = None
        stance = getattr(torch.compiler, "set_stance", None)
        if stance is not None:
            stance("default")
        self._graphs = _graphs_compiled()

    def _compiled_step_done(self, i: int) -> None:
        self.compiled_done.append(i)
        graphs = _graphs_compiled()
        if graphs != self._graphs:
            self.compiled_again.add(i)
        self._graphs = graphs
        if not self.cuda:
            return
        if len(self.compiled_done) == 1:  # the compiling step: its peak is not the run's
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.compiled_peak = max(self.compiled_peak, torch.cuda.max_memory_allocated())

    def on_step(self, s: Session, i: int) -> None:
        rec = self.step
        if rec is not None and rec.index == i:
            self.finish_step(rec)
        self.step = None
        self._add_compiled_steps(s)
        if self.mode == "compiled":
            self._compiled_step_done(i)
        if self.on_progress:
            self.on_progress(s.steps_done, s.target_steps)
        nxt = self.mode_for(i + 1)
        if nxt != self.mode:
            self.set_mode(nxt)
        if s.target_steps is not None and s.steps_done >= s.target_steps:
            # the last measured step: probe now, while the model is where it ran (a framework may move it
            # back to the CPU when the script ends: Lightning's teardown)
            self._close_saved_hooks()
            self._probe(s)

    def before_run(self, s: Session) -> Callable[[], None] | None:
        """torch.compile'd code runs eagerly while profiling: per-module hooks and saved-tensor hooks must see
        every module, and compiling would be measured as the first steps' time. Global-norm clipping is
        recorded: update-in-backward cannot honour it, so the tuner must know."""
        undos = Undos()
        undos.add(self._watch_clipping())
        undos.add(self._watch_backward())
        undos.add(self._watch_compile())
        stance = getattr(torch.compiler, "set_stance", None)
        if stance is not None:
            stance("force_eager")
            undos.add(lambda: stance("default"))
        return undos

    def _head_post(self, module, args, output) -> None:
        rec = self.step
        if (rec is not None and rec.mode in ("memory", "both") and self.head_node is None
                and isinstance(output, torch.Tensor) and output.grad_fn is not None):
            self.head_node = output.grad_fn

    def _see_head_uses(self, roots) -> None:
        """Whether the fused loss could skip the logits: what the head's output feeds, from the loss's graph."""
        from memtune.strategies.loss import head_output_uses

        roots = [roots] if isinstance(roots, torch.Tensor) else list(roots or [])
        try:
            self.head_output_uses = head_output_uses(roots, self.head_node)
        except Exception as e:  # an observation: its failure costs the answer, not the profile
            self.notes.append(f"the head's output uses were not seen ({type(e).__name__}: {str(e)[:100]})")
            self.head_output_uses = None  # unknown: the fused loss keeps its formula
        self.head_node = None

    def _watch_backward(self) -> Callable[[], None]:
        """Mark the call of backward in the memory step: the peak before it is the forward's, while autocast's
        cache still holds the 16-bit weight copies (freed when the autocast region ends, before backward in
        the usual script), which a checkpointed block's copies outlive."""

        def wrap(orig):
            def watched(*args, **kwargs):
                rec = self.step
                if rec is not None and not self.in_backward and rec.mode in ("memory", "both"):
                    self.mark("bwd_call")
                    if self.head_node is not None and self.head_output_uses is None:
                        self._see_head_uses(args[0] if args else kwargs.get("tensors"))
                return orig(*args, **kwargs)

            return watched

        return patch_functions([(torch.autograd, "backward")], wrap)

    def _watch_compile(self) -> Callable[[], None]:
        """A script that compiles a function (its train step, its loss) rather than its model runs that compiled
        too: the force_eager stance hides it while profiling, so the compiled steps are added for it as for a
        compiled model. Calls from torch or installed libraries (flex attention's own compile) do not count."""
        lib_dirs = tuple(os.path.dirname(d) + os.sep for d in (torch.__file__, os.__file__))

        def wrap(orig):
            def watched(model=None, *args, **kwargs):
                caller = sys._getframe(1).f_code.co_filename
                if (not isinstance(model, torch.nn.Module) and not caller.startswith(lib_dirs)
                        and "-packages" + os.sep not in caller):
                    self.script_compiles = True
                return orig(model, *args, **kwargs)

            return watched

        return patch_functions([(torch, "compile")], wrap)

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
        if self._runs_compiled(s):
            self.notes.append(
                ("the model is torch.compile'd" if not self.script_compiles else
                 "the script torch.compile's a function") + ": its blocks profiled eagerly"
                + (f", then {len(self.compiled_done)} steps run compiled for its real peak and step time"
                   if len(self.compiled_done) >= 2 else
                   " (compiled kernels fuse some activations, so the measured activations are an upper bound)"))
        self._close_saved_hooks()
        for h in self.block_handles + self.model_handles:
            h.remove()
        self.block_handles, self.model_handles = [], []
        self._probe(s)
        if self.undo_compile is not None:
            self.undo_compile()

    # --- what-if: bf16 weights -----------------------------------------------------------------------
    def _any_repeated(self) -> bool:
        return any(b.kind == "repeated" for b in self.s.blocks)

    def _stash_probe_input(self, module: nn.Module, args: tuple, kwargs: dict, name: str | None = None) -> None:
        """Keep a host copy of the first call's inputs of one repeated block per class (or, in a model without
        repeated blocks, of each block: `name`, keyed OTHER_PROBE + name): a copy, so that the memory step's
        allocator peak is unchanged (only this step's times pay for the device-to-host copy)."""
        key = type(module).__name__ if name is None else OTHER_PROBE + name
        if key in self.probe_inputs or not probe_worthy(module):
            return
        self.probe_inputs[key] = (module, map_tensors((args, kwargs), to_host))

    def _worth_probing(self, stash: dict[str, tuple[nn.Module, Any]]) -> dict[str, tuple[nn.Module, Any]]:
        """Without repeated blocks, only the blocks the tuner gives a choice (a tenth of the saved bytes:
        `strategies.layout.exception_blocks`) are probed; repeated block classes always are."""
        from memtune.strategies.layout import ALONE_SHARE

        saved = self.counter.bytes if self.counter is not None else {}
        others = {k: saved.get(k[len(OTHER_PROBE):], 0) for k in stash if k.startswith(OTHER_PROBE)}
        floor = ALONE_SHARE * sum(saved.get(b.name, 0) for b in self.s.blocks)
        return {k: v for k, v in stash.items() if k not in others or (others[k] >= max(1, floor))}

    def _probe(self, s: Session) -> None:
        """The what-ifs, after the measured steps, on each stashed block class (the copies are freed at once):
        - its saved bytes with bf16 weights and bf16 floating inputs, under the script's autocast: the dtypes
          an fp32 profile cannot show (HF RMSNorm's `.to(input_dtype)`, a bf16 residual stream);
        - on a GPU, its memory and time in each block mode (keep, recompute, selective, compress, offload)."""
        stash, self.probe_inputs = self.probe_inputs, {}
        if not stash or s.failure is not None or (s.world_size > 1 and not s.ddp):
            return  # a sharded block's forward would run collectives on this rank alone
        for cls, (module, inputs) in self._worth_probing(stash).items():
            if has_fp32_weights(module) and not cls.startswith(OTHER_PROBE):
                try:
                    self.probe_bytes[cls] = saved_bytes_bf16_params(s.model, module, inputs, self.device,
                                                                    self.autocast, self.autocast_cache)
                except Exception as e:  # the probe is an extra: a failure costs its number, not the profile
                    self.notes.append(f"bf16-weights probe of {cls} failed ({type(e).__name__}: {str(e)[:200]}): "
                                      "estimates of bf16 parameters fall back to dropping autocast's weight copies")
            if self.cuda and next(module.parameters()).device == self.device:
                try:
                    self.mode_probes[cls] = probe_modes(s.model, module, inputs, self.device, self.autocast,
                                                        autocast_cache=self.autocast_cache,
                                                        batch=self.batch_size)
                except Exception as e:
                    self.notes.append(f"block-mode probe of {cls} failed ({type(e).__name__}: {str(e)[:200]}): "
                                      "its modes are estimated by formula")
                    if self.cuda:
                        torch.cuda.empty_cache()
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

    def _begin_step(self) -> None:
        if self.step is None:
            self.step = StepRecord(self.s.steps_done, self.mode)
            self.in_backward = False
            if self.mode in ("memory", "both"):
                self.begin_memory_step()

    def model_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.mode == "off":
            return
        if not self.inputs_seen and self.s.device != self.device:
            # moved after its optimizer was built (accelerate's prepare, Lightning): measure where it runs
            self._set_device(self.s.device)
        self._begin_step()
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
        if not self.s._primary(opt) or self.mode == "off":
            return
        if self.step is None or self.step.forwards == 0:
            # optimizer.step(closure) before any forward (Lightning): forward and backward run inside it
            self._begin_step()
            self.step.closure = True
            self.mark("opt")
            return
        if self.step.mode in ("memory", "both"):
            self.grad_bytes = sum(mem.grad_bytes(m) for m in self.s.models or [self.s.model])
            self._close_saved_hooks()
        self.mark("opt")
        if self.step.mode == "timing" and self.cuda and self._lag_thread is None:
            self._watch_backward_lag()

    def _watch_backward_lag(self) -> None:
        """Time from now until the GPU reaches this point, read on a thread (the script goes on at once)."""
        ev = torch.cuda.Event()
        ev.record()
        t0 = time.perf_counter()

        def wait() -> None:
            ev.synchronize()  # releases the GIL
            self.backward_lag_s = time.perf_counter() - t0

        self._lag_thread = threading.Thread(target=wait, name="memtune-lag", daemon=True)
        self._lag_thread.start()

    def backward_lag(self) -> float | None:
        if self._lag_thread is not None:
            self._lag_thread.join(timeout=60)
        return self.backward_lag_s

    def begin_memory_step(self) -> None:
        model = self.s.model
        self.state_ptrs.clear()
        for m in self.s.models or [model]:
            self.state_ptrs.update(mem.state_ptrs(m))
        self.grads_persist = any(p.grad is not None for m in self.s.models or [model] for p in m.parameters()
                                 if p.requires_grad)
        self.other_modules = mem.other_module_bytes(self.s.models or [model], self.device)
        self.counter.reset()
        self.counter.active = True
        self.repeated_ran = False
        self.io_bytes.clear()
        self.shared_input_bytes.clear()
        self._inputs.clear()
        self.saved_ctx = self.counter.hooks()
        self.saved_ctx.__enter__()
        if self.cuda:
            self.peaks.read()  # start the step's first interval fresh
            self.step_start_bytes = torch.cuda.memory_allocated()

    def _owner(self) -> str | None:
        if self.stack:
            return self.stack[-1]
        return None if self.repeated_ran else mem.BEFORE_BLOCKS

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
            if self.autocast is None and rec.forwards == 1:
                self._see_autocast()
            calls = rec.block_calls.get(name, 0)
            rec.block_calls[name] = calls + 1
            if kind == "repeated":
                self.repeated_ran = True
            if rec.mode in ("memory", "both") and calls == 0:
                total, shared = self._inputs.take((args, kwargs), self.state_ptrs)
                self.io_bytes[name] = [total, 0]
                self.shared_input_bytes[name] = shared
                if name not in self.first_order:
                    self.first_order.append(name)
                if rec.forwards == 1 and (kind == "repeated" or not self._any_repeated()):
                    self._stash_probe_input(module, args, kwargs, None if kind == "repeated" else name)
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

    def _see_autocast(self) -> None:
        """The autocast in effect: at the model's input, or (accelerate, HF Trainer wrap the forward in it)
        inside its first block."""
        dev = self.device.type
        try:
            if torch.is_autocast_enabled(dev):
                self.autocast = str(torch.get_autocast_dtype(dev)).replace("torch.", "")
                self.autocast_cache = bool(torch.is_autocast_cache_enabled())
        except (TypeError, RuntimeError, AttributeError):
            pass

    def observe_inputs(self, args: tuple, kwargs: dict) -> None:
        self._see_autocast()
        cands = [kwargs[k] for k in ("input_ids", "inputs_embeds", "pixel_values", "x", "input", "inputs")
                 if isinstance(kwargs.get(k), torch.Tensor)]
        cands += [a for a in mem.iter_tensors(args)]
        cands += [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
        seq_first = any(isinstance(m, (nn.RNNBase,)) and not getattr(m, "batch_first", False)
                        for m in self.s.model.modules())
        for t in cands:
            if seq_first and t.dim() >= 2:  # an RNN without batch_first reads (sequence, batch, ...)
                self.seq_len, self.batch_size = int(t.shape[0]), int(t.shape[1])
                break
            if t.dim() >= 1:
                self.batch_size = int(t.shape[0])
                if t.dim() == 2 and not t.is_floating_point():
                    self.seq_len = int(t.shape[1])  # token ids: (batch, sequence)
                elif t.dim() == 3 and t.is_floating_point() and t.shape[1] > 1:
                    self.seq_len = int(t.shape[1])  # embeddings: (batch, sequence, width)
                break

    def finish_step(self, rec: StepRecord) -> None:
        if self.clock is not None:
            self.clock.sync()
        if rec.mode in ("memory", "both") and rec.closure:
            self.grad_bytes = sum(mem.grad_bytes(m) for m in self.s.models or [self.s.model])
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


def _find_head(model: nn.Module) -> tuple[nn.Module | None, str]:
    """The linear head the fused loss would take (strategies/loss.py `find_head`), or why there is none."""
    from memtune.strategies.loss import NO_BIAS, NO_HEAD, find_head

    try:
        _, head = find_head(model)
    except Exception:
        head = None
    if not isinstance(head, nn.Linear):
        return None, NO_HEAD
    return (None, NO_BIAS) if head.bias is not None else (head, "")


def _first_grad_tensor(obj: Any) -> torch.Tensor | None:
    for t in mem.iter_tensors(obj):
        if t.requires_grad and t.grad_fn is not None:
            return t
    return None


def _run_eagerly(s: Session) -> Callable[[], None]:
    """Make a torch.compile'd model run its eager forward while profiling (hooks see every module)."""
    undos = Undos()
    w = s.wrapper
    if w is not None and hasattr(w, "_orig_mod") and "forward" in w.__dict__:
        old = w.__dict__["forward"]
        w.forward = w._orig_mod.__call__
        undos.add(lambda: setattr(w, "forward", old))
    m = s.model
    if getattr(m, "_compiled_call_impl", None) is not None:
        old_impl = m._compiled_call_impl
        m._compiled_call_impl = None
        undos.add(lambda: setattr(m, "_compiled_call_impl", old_impl))
    return undos
