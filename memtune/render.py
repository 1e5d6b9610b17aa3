"""Rendering for the CLI: rich tables of a profile, an estimate, a tuning result and an apply run; an export.

Library modules return data; this module (beside cli.py) is the only one that draws it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from rich.table import Table

from memtune.units import format_bytes, format_seconds

if TYPE_CHECKING:
    from memtune.estimate import EstimateReport
    from memtune.integrations.export import Export
    from memtune.profile import Profile
    from memtune.tune import TuneResult


def render_profile(prof: Profile, console: Any, top: int = 5) -> None:
    """Rich summary: model states, top blocks by activation memory, peak and its phase, step time."""
    fb, fs = format_bytes, format_seconds
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


def render_estimate(rep: EstimateReport, console: Any) -> None:
    """Rich tables for `memtune estimate`: memory at the peak by part, time by part, verdict."""
    est = rep.estimate
    title = "baseline (no plan): the run as profiled" if not rep.plan_sections else "plan"
    if rep.plan_sections:
        t = Table(title="plan", title_justify="left")
        t.add_column("section", style="bold")
        t.add_column("what it does")
        for name, what in rep.plan_sections.items():
            label = f"{name} [yellow](LOSSY)[/]" if name in est.lossy else name
            t.add_row(label, what)
        console.print(t)
    where = f" in {est.peak_where}" if est.peak_where else ""
    bs = f", batch size {rep.batch_size}" if rep.batch_size else ""
    console.print(f"[bold]{title}[/]: peak [bold]{format_bytes(est.peak_bytes)}[/] during {est.peak_phase}"
                  f"{where}{bs}", highlight=False)
    t = Table()
    t.add_column("at the peak", style="bold")
    t.add_column("bytes", justify="right")
    t.add_column("share", justify="right")
    for k, v in est.breakdown.items():
        if abs(v) >= 1:
            t.add_row(k, format_bytes(v), f"{100 * v / est.peak_bytes:.1f}%" if est.peak_bytes else "")
    t.add_row("peak", format_bytes(est.peak_bytes), "100%", style="bold")
    console.print(t)
    console.print(f"step [bold]{format_seconds(est.step_s)}[/], {est.throughput:.4g} {est.throughput_unit}",
                  highlight=False)
    t = Table()
    t.add_column("time", style="bold")
    t.add_column("seconds", justify="right")
    for k, v in est.time_breakdown.items():
        if v > 0:
            t.add_row(k, format_seconds(v))
    console.print(t)
    if rep.measured_peak:
        loss_extra, residual = rep.calibration
        how = []
        if loss_extra:
            how.append(f"{format_bytes(loss_extra)} of loss working memory no block owns (in 'transient' at the "
                       "loss; it grows with the batch)")
        if residual:
            how.append(f"{format_bytes(residual)} of 'allocator overhead' (constant)")
        console.print(f"calibrated once on the measured baseline peak {format_bytes(rep.measured_peak)} at batch "
                      f"size {rep.profile_batch_size}: " + ("; ".join(how) if how else "the parts explain it all"),
                      highlight=False)
    if est.host_bytes:
        console.print(f"pinned host memory needed: {format_bytes(est.host_bytes)}")
    if rep.budget is not None:
        if rep.fits:
            console.print(f"[green]fits[/] the {format_bytes(rep.budget)} budget with "
                          f"{format_bytes(rep.margin)} to spare")
        else:
            console.print(f"[red]does not fit[/] the {format_bytes(rep.budget)} budget: over by "
                          f"{format_bytes(-rep.margin)}")
        if rep.max_batch is not None:
            console.print(f"largest batch size that fits: {rep.max_batch}" if rep.max_batch
                          else "no batch size fits this budget with this plan")
    if est.lossy:
        console.print(f"[yellow]LOSSY[/] sections (they change the numbers): {', '.join(est.lossy)}")
    for what, how in est.sources.items():
        console.print(f"{what}: {how}", highlight=False)
    for n in est.notes:
        console.print(f"note: {n}")


def pareto_table(result: TuneResult):
    """The Pareto front of the plans that fit (predicted peak against throughput), the chosen plan marked and
    lossy sections labelled; verified plans show their measured peak and throughput."""
    unit = result.chosen.unit or "throughput"
    t = Table(title=f"Pareto front of plans that fit {format_bytes(result.budget_bytes)} (limit "
              f"{format_bytes(result.limit_bytes)} after the {result.margin:.0%} margin; predicted unless measured; "
              "★ chosen)",
              title_justify="left")
    t.add_column("", no_wrap=True)
    t.add_column("trial", justify="right", no_wrap=True)
    t.add_column("peak", justify="right", no_wrap=True)
    t.add_column(unit, justify="right", no_wrap=True)
    t.add_column("measured", justify="right", no_wrap=True)
    t.add_column("plan", ratio=1, min_width=20, overflow="fold")
    rows = [c for c in result.pareto if c.feasible]
    for c in [result.chosen, *result.verified]:
        if all(c.key != r.key for r in rows):
            rows.append(c)
    for c in sorted(rows, key=lambda c: c.peak_bytes):
        mark = "[bold green]★[/]" if c.key == result.chosen.key else ""
        meas = ""
        if c.measured:
            m = c.measured
            if m.get("status") == "ok":
                peak = format_bytes(m["peak_bytes"]) if m.get("peak_bytes") is not None else "-"
                meas = f"{peak}, {m['throughput']:.4g}"
            else:
                meas = f"[red]{m.get('status')}[/]"
        plan = c.describe.replace("[LOSSY]", "[bold yellow]\\[LOSSY][/]")
        t.add_row(mark, str(c.number), format_bytes(c.peak_bytes), f"{c.throughput:.4g}", meas, plan)
    return t


@contextlib.contextmanager
def progress_bars(console: Any, enabled: bool = True) -> Iterator[Callable[[str, int, int | None], None] | None]:
    """A `progress(description, done, total)` callback drawing one rich bar per description (transient)."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as prog:
        tasks: dict[str, Any] = {}

        def update(description: str, done: int, total: int | None) -> None:
            if description not in tasks:
                tasks[description] = prog.add_task(description, total=total)
            prog.update(tasks[description], completed=done, total=total)

        yield update


def _inline(v: Any) -> str:
    import yaml

    if isinstance(v, (dict, list)):
        return yaml.safe_dump(v, default_flow_style=True, sort_keys=False).strip()
    return str(v).lower() if isinstance(v, bool) else str(v)


def render_export(exp: Export, console: Any) -> None:
    """`memtune export`: the settings as code to paste, their notes, what has no setting, and the rest."""
    import yaml

    def say(line: str = "") -> None:
        console.print(line, highlight=False, markup=False, soft_wrap=True)

    src = exp.plan or "the plan"
    if not exp.settings and not exp.unexpressed:
        say(f"{src} has no strategy sections: nothing to set in {exp.framework}")
        return
    if exp.settings:
        say(f"# {src} as {exp.framework} settings")
        for line in exp.imports:
            say(line)
        say(f"{exp.obj}(")
        say("    ...,  # your other settings")
        width = min(48, max(len(s.code) for s in exp.settings) + 1)  # a long value is not aligned to
        for s in exp.settings:
            tags = (" LOSSY" if s.section.split(".")[0] in exp.lossy else "") + ("" if s.exact else " (approximate)")
            say(f"    {s.code + ',':<{width}}  # {s.section}{tags}")
        say(")")
        notes = [s for s in exp.settings if s.note]
        if notes:
            say("notes:")
            for s in notes:
                say(f"  {s.name}: {s.note}")
    else:
        say(f"nothing in {src} has a setting in {exp.framework}")
    if exp.unexpressed:
        say(f"cannot be expressed in {exp.framework} (apply it with memtune instead: REST below, or `memtune apply`):")
        for u in exp.unexpressed:
            say(f"  {u.part} {_inline(u.value)}: {u.reason}")
    if exp.rest:
        say(f"REST, the rest of the plan, for {exp.apply_with} (a plan file or this mapping):")
        for line in yaml.safe_dump(exp.rest, sort_keys=False, default_flow_style=None).splitlines():
            say(f"  {line}")
        if exp.rest_problem:
            say(f"note: the rest is not a plan on its own ({exp.rest_problem}): apply the whole plan with the "
                "callback instead of these settings")
