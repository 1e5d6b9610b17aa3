"""The patcher: apply a Plan to a live model and its optimizer(s), in strategy order, and undo it.

Two entry points:
- `apply_plan(model, optimizer, plan)`: the Python API, changes them in place, returns an `Applied` (call
  it to undo; `.notes` says what was done).
- `run_apply(plan, ...)`: what `memtune apply` does: run the script in a `capture.Session`, install each
  strategy's global patch before the script starts, apply the plan once the model and optimizer exist
  (Session.on_ready), measure peak and step time.

"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memtune.blocks import BlockRef, find_blocks, unwrap_optimizer
from memtune.capture import Session, StopRun
from memtune.errors import InputError, MemtuneError, PlanError
from memtune.plan import Plan
from memtune.strategies import ApplyContext, get_strategy, load_plan, make_context, ordered_sections
from memtune.undo import Undos

# --- plan input ------------------------------------------------------------------------------------


def preflight(plan: Plan, device: torch.device | str | None = None) -> None:
    """Refuse what cannot work on this machine before anything runs (e.g. offload without a GPU)."""
    dev = torch.device(device) if device is not None else None
    for name, section in ordered_sections(plan):
        check = getattr(get_strategy(name), "preflight", None)
        if check is not None:
            check(section, dev)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def run_device(plan: Plan, model: torch.nn.Module) -> torch.device:
    """The device the plan is applied for: where a strategy deferred the script's move to (placement's
    `target_device`), else where the model is."""
    for name, section in ordered_sections(plan):
        target = getattr(get_strategy(name), "target_device", None)
        d = target(section, model) if target is not None else None
        if d is not None:
            return d
    return _model_device(model)


# --- applying --------------------------------------------------------------------------------------


class Applied:
    """The undo of one application (call it), with what was done (`notes`: (strategy, text) rows)."""

    def __init__(self, undos: Undos, ctx: ApplyContext):
        self._undos = undos
        self.ctx = ctx
        self.notes = ctx.notes

    def add(self, undo: Any, name: str = "") -> None:
        self._undos.add(undo, name)

    def __call__(self) -> None:
        self._undos()


def apply_to_context(ctx: ApplyContext) -> Applied:
    """Apply every section of ctx.plan in strategy order; on failure undo what was applied, then raise."""
    with Undos() as undos:
        for name, config in ordered_sections(ctx.plan):
            undos.add(get_strategy(name).apply(ctx, config), name)
    return Applied(undos, ctx)


def apply_plan(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
    plan: Plan | dict | str | Path,
    *,
    blocks: str | list[BlockRef] | None = None,
    profile: Any = None,
) -> Applied:
    """Change `model` and `optimizer` in place as `plan` says; return an undo (with `.notes`).

    Call it after building the model and optimizer (after accelerate's `prepare`: the torch optimizer inside
    its wrapper is the one changed), before the first forward. `blocks` is a glob over
    module paths (as `--blocks`) or the BlockRefs themselves; by default the repeated layers are found the
    same way `memtune profile` finds them.
    """
    plan = load_plan(plan)
    device = _model_device(model)
    preflight(plan, device)
    if optimizer is None:
        opts: list[torch.optim.Optimizer] = []
    elif isinstance(optimizer, torch.optim.Optimizer):
        opts = [optimizer]
    else:
        opts = list(optimizer)
    opts = [unwrap_optimizer(o) for o in opts]  # accelerate's prepare wraps it; the inner one steps
    refs = blocks if isinstance(blocks, list) else find_blocks(model, blocks)
    return apply_to_context(make_context(model, opts, refs, device, plan, profile))


# --- `memtune apply` -------------------------------------------------------------------------------


@dataclass
class ApplyResult:
    script: str | None
    argv: list[str]
    notes: list[tuple[str, str]] = field(default_factory=list)
    steps: int = 0
    step_s: float | None = None  # median of the step times after the first (warm-up) step
    step_times: list[float] = field(default_factory=list)
    # on several ranks (run_apply's end_group): the largest over ranks, each rank's own in `ranks`
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    # allocated before the plan was applied, model construction included (the steps' peak is reset after it)
    load_peak_bytes: int | None = None
    device: str = "cpu"
    failure: dict[str, str] | None = None
    stopped: bool = False
    lossy: list[str] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    ranks: list[dict[str, Any]] | None = None  # {rank, peak_allocated_bytes, peak_reserved_bytes} per rank

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
        prof = plan.beside((plan.provenance or {}).get("profile"))
        if isinstance(prof, str) and Path(prof).is_file():
            from memtune.profile import Profile

            pr = Profile.load(prof)
            run.setdefault("script", pr.script)
            run.setdefault("module", pr.module)
            run.setdefault("argv", pr.argv)
    module = None
    if script is None:
        # a relative script the plan names: beside the plan file when it is there, else the current folder
        script, module = plan.beside(run.get("script")), run.get("module")
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
    relaunch: Sequence[str] | None = None,
    end_group: bool = False,
) -> ApplyResult:
    """Run the script with the plan applied at run time (what `memtune apply` does).

    `relaunch`: the command a script that starts its own other ranks (Lightning) starts instead (`Session`).
    `end_group` (the CLI, whose process exits next): after a run that did not fail, gather every rank's peak
    into the result (a collective), then destroy the process group the stopped script left alive.
    """
    plan = load_plan(plan)
    script, module, args = resolve_run(plan, script, argv)
    want_cuda = not any(a in ("--device=cpu",) for a in args) and torch.cuda.is_available()
    preflight(plan, torch.device("cuda" if want_cuda else "cpu"))
    session = Session(script, module=module, argv=args, steps=steps, warmup=0, stop=steps is not None,
                      blocks_pattern=blocks_pattern, relaunch=relaunch)
    result = ApplyResult(script=script or f"-m {module}", argv=args, lossy=plan.lossy)
    state: dict[str, Any] = {}

    for name, section in ordered_sections(plan):
        strat = get_strategy(name)

        def before(sess, _s=strat, _sec=section):
            return _s.install(_sec, sess)

        session.on_before_run.append(before)

    def ready(sess) -> None:
        model = sess.model
        dev = run_device(plan, model)
        if dev.type == "cpu" and want_cuda and "deferred" not in state:
            # built on the CPU with its optimizer and moved later (accelerate's prepare, Lightning): apply
            # where it runs, at its first forward (a wrapper of the model's own forward takes effect from the
            # second call; block-level changes from the first)
            state["deferred"] = True

            def first_forward(module, args):
                handle.remove()
                ready(sess)

            handle = model.register_forward_pre_hook(first_forward, prepend=True)
            return
        try:
            ctx = make_context(model, sess.optimizers, sess.blocks, dev, plan, models=sess.models)
            state["ctx"] = ctx
            preflight(plan, dev)
            state["applied"] = apply_to_context(ctx)
        except MemtuneError as e:  # the plan does not fit this run: stop the script, report it as ours
            state["error"] = e
            raise StopRun() from None
        result.notes = list(ctx.notes)
        result.device = str(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            result.load_peak_bytes = int(torch.cuda.max_memory_allocated(dev))
            torch.cuda.reset_peak_memory_stats(dev)
        if on_notes:
            on_notes(result.notes)

    def new_model(sess, model) -> None:
        ctx, applied = state.get("ctx"), state.get("applied")
        if ctx is None or applied is None:
            return
        for name, config in ordered_sections(plan):
            applied.add(get_strategy(name).add_model(ctx, config, model), name)
        if on_notes:
            on_notes(ctx.notes[len(result.notes):])
        result.notes = list(ctx.notes)

    def new_optimizer(sess, opt) -> None:
        ctx, applied = state.get("ctx"), state.get("applied")
        if ctx is None or applied is None:
            return
        ctx.optimizers.append(opt)
        for name, config in ordered_sections(plan):
            applied.add(get_strategy(name).add_optimizer(ctx, config, opt), name)
        if on_notes:
            on_notes(ctx.notes[len(result.notes):])
        result.notes = list(ctx.notes)

    session.on_optimizer.append(new_optimizer)
    session.on_model.append(new_model)
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
            ctx = state["ctx"]
            ctx.run_over = True  # the script has ended: undo need not restore what it moved
            seen = len(ctx.notes)
            try:
                applied()
            except RuntimeError as e:  # the run's numbers still count; say what could not be undone
                result.notes.append(("patcher", str(e)))
            result.notes += ctx.notes[seen:]  # what strategies measured over the run (said at undo)
    if "error" in state:
        raise state["error"]
    if "applied" not in state and session.failure is None:
        raise InputError("the script never built an optimizer over a model, so the plan was not applied: "
                         "memtune apply needs a script that creates a torch.optim optimizer")
    result.steps = session.steps_done
    result.stopped = session.stopped
    result.step_times = session.step_durations()
    if result.step_times:
        result.step_s = statistics.median(result.step_times[1:] or result.step_times)
    result.rank, result.world_size = session.rank, session.world_size
    if session.failure is not None:
        f = session.failure
        result.failure = {"exc_type": f.exc_type, "message": f.message, "traceback": f.traceback}
    elif end_group:
        _gather_peaks(result, session.device)
        session.end_group()
    return result


def _gather_peaks(result: ApplyResult, device: torch.device) -> None:
    """Each rank's peak into `ranks`, the largest into the peak fields: the budget holds per GPU, so the
    fullest rank decides (a rank holding a larger shard, or the logging rank 0, can peak higher)."""
    from memtune.distributed import gather_ints

    try:
        got = gather_ints([result.peak_allocated_bytes, result.peak_reserved_bytes], device)
    except RuntimeError as e:  # a peer gone (its own failure is its rank's to report): this rank's peak stands
        result.notes.append(("patcher", f"peaks of the other ranks not gathered ({str(e)[:120]})"))
        return
    if got is None:
        return
    result.ranks = [{"rank": r, "peak_allocated_bytes": a, "peak_reserved_bytes": b} for r, (a, b) in enumerate(got)]
    for i, key in enumerate(("peak_allocated_bytes", "peak_reserved_bytes")):
        vals = [v[i] for v in got if v[i] is not None]
        if vals:
            setattr(result, key, max(vals))
