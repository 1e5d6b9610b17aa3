"""The patcher: apply a Plan to a live model and its optimizer(s), in strategy order, and undo it.

Two entry points:
- `apply_plan(model, optimizer, plan)`: the Python API, changes them in place, returns an `Applied` (call
  it to undo; `.notes` says what was done).
- `run_apply(plan, ...)`: what `memtune apply` does: run the script in a `capture.Session`, install each
  strategy's global patch before the script starts, apply the plan once the model and optimizer exist
  (Session.on_ready), measure peak and step time.

Helpers shared by the strategies that replace `optimizer.step` (precision's master weights, optimizer-state
offload) live here too: `raw_step`, `wrap_step`, `step_on`.
"""

from __future__ import annotations

import statistics
import types
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memtune.errors import InputError, MemtuneError, PlanError
from memtune.plan import Plan
from memtune.strategies import ApplyContext, BlockRef, get_strategy
from memtune.strategies.base import Undo, replace_on_instance

# --- plan input ------------------------------------------------------------------------------------


def as_plan(plan: Plan | dict | str | Path) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, dict):
        return Plan.from_dict(plan)
    return Plan.load(plan)


def ordered_sections(plan: Plan) -> list[tuple[str, dict[str, Any]]]:
    items = [(n, s) for n, s in plan.sections.items()]
    return sorted(items, key=lambda kv: (get_strategy(kv[0]).order, kv[0]))


def preflight(plan: Plan, device: torch.device | str | None = None) -> None:
    """Refuse what cannot work on this machine before anything runs (e.g. offload without a GPU)."""
    dev = torch.device(device) if device is not None else None
    for name, section in ordered_sections(plan):
        check = getattr(get_strategy(name), "preflight", None)
        if check is not None:
            check(section, dev)


# --- blocks ----------------------------------------------------------------------------------------


def find_model_blocks(model: torch.nn.Module, pattern: str | None = None) -> list[BlockRef]:
    from memtune.capture import find_blocks

    return find_blocks(model, pattern)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# --- applying --------------------------------------------------------------------------------------


class Applied:
    """The undo of one application (call it), with what was done (`notes`: (strategy, text) rows)."""

    def __init__(self, undos: list[tuple[str, Undo]], ctx: ApplyContext):
        self._undos = undos
        self.ctx = ctx
        self.notes = ctx.notes

    def __call__(self) -> None:
        errors = []
        while self._undos:
            name, undo = self._undos.pop()
            try:
                undo()
            except Exception as e:  # keep undoing the rest; report the first failure after
                errors.append(f"{name}: {e}")
        if errors:
            raise RuntimeError("memtune could not undo everything: " + "; ".join(errors))


def apply_to_context(ctx: ApplyContext) -> Applied:
    """Apply every section of ctx.plan in strategy order; on failure undo what was applied, then raise."""
    undos: list[tuple[str, Undo]] = []
    applied = Applied(undos, ctx)
    try:
        for name, section in ordered_sections(ctx.plan):
            undos.append((name, get_strategy(name).apply(ctx, section)))
    except BaseException:
        applied()
        raise
    return applied


def apply_plan(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
    plan: Plan | dict | str | Path,
    *,
    blocks: str | list[BlockRef] | None = None,
    profile: Any = None,
    shared: dict[str, Any] | None = None,
) -> Applied:
    """Change `model` and `optimizer` in place as `plan` says; return an undo (with `.notes`).

    Call it after building the model and optimizer, before the first forward. `blocks` is a glob over
    module paths (as `--blocks`) or the BlockRefs themselves; by default the repeated layers are found the
    same way `memtune profile` finds them.
    """
    plan = as_plan(plan)
    device = _model_device(model)
    preflight(plan, device)
    if optimizer is None:
        opts: list[torch.optim.Optimizer] = []
    elif isinstance(optimizer, torch.optim.Optimizer):
        opts = [optimizer]
    else:
        opts = list(optimizer)
    refs = blocks if isinstance(blocks, list) else find_model_blocks(model, blocks)
    ctx = ApplyContext(model=model, optimizers=opts, blocks=refs, device=device, plan=plan, profile=profile)
    if shared:
        ctx.shared.update(shared)
    return apply_to_context(ctx)


# --- optimizer step replacement (shared by precision and offload) ---------------------------------


def raw_step(opt: torch.optim.Optimizer) -> Callable[..., Any]:
    """The class's update without the step hooks (so the Session's step counter sees one step, not many)."""
    f = type(opt).step
    if getattr(f, "hooked", False) and hasattr(f, "__wrapped__"):
        f = f.__wrapped__
    return f


def wrap_step(opt: torch.optim.Optimizer, new_raw: Callable[..., Any]) -> Undo:
    """Replace `opt.step` for this object only, keeping the step hooks (LR schedulers, step counting).

    `new_raw(opt, closure=None)` does the update. It records `_opt_called` itself, all an LR scheduler's
    own step wrapper does, so schedulers created before or after keep working without warnings.
    """
    def raw(self, *args, **kwargs):
        self._opt_called = True  # what LRScheduler's own wrapper records
        return new_raw(self, *args, **kwargs)

    hooked = torch.optim.Optimizer.profile_hook_step(raw)
    hooked._wrapped_by_lr_sched = True  # schedulers: this step records `_opt_called`, no need to wrap it
    return replace_on_instance(opt, "step", types.MethodType(hooked, opt))


def check_elementwise(opt: torch.optim.Optimizer, what: str) -> None:
    """Stand-in updates (step_on) need an optimizer that updates each parameter from its own gradient and
    state, on whatever device the stand-in lives (all of torch.optim except LBFGS)."""
    cls = type(opt)
    if cls.__name__ == "LBFGS" or cls.__module__.split(".")[0] == "bitsandbytes":
        raise PlanError(f"{what} cannot drive {cls.__module__}.{cls.__name__} (it needs the whole model's gradient "
                        "at once, or device-only kernels): remove that section or use e.g. torch.optim.AdamW")


def step_on(
    opt: torch.optim.Optimizer,
    subs: dict[int, torch.Tensor],
    overrides: dict[str, Any] | None = None,
    only: Iterable[torch.Tensor] | None = None,
) -> None:
    """Run `opt`'s own update on stand-ins: `subs[id(p)]` (with `.grad` set) replaces parameter p.

    The optimizer's state stays keyed by the real parameters (so `state_dict()` is unchanged); the update
    sees the stand-ins, which is how fp32 master weights and host-resident optimizer state work with any
    optimizer class. `only` limits the update to some parameters (a chunk); `overrides` set group options
    for this call (e.g. fused=True on the host).
    """
    only_ids = None if only is None else {id(p) for p in only}
    saved_groups, saved_state = opt.param_groups, opt.state
    tmp_state: defaultdict = defaultdict(dict)
    groups, pairs = [], []
    for g in saved_groups:
        ps = [p for p in g["params"] if id(p) in subs and (only_ids is None or id(p) in only_ids)
              and subs[id(p)].grad is not None]
        if not ps:
            continue
        ng = dict(g)
        ng["params"] = [subs[id(p)] for p in ps]
        if overrides:
            ng.update(overrides)
        groups.append((g, ng))
        for p in ps:
            tmp_state[subs[id(p)]] = saved_state[p]
            pairs.append((p, subs[id(p)]))
    if not groups:
        return
    opt.param_groups = [ng for _, ng in groups]
    opt.state = tmp_state
    try:
        raw_step(opt)(opt)
    finally:
        opt.param_groups, opt.state = saved_groups, saved_state
        for p, s in pairs:
            saved_state[p] = tmp_state[s]
        for g, ng in groups:  # group-level values an optimizer may update (rare)
            for k, v in ng.items():
                if k != "params" and not (overrides and k in overrides):
                    g[k] = v


# --- `memtune apply` -------------------------------------------------------------------------------


@dataclass
class ApplyResult:
    script: str | None
    argv: list[str]
    notes: list[tuple[str, str]] = field(default_factory=list)
    steps: int = 0
    step_s: float | None = None  # median of the step times after the first (warm-up) step
    step_times: list[float] = field(default_factory=list)
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    device: str = "cpu"
    failure: dict[str, str] | None = None
    stopped: bool = False
    lossy: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        d = asdict(self)
        d["notes"] = [{"strategy": s, "note": n} for s, n in self.notes]
        return d


def apply_knobs(argv: Sequence[str], knobs: dict[str, Any] | None) -> list[str]:
    """`run.knobs` {flag: value} replace the flag's value in argv (`--f v` or `--f=v`), or append it."""
    out = list(argv)
    for flag, value in (knobs or {}).items():
        flag = str(flag)
        if not flag.startswith("-"):
            raise PlanError(f"run.knobs: {flag!r} is not a flag; write it as it appears on the command line, e.g. --batch-size")
        if isinstance(value, bool):
            # a boolean switch: present or absent
            out = [a for a in out if a != flag]
            if value:
                out.append(flag)
            continue
        val = str(value)
        for i, a in enumerate(out):
            if a == flag and i + 1 < len(out):
                out[i + 1] = val
                break
            if a.startswith(flag + "="):
                out[i] = f"{flag}={val}"
                break
        else:
            out += [flag, val]
    return out


def resolve_run(plan: Plan, script: str | None, argv: Sequence[str] | None) -> tuple[str | None, str | None, list[str]]:
    """Which script/module and arguments to run: the command line wins, then the plan's run section,
    then the profile the plan's provenance names."""
    run = dict(plan.run or {})
    if not run.get("script") and not run.get("module"):
        prof = (plan.provenance or {}).get("profile")
        if isinstance(prof, str) and Path(prof).is_file():
            from memtune.profile import Profile

            pr = Profile.load(prof)
            run.setdefault("script", pr.script)
            run.setdefault("module", pr.module)
            run.setdefault("argv", pr.argv)
    module = None
    if script is None:
        script, module = run.get("script"), run.get("module")
        if argv is None or len(argv) == 0:
            argv = [str(a) for a in (run.get("argv") or [])]
    if script is None and module is None:
        raise InputError("the plan names no script (no `run:` section): give one, e.g. "
                         "`memtune apply plan.yaml train.py -- --batch-size 8`")
    return script, module, apply_knobs(list(argv or []), run.get("knobs"))


def run_apply(
    plan: Plan | str | Path,
    script: str | None = None,
    argv: Sequence[str] | None = None,
    *,
    steps: int | None = None,
    blocks_pattern: str | None = None,
    on_notes: Callable[[list[tuple[str, str]]], None] | None = None,
) -> ApplyResult:
    """Run the script with the plan applied at run time (what `memtune apply` does)."""
    from memtune.capture import Session

    plan = as_plan(plan)
    script, module, args = resolve_run(plan, script, argv)
    want_cuda = not any(a in ("--device=cpu",) for a in args) and torch.cuda.is_available()
    preflight(plan, torch.device("cuda" if want_cuda else "cpu"))
    session = Session(script, module=module, argv=args, steps=steps, warmup=0, stop=steps is not None,
                      blocks_pattern=blocks_pattern)
    result = ApplyResult(script=script or f"-m {module}", argv=args, lossy=plan.lossy)
    state: dict[str, Any] = {}

    for name, section in ordered_sections(plan):
        strat = get_strategy(name)

        def before(sess, _s=strat, _sec=section):
            return _s.install(_sec, sess)

        session.on_before_run.append(before)

    def ready(sess) -> None:
        from memtune.capture import StopRun

        model = sess.model
        dev = _model_device(model)
        ctx = ApplyContext(model=model, optimizers=list(sess.optimizers), blocks=list(sess.blocks),
                           device=dev, plan=plan)
        state["ctx"] = ctx
        try:
            preflight(plan, dev)
            state["applied"] = apply_to_context(ctx)
        except MemtuneError as e:  # the plan does not fit this run: stop the script, report it as ours
            state["error"] = e
            raise StopRun() from None
        result.notes = list(ctx.notes)
        result.device = str(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        if on_notes:
            on_notes(result.notes)

    session.on_ready.append(ready)
    try:
        session.run()
    finally:
        # the run's peak, read before undo: undoing an optimizer offload moves its state back to the GPU
        # (8 GiB for a 1.1B AdamW), which is not the run's memory (tune's verification measured 16.5 GiB
        # on a plan that peaked at 10.1 GiB, H100 2026-11-25)
        if result.device.startswith("cuda"):
            dev = torch.device(result.device)
            result.peak_allocated_bytes = int(torch.cuda.max_memory_allocated(dev))
            result.peak_reserved_bytes = int(torch.cuda.max_memory_reserved(dev))
        applied = state.get("applied")
        if applied is not None:
            state["ctx"].shared["run_over"] = True  # the script has ended: undo need not restore what it moved
            try:
                applied()
            except RuntimeError as e:  # the run's numbers still count; say what could not be undone
                result.notes.append(("patcher", str(e)))
    if "error" in state:
        raise state["error"]
    if "applied" not in state and session.failure is None:
        raise InputError("the script never built an optimizer over a model, so the plan was not applied: "
                         "memtune apply needs a script that creates a torch.optim optimizer")
    result.steps = session.steps_done
    result.stopped = session.stopped
    ends = list(session.step_end_times)
    result.step_times = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    if result.step_times:
        result.step_s = statistics.median(result.step_times[1:] or result.step_times)
    if session.failure is not None:
        f = session.failure
        result.failure = {"exc_type": f.exc_type, "message": f.message, "traceback": f.traceback}
    return result

