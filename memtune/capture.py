"""Session: run an unchanged training script in-process and get inside it.

`memtune profile` (observe) and `memtune apply` (act) both run the user's script through a `Session`:

    s = Session("train.py", argv=["--batch-size", "8"], steps=5, warmup=2)
    s.on_ready.append(lambda s: print(s.model, s.blocks))     # model + first optimizer exist, no forward yet
    s.on_step.append(lambda s, i: print("step", i))           # after every optimizer step (i from 0)
    s.run()                                                    # s.failure / s.stopped say how it ended

How it gets in (no change to the script):
- `torch.optim.Optimizer.__init__` is wrapped, which catches every optimizer subclass; when the first one is
  built, the model is the top-level `nn.Module` holding its parameters (found with `gc`, unwrapped from
  DistributedDataParallel / torch.compile). A model built after its optimizer is found at its first forward.
- Steps are counted with `register_optimizer_step_post_hook`; `GradScaler.step` is wrapped too so a step the
  scaler skips (inf/nan gradients) still counts as one step of the training loop.
- After `warmup + steps` steps `StopRun` (a BaseException, so a script's `except Exception` cannot swallow
  it) is raised from the step hook; the runner catches it.
- With `relaunch` (the CLI's own command), a script that starts itself again for its other ranks (Lightning's
  `Trainer(devices=N, strategy="ddp")` runs `sys.executable sys.argv...`) starts that command instead, so every
  rank runs under memtune and stops at the same step.
Every global patch is undone when `run()` returns, also on failure.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import os
import runpy
import subprocess
import sys
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.optim.optimizer as _optim_mod

from memtune.blocks import BlockRef, find_blocks, is_wrapper, unwrap_model, unwrap_optimizer
from memtune.errors import InputError, ScriptError
from memtune.undo import Undos

__all__ = ["ScriptFailure", "Session", "StopRun"]


class StopRun(BaseException):
    """Raised inside the script after the wanted steps; `Session.run` catches it."""


@dataclass
class ScriptFailure:
    exc_type: str
    message: str
    traceback: str  # the script's own frames only (memtune's runner frames removed)

    def __str__(self) -> str:
        return f"{self.exc_type}: {self.message}" if self.message else self.exc_type


# --- models ------------------------------------------------------------------------------------------


def _find_model(params: set[int]) -> nn.Module | None:
    """The top-level module (not a child of another candidate) holding most of the given parameters."""
    cands = []
    for obj in gc.get_objects():
        if not issubclass(type(obj), nn.Module):  # type(), not isinstance: no __class__ lookups on proxies
            continue
        n = sum(1 for p in obj.parameters() if id(p) in params)
        if n:
            cands.append((n, obj))
    if not cands:
        return None
    inner = {id(m) for _, c in cands for m in c.modules() if m is not c}
    tops = [(n, c) for n, c in cands if id(c) not in inner]
    tops.sort(key=lambda t: -t[0])
    return tops[0][1]


def _optimizer_param_ids(opt: torch.optim.Optimizer) -> set[int]:
    return {id(p) for g in opt.param_groups for p in g["params"]}


# --- the session -------------------------------------------------------------------------------------

_RUNNER_FILES = {os.path.abspath(__file__), os.path.abspath(runpy.__file__)}


def _script_traceback(exc: BaseException) -> str:
    """Format `exc` without the runner's leading frames (runpy, this module): the user sees their own."""
    tb = exc.__traceback__
    def runner(f: str) -> bool:
        return f == "<frozen runpy>" or os.path.abspath(f) in _RUNNER_FILES

    while tb is not None and runner(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    if tb is None:
        tb = exc.__traceback__
    return "".join(traceback.format_exception(type(exc), exc, tb))


class Session:
    """Run one training script in-process as `__main__`, find its model and optimizer, count steps.

    Callbacks (append to the lists):
    - `on_before_run(session)`: before the script starts; may return an undo run after it ends (always).
    - `on_ready(session)`: once, when the first optimizer's `__init__` returned and the model is found
      (or, for a model built after its optimizer, at the model's first forward), before the first forward.
    - `on_optimizer(session, optimizer)` then `on_model(session, model)`: another optimizer built after
      on_ready, and its model when it is one not seen yet (a GAN's generator).
    - `on_step(session, i)`: after every optimizer step, i = 0, 1, ... counting warm-up steps too
      (`i >= session.warmup` are the measured ones; `session.measuring` says so for the current step).
    - `on_end(session)`: after the script ended (normally, stopped or failed), before the undos.
    Extra attributes beyond the API note: `device`, `wrapper` (the DDP/compile object around the model,
    if any), `compiled`, `ddp`, `world_size`, `rank`, `ready_time`, `scaler_steps`,
    `scaler_skipped`, `grad_scalers`.
    """

    def __init__(self, script: str | None = None, *, module: str | None = None, argv: Sequence[str] = (),
                 steps: int | None = None, warmup: int = 0, stop: bool = True,
                 blocks_pattern: str | None = None, relaunch: Sequence[str] | None = None):
        if (script is None) == (module is None):
            raise InputError("give a script path or -m module, not both and not neither")
        if steps is not None and steps < 1:
            raise InputError(f"--steps must be at least 1 (got {steps})")
        if warmup < 0:
            raise InputError(f"--warmup must be 0 or more (got {warmup})")
        self.script = script
        self.module = module
        self.argv = list(argv)
        self.steps = steps
        self.warmup = warmup
        self.stop = stop
        self.blocks_pattern = blocks_pattern
        self.relaunch = list(relaunch) if relaunch is not None else None
        self.relaunched: list[subprocess.Popen] = []  # the script's other ranks, started through `relaunch`
        self._relaunch_error: InputError | None = None

        self.on_before_run: list[Callable[[Session], Callable[[], None] | None]] = []
        self.on_ready: list[Callable[[Session], None]] = []
        self.on_step: list[Callable[[Session, int], None]] = []
        self.on_end: list[Callable[[Session], None]] = []
        # another optimizer built after on_ready (a GAN's second one): (session, optimizer), before on_model
        self.on_optimizer: list[Callable[[Session, torch.optim.Optimizer], None]] = []
        # another optimizer's model found after on_ready (a GAN's generator): (session, model)
        self.on_model: list[Callable[[Session, nn.Module], None]] = []

        self.model: nn.Module | None = None
        self.wrapper: nn.Module | None = None  # DDP / OptimizedModule the script wrapped the model in
        self.optimizers: list[torch.optim.Optimizer] = []
        self.optimizer_wrappers: list[torch.optim.Optimizer] = []  # wrappers of those (not counted twice)
        self.models: list[nn.Module] = []  # the model first, then other optimizers' models
        self._fwd_handle: Any = None
        self.blocks: list[BlockRef] = []
        self.steps_done = 0
        self.step_end_times: list[float] = []
        self.step_hook_s: list[float] = []  # time the on_step callbacks took after each step
        self.scaler_steps = 0  # steps that went through GradScaler.step (skipped ones included)
        self.scaler_skipped = 0
        self.grad_scalers: list[Any] = []  # enabled GradScalers seen stepping the first optimizer
        self.failure: ScriptFailure | None = None
        self.stopped = False
        self.ready = False
        self.ready_time: float | None = None
        self.start_time: float | None = None
        self.end_time: float | None = None
        self._pending_model = False  # optimizer seen, model not yet found
        self._world: tuple[int, int] | None = None  # (rank, world size) last seen on a live process group
        self._group_before = False  # a process group existed before the script ran (the caller's)

    # --- facts ---------------------------------------------------------------------------------------
    @property
    def target_steps(self) -> int | None:
        return None if self.steps is None else self.warmup + self.steps

    @property
    def measuring(self) -> bool:
        """True while the current step is a measured one (past warm-up, before the target)."""
        t = self.target_steps
        return self.steps_done >= self.warmup and (t is None or self.steps_done < t)

    @property
    def device(self) -> torch.device:
        if self.model is not None:
            for p in self.model.parameters():
                return p.device
        return torch.device("cpu")

    @property
    def compiled(self) -> bool:
        return self.wrapper is not None and hasattr(self.wrapper, "_orig_mod")

    @property
    def ddp(self) -> bool:
        return self.wrapper is not None and type(self.wrapper).__name__ == "DistributedDataParallel"

    def _live_world(self) -> tuple[int, int] | None:
        d = torch.distributed
        if d.is_available() and d.is_initialized():
            self._world = (d.get_rank(), d.get_world_size())
        return self._world  # a script that destroyed its group at its end keeps the rank it ran as

    @property
    def world_size(self) -> int:
        w = self._live_world()
        return w[1] if w is not None else 1

    @property
    def rank(self) -> int:
        w = self._live_world()
        return w[0] if w is not None else 0

    def end_group(self) -> None:
        """Destroy the process group the script created and left alive (it was stopped before its own
        destroy_process_group()), after syncing the ranks; only after a run that did not fail on this rank.
        A group that existed before the run is the caller's and stays."""
        from memtune.distributed import release_group

        if self.failure is None and not self._group_before:
            release_group(self.device)

    @property
    def name(self) -> str:
        return self.script if self.script is not None else f"-m {self.module}"

    # --- internals -----------------------------------------------------------------------------------
    def _sync_time(self) -> float:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def step_durations(self) -> list[float]:
        """Seconds from one step's end to the next's, less what our own on_step callbacks took in between:
        the profiler swapping its per-block hooks after the timing step is not the script's time."""
        ends, hooks = self.step_end_times, self.step_hook_s
        return [max(0.0, b - a - (hooks[k] if k < len(hooks) else 0.0))
                for k, (a, b) in enumerate(zip(ends, ends[1:], strict=False))]

    def _set_model(self, top: nn.Module) -> None:
        inner = unwrap_model(top)
        self.model = inner
        self.models = [inner]
        self.wrapper = top if inner is not top else None
        self.blocks = find_blocks(inner, self.blocks_pattern)

    def _fire_ready(self) -> None:
        self._live_world()
        self.ready = True
        self._pending_model = False
        self.ready_time = time.perf_counter()
        for cb in list(self.on_ready):
            cb(self)

    def _on_optimizer_init(self, opt: torch.optim.Optimizer) -> None:
        inner = unwrap_optimizer(opt)
        if inner is not opt and any(inner is o for o in self.optimizers):
            # a wrapper around an optimizer already seen (accelerate's AcceleratedOptimizer, which HF Trainer
            # uses): the same parameters and state, stepped through the inner one; counted once
            self.optimizer_wrappers.append(opt)
            return
        self.optimizers.append(opt)
        if self.ready or self._pending_model:
            if self.ready:
                for cb in list(self.on_optimizer):
                    cb(self, opt)
                self._add_model(_find_model(_optimizer_param_ids(opt)))
            return
        top = _find_model(_optimizer_param_ids(opt))
        if top is None:
            self._pending_model = True  # the model is built after its optimizer: catch its first forward
            return
        self._set_model(top)
        self._fire_ready()

    def _add_model(self, top: nn.Module | None) -> None:
        """Another optimizer's model (a GAN's generator, a second network): trained too, counted too."""
        if top is None:
            return
        m = unwrap_model(top)
        if all(m is not x for x in self.models) and not any(m in set(x.modules()) for x in self.models):
            self.models.append(m)
            for cb in list(self.on_model):
                cb(self, m)

    def _forward_pre(self, module: nn.Module, args: Any) -> None:
        if not self._pending_model:
            if self.model is None:
                return
            if self.wrapper is None and module is not self.model and is_wrapper(module) \
                    and unwrap_model(module) is self.model:
                self.wrapper = module  # wrapped (DDP, torch.compile) after its optimizer was built
            if module is self.model or module is self.wrapper:
                # the model's first forward: the global hook has seen what it needs, and must go before a
                # compiler traces the modules inside (Dynamo would trace into it and fail)
                self._drop_forward_hook()
            return
        ids = set().union(*(_optimizer_param_ids(o) for o in self.optimizers))
        if any(id(p) in ids for p in module.parameters()):
            # The outermost module's pre-hook fires first, so this is the top-level model (or its wrapper).
            self._set_model(module)
            self._fire_ready()

    def _drop_forward_hook(self) -> None:
        if self._fwd_handle is not None:
            self._fwd_handle.remove()
            self._fwd_handle = None

    def _after_step(self) -> None:
        self._live_world()
        i = self.steps_done
        self.steps_done += 1
        end = self._sync_time()
        self.step_end_times.append(end)
        try:
            for cb in list(self.on_step):
                cb(self, i)
        finally:
            self.step_hook_s.append(time.perf_counter() - end)
        t = self.target_steps
        if self.stop and t is not None and self.steps_done >= t:
            self.stopped = True
            raise StopRun

    def _primary(self, opt: Any) -> bool:
        # Count the first optimizer's steps: a script stepping two optimizers per iteration takes one step.
        return bool(self.optimizers) and opt is self.optimizers[0]

    def _relaunched(self, args: Any, env: Any) -> list[str] | None:
        """`relaunch` for a command that starts this script again as another rank, else None (the command
        stands). Another rank: the same script with a LOCAL_RANK of its own, as Lightning's launcher starts it."""
        if self.relaunch is None or isinstance(args, (str, bytes, os.PathLike)):
            return None
        try:
            cmd = [os.fspath(a) for a in args]
        except TypeError:
            return None
        local = (env if env is not None else os.environ).get("LOCAL_RANK")
        if local is None or local == os.environ.get("LOCAL_RANK") or len(cmd) < 2 \
                or os.path.realpath(cmd[0]) != os.path.realpath(sys.executable):
            return None
        if self.script is not None and os.path.abspath(cmd[1]) == os.path.abspath(self.script):
            rest = cmd[2:]
        elif self.module is not None and cmd[1:3] == ["-m", self.module]:
            rest = cmd[3:]
        else:
            return None
        if rest != [os.fspath(a) for a in self.argv]:
            # e.g. Lightning under Hydra adds overrides: memtune's command would run the rank without them
            self._relaunch_error = InputError(
                f"{self.name} starts its other ranks itself with other arguments ({' '.join(rest)}), which "
                "memtune cannot follow: launch it with `torchrun --nproc-per-node N -m memtune ...` instead")
            raise self._relaunch_error
        return list(self.relaunch)

    # --- run -----------------------------------------------------------------------------------------
    def _resolve(self) -> tuple[str, list[str]]:
        if self.script is not None:
            p = Path(self.script)
            if not p.exists():
                raise ScriptError(f"script {self.script} not found: check the path (relative to {os.getcwd()})")
            if p.is_dir() and not (p / "__main__.py").exists():
                raise ScriptError(f"{self.script} is a directory without __main__.py: give the training script")
            return str(p), [str(p.resolve().parent)]
        sys.path.insert(0, os.getcwd())  # as `python -m` does
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError) as e:
            spec = None
            why = f" ({type(e).__name__}: {e})"
        else:
            why = ""
        finally:
            sys.path.remove(os.getcwd())
        if spec is None:
            raise ScriptError(
                f"module {self.module} not found{why}: run from the directory that contains its package, "
                "or install it (as with `python -m`)"
            )
        return self.module, [os.getcwd()]

    def run(self) -> Session:
        target, path_add = self._resolve()
        saved_argv, saved_path = sys.argv[:], sys.path[:]
        undos = Undos()
        session = self

        # Optimizer construction: every optimizer class's own __init__ is wrapped (the base, the subclasses
        # known now, and classes defined later through __init_subclass__), and the outermost one to return
        # reports the optimizer, so a subclass that finishes its setup after super().__init__ is complete.
        patched_classes: list[tuple[type, Any]] = []

        def patch_class(cls: type) -> None:
            if "__init__" not in cls.__dict__ or "_memtune_orig_init" in cls.__dict__:
                return
            orig = cls.__dict__["__init__"]

            def init(opt, *args, _orig=orig, **kwargs):
                depth = opt.__dict__.get("_memtune_init_depth", 0)
                opt._memtune_init_depth = depth + 1
                try:
                    _orig(opt, *args, **kwargs)
                finally:
                    opt._memtune_init_depth = depth
                if depth == 0:
                    session._on_optimizer_init(opt)

            functools.update_wrapper(init, orig)
            cls._memtune_orig_init = orig
            cls.__init__ = init
            patched_classes.append((cls, orig))

        def all_subclasses(c: type) -> list[type]:
            out, todo = [c], [c]
            while todo:
                for s in todo.pop().__subclasses__():
                    out.append(s)
                    todo.append(s)
            return out

        step_hook_handle = None
        fwd_handle = None
        orig_scaler_step = None
        orig_popen = subprocess.Popen
        d = torch.distributed
        self._group_before = d.is_available() and d.is_initialized()
        orig_init_pg = getattr(d, "init_process_group", None) if d.is_available() else None
        orig_init_subclass = torch.optim.Optimizer.__dict__.get("__init_subclass__")

        try:
            for c in all_subclasses(torch.optim.Optimizer):
                patch_class(c)

            def init_subclass(cls, **kw):
                super(torch.optim.Optimizer, cls).__init_subclass__(**kw)
                patch_class(cls)

            torch.optim.Optimizer.__init_subclass__ = classmethod(init_subclass)

            def step_post(opt, args, kwargs):
                if session._primary(opt) and not getattr(session, "_in_scaler_step", False):
                    session._after_step()
                elif session._primary(opt):
                    session._scaler_inner_step = True

            step_hook_handle = _optim_mod.register_optimizer_step_post_hook(step_post)
            fwd_handle = nn.modules.module.register_module_forward_pre_hook(session._forward_pre)
            session._fwd_handle = fwd_handle

            scaler_cls = getattr(getattr(torch, "amp", None), "GradScaler", None)
            if scaler_cls is not None:
                orig_scaler_step = scaler_cls.step

                def scaler_step(scaler, optimizer, *args, **kwargs):
                    if not session._primary(optimizer):
                        return orig_scaler_step(scaler, optimizer, *args, **kwargs)
                    session._in_scaler_step, session._scaler_inner_step = True, False
                    try:
                        out = orig_scaler_step(scaler, optimizer, *args, **kwargs)
                    finally:
                        session._in_scaler_step = False
                    session.scaler_steps += 1
                    if scaler.is_enabled() and not any(x is scaler for x in session.grad_scalers):
                        session.grad_scalers.append(scaler)
                    if not session._scaler_inner_step:
                        session.scaler_skipped += 1  # inf/nan grads: the scaler skipped optimizer.step()
                    session._after_step()
                    return out

                scaler_cls.step = scaler_step

            if orig_init_pg is not None:
                def init_process_group(*args, **kwargs):
                    if not d.is_initialized():
                        _import_world_defaults()  # before the group exists: their defaults stay None
                    return orig_init_pg(*args, **kwargs)

                functools.update_wrapper(init_process_group, orig_init_pg)
                d.init_process_group = init_process_group

            if self.relaunch is not None:
                # weakly: the launcher keeps its Popen objects (and so this class) to the end, and a strong
                # reference would keep the script's model and its process group alive to interpreter exit
                ref = weakref.ref(self)

                class Popen(orig_popen):  # a subclass: isinstance checks on the Popen class keep working
                    def __init__(self, args, *a, **kw):
                        sess = ref()
                        new = sess._relaunched(args, kw.get("env")) if sess is not None else None
                        super().__init__(new if new is not None else args, *a, **kw)
                        if new is not None and sess is not None:
                            sess.relaunched.append(self)

                subprocess.Popen = Popen

            for cb in list(self.on_before_run):
                u = cb(self)
                if u is not None:
                    undos.add(u)

            sys.argv = [target if self.script is not None else self.module, *self.argv]
            for p in reversed(path_add):
                sys.path.insert(0, p)
            self.start_time = time.perf_counter()
            try:
                if self.script is not None:
                    runpy.run_path(target, run_name="__main__")
                else:
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
            except StopRun:
                self.stopped = True
            except SystemExit as e:
                if e.code not in (None, 0):
                    self.failure = ScriptFailure(
                        "SystemExit", f"the script exited with status {e.code}", _script_traceback(e)
                    )
            except KeyboardInterrupt:
                raise
            except Exception as e:  # the script's own error: recorded, shown as theirs
                self.failure = ScriptFailure(type(e).__name__, str(e), _script_traceback(e))
            finally:
                self.end_time = time.perf_counter()
                gc.collect()  # drop frames of the stopped script so their tensors can go
        finally:
            sys.argv[:] = saved_argv
            sys.path[:] = saved_path
            for cls, orig in reversed(patched_classes):
                cls.__init__ = orig
                with _suppress():
                    del cls._memtune_orig_init
            if orig_init_subclass is not None:
                torch.optim.Optimizer.__init_subclass__ = orig_init_subclass
            else:
                with _suppress():
                    del torch.optim.Optimizer.__init_subclass__
            if step_hook_handle is not None:
                step_hook_handle.remove()
            if fwd_handle is not None:
                fwd_handle.remove()
            if orig_scaler_step is not None:
                torch.amp.GradScaler.step = orig_scaler_step
            subprocess.Popen = orig_popen
            if orig_init_pg is not None:
                d.init_process_group = orig_init_pg
            try:
                for cb in list(self.on_end):
                    cb(self)
            finally:
                undos()
        if self._relaunch_error is not None:
            raise self._relaunch_error
        return self


# torch modules whose function defaults are `group.WORLD`, evaluated at import: imported once a group exists
# (DDP's constructor pulls them in through torch._dynamo), they hold the script's default group in those
# defaults, so destroy_process_group() cannot free it and its gloo threads (pt_gloo_runloop, gloo_tcp_loop)
# run into interpreter exit, where a rank sometimes aborts: `terminate called without an active exception`.
_WORLD_DEFAULTS = ("torch.distributed.nn.functional", "torch.distributed.optim.zero_redundancy_optimizer",
                   "torch.distributed.fsdp.sharded_grad_scaler")


def _import_world_defaults() -> None:
    for name in _WORLD_DEFAULTS:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (AttributeError, TypeError))
