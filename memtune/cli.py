"""The `memtune` command: a thin Typer app. Each command parses, calls one library function, renders.

Library code raises `MemtuneError`; `user_errors()` turns it into one line on stderr and exit code 1 (130 for
a Ctrl-C). Every output path is checked by the library before the work starts.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from memtune import __version__
from memtune.errors import InputError, Interrupted, MemtuneError


class _OneLineErrors(TyperGroup):
    """Usage errors (an unknown option, a value of the wrong type, a missing argument) as one line on stderr
    and exit 1, like every other error memtune reports; the command's --help is named for the details."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as e:  # click's errors (typer vendors click; this is their public base)
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `memtune`: the help, as before
                typer.echo(e.ctx.get_help())
                sys.exit(0)
            ctx = getattr(e, "ctx", None)
            where = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
            msg = " ".join(e.format_message().split()).rstrip(".")
            err_console.print(f"[bold red]error:[/] {escape(msg)}{escape(where)}", soft_wrap=True, highlight=False)
            sys.exit(1)
        except typer.Abort:
            err_console.print("interrupted", highlight=False)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    name="memtune",
    help="Fit a PyTorch training run into a GPU memory budget at the highest throughput, "
    "without editing the training script.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def user_errors():
    """A MemtuneError is the user's to fix: print its message on one line and exit 1, no traceback."""
    try:
        yield
    except Interrupted as e:  # Ctrl-C: what was kept, on one line, exit 130
        err_console.print(" ".join(str(e).split()), soft_wrap=True, highlight=False, markup=False)
        raise typer.Exit(e.exit_code) from None
    except MemtuneError as e:
        msg = " ".join(str(e).split())
        # escape: a message may hold brackets, e.g. pip install 'memtune[report]'
        err_console.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True, highlight=False, markup=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(130) from None


def print_json(data: Any) -> None:
    # Plain print: rich would wrap long lines and break machine parsing.
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _relaunch(*words: str) -> list[str]:
    """This command as the other ranks of a script that starts them itself (Lightning) must run it: through
    memtune, with the same options (rebuilt from them: under CliRunner sys.argv is not ours)."""
    return [sys.executable, "-m", "memtune", *words]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"memtune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Fit a PyTorch training run into a GPU memory budget at the highest throughput."""


JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]


@app.command()
def env(json_out: JsonOpt = False) -> None:
    """Show torch, CUDA, GPU, host and Triton facts: paste this into bug reports."""
    from memtune.profilers.hardware import environment
    from memtune.units import format_bytes

    with user_errors():
        info = environment()
    if json_out:
        print_json(info)
        return
    t = Table(title="memtune env", show_header=False, title_justify="left")
    t.add_column("key", style="bold")
    t.add_column("value")
    t.add_row("memtune", info["memtune"])
    t.add_row("python", info["python"])
    t.add_row("platform", info["platform"])
    t.add_row("torch", info["torch"])
    t.add_row("CUDA (torch build)", info["cuda_build"] or "none (CPU build)")
    nv = info["nvml"]
    if nv["available"]:
        t.add_row("NVIDIA driver", nv["driver"])
        for g in nv["gpus"]:
            t.add_row(
                f"GPU {g['index']}",
                f"{g['name']}, {format_bytes(g['memory_total_bytes'])} "
                f"({format_bytes(g['memory_free_bytes'])} free)",
            )
    else:
        t.add_row("GPU", nv["reason"])
    h = info["host"]
    t.add_row("host RAM", f"{format_bytes(h['ram_total_bytes'])} ({format_bytes(h['ram_available_bytes'])} available)")
    t.add_row("CPU cores", f"{h['cpu_cores_physical']} physical, {h['cpu_cores_logical']} logical")
    tr = info["triton"]
    t.add_row("triton", f"{tr['version']}: {tr['mode']}" if tr["installed"] else "not installed")
    console.print(t)


@app.command(context_settings={"allow_interspersed_args": True})
def profile(
    args: Annotated[list[str] | None, typer.Argument(metavar="SCRIPT [-- SCRIPT_ARGS...]", help="The training script, then its own arguments after `--`.")] = None,
    module: Annotated[str | None, typer.Option("-m", "--module", help="Run a module as `python -m` does (all arguments go to it).")] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="Where to write the profile JSON (checked before the script runs; an existing file needs --force).")] = "profile.json",
    steps: Annotated[int, typer.Option("--steps", help="Measured optimizer steps (3+: one memory, one timing, the rest clean).")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", help="Optimizer steps run first and not measured.")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file (only a regular file: never a link, device or folder).")] = False,
    stop: Annotated[bool, typer.Option("--stop/--no-stop", help="Stop the script after the measured steps (--no-stop: let it finish).")] = True,
    blocks: Annotated[str | None, typer.Option("--blocks", help="Glob over module paths for the repeated blocks, e.g. 'model.layers.*'.")] = None,
    memory_timeline: Annotated[bool, typer.Option("--memory-timeline", help="On a GPU, record the allocator's history over the memory step beside the profile (PROFILE.memory.pickle), for `memtune report`.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Run a training script unchanged for a few steps and measure what its memory and time are made of."""
    from memtune.distributed import free_group
    from memtune.profilers.runner import ScriptFailed, profile_script
    from memtune.render import render_profile

    args = list(args or [])
    script = None if module else (args.pop(0) if args else None)
    with user_errors():
        if script is None and module is None:
            raise InputError("give the training script: memtune profile SCRIPT [-- SCRIPT_ARGS...] (or -m MODULE)")
        # with --json the script's own prints go to stderr so stdout stays machine-readable
        redirect = contextlib.redirect_stdout(sys.stderr) if json_out else contextlib.nullcontext()
        relaunch = _relaunch("profile", *(["-m", module] if module else [script]), "-o", output, "--steps", str(steps),
                             "--warmup", str(warmup), "--stop" if stop else "--no-stop",
                             *(["--force"] if force else []), *(["--blocks", blocks] if blocks else []),
                             *(["--memory-timeline"] if memory_timeline else []), *(["--json"] if json_out else []),
                             "--", *args)
        try:
            with redirect:
                prof = profile_script(script, module=module, argv=args, steps=steps, warmup=warmup, stop=stop,
                                      blocks_pattern=blocks, output=output, force=force,
                                      memory_timeline=memory_timeline, relaunch=relaunch, end_group=True)
            free_group()  # the stopped script's group and its threads, before interpreter exit
        except ScriptFailed as e:
            sys.stderr.write(e.failure.traceback)
            raise
    if prof.rank != 0:
        return
    if json_out:
        print_json(prof.to_dict())
    else:
        render_profile(prof, console)
        console.print(f"wrote {output}", highlight=False)


@app.command()
def estimate(
    profile: Annotated[str, typer.Argument(help="profile.json written by `memtune profile`.")],
    plan: Annotated[str | None, typer.Option("--plan", "-p", help="plan.yaml to estimate; none: the baseline.")] = None,
    budget: Annotated[str | None, typer.Option("--budget", "-b", help="GPU memory budget with its unit, e.g. 16GiB, 16GB, 16000MiB (a bare number is refused).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Estimate at this batch size (scaled from the profile).")] = None,
    profile2: Annotated[str | None, typer.Option("--profile2", help="A profile of the same run at another batch size: fit batch scaling through both.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Predict the peak memory and step time of a plan (or the baseline) from a profile, with a breakdown."""
    from memtune.estimate import estimate_files
    from memtune.render import render_estimate

    with user_errors():
        rep = estimate_files(profile, plan, budget, batch_size, profile2)
    if json_out:
        print_json(rep.to_dict())
    else:
        render_estimate(rep, console)


@app.command()
def report(
    source: Annotated[str, typer.Argument(metavar="PROFILE|PLAN|STUDY", help="profile.json, plan.yaml, or a study's SQLite file / storage URL.")],
    out: Annotated[str, typer.Option("--out", "-o", help="HTML file to write (self-contained, opens offline).")] = "report.html",
    png: Annotated[str | None, typer.Option("--png", help="Also write each plot as a PNG into this directory.")] = None,
    csv: Annotated[str | None, typer.Option("--csv", help="Also write each table as a CSV into this directory (columns: docs/report.md).")] = None,
    profile: Annotated[str | None, typer.Option("--profile", help="The profile to draw a plan or study against (default: the one its provenance names, looked up beside it; a profile whose digest differs from the plan's is then refused, while one given here is drawn with a note).")] = None,
    budget: Annotated[str | None, typer.Option("--budget", "-b", help="Budget line to draw, with its unit, e.g. 16GiB (default: the plan's or study's).")] = None,
    study: Annotated[str | None, typer.Option("--study", help="Study name, when the storage holds several.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing output files (only regular files: never a link, device or folder).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write an HTML report (plots and tables) of a profile, a plan or a tuning study."""
    from memtune.report import write_report

    with user_errors():
        res = write_report(source, out, png_dir=png, csv_dir=csv, force=force, profile=profile, budget=budget,
                           study_name=study)
    if json_out:
        print_json({"html": str(res.html), "png": [str(p) for p in res.pngs], "csv": [str(p) for p in res.csvs],
                    "sections": res.sections, "notes": res.notes})
        return
    console.print(f"wrote [bold]{escape(str(res.html))}[/] ({', '.join(res.sections) or 'no plots'})", highlight=False,
                  soft_wrap=True)
    for p in [*res.pngs, *res.csvs]:
        console.print(f"  {p}", highlight=False, soft_wrap=True, markup=False)
    for n in res.notes:
        console.print(f"note: {n}", style="dim", highlight=False, soft_wrap=True, markup=False)


@app.command()
def tune(
    profile: Annotated[str, typer.Argument(help="profile.json written by `memtune profile`.")],
    budget: Annotated[str, typer.Option("--budget", "-b", help="GPU memory budget for PyTorch's allocations (max_memory_allocated), with its unit, e.g. 16GiB, 16GB, 16000MiB; the CUDA context and allocator caching come on top.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Where to write the plan (checked before the search; an existing file needs --force). The study goes beside it as PLAN.study.db unless --storage says otherwise.")] = "plan.yaml",
    trials: Annotated[int, typer.Option("--trials", help="Plans to evaluate on the cost model (more on a resumed study).")] = 300,
    timeout: Annotated[str, typer.Option("--timeout", help="Time for the whole search, resumed study or not (seed plans, trials, writing them to the study), e.g. 60s, 2m; --verify runs come on top of it.")] = "60s",
    verify: Annotated[int, typer.Option("--verify", help="Run the k best predicted plans for real and pick on measurements.")] = 0,
    verify_steps: Annotated[int, typer.Option("--verify-steps", help="Steps per verification run.")] = 8,
    objective: Annotated[str, typer.Option("--objective", help="throughput (fastest plan that fits) or memory (smallest peak).")] = "throughput",
    lossless_only: Annotated[bool, typer.Option("--lossless-only", help="Leave out every choice that changes the numbers.")] = False,
    batch_knob: Annotated[str | None, typer.Option("--batch-knob", help="Search the script's batch flag too, e.g. --batch-size=8,16,32 (objective: samples/s).")] = None,
    storage: Annotated[str | None, typer.Option("--storage", help="Optuna storage URL, e.g. sqlite:///study.db (other databases need their driver installed); default: SQLite next to the plan. An existing study resumes (a line on stderr says so); it opens in optuna-dashboard.")] = None,
    study_name: Annotated[str | None, typer.Option("--study-name", help="Study to create or resume; default from the profile, budget and options.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Sampler seed: the same seed gives the same study.")] = 0,
    margin: Annotated[str | None, typer.Option("--margin", help="Share of the budget kept free, e.g. 5%; default: the cost model's measured error.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing plan file (only a regular file: never a link, device or folder).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Search plans that fit a memory budget at the highest throughput (cost model + Optuna), write plan.yaml."""
    from memtune.render import pareto_table, progress_bars
    from memtune.tune import tune_files
    from memtune.tune.study import shown_url
    from memtune.units import format_bytes

    with user_errors(), progress_bars(err_console, enabled=not json_out and err_console.is_terminal) as progress:
        res = tune_files(profile, budget, output, trials=trials, timeout=timeout, verify=verify,
                         verify_steps=verify_steps, objective=objective, lossless_only=lossless_only,
                         batch_knob=batch_knob, storage=storage, study_name=study_name, seed=seed, margin=margin,
                         force=force, progress=progress,
                         notify=lambda line: err_console.print(line, soft_wrap=True, highlight=False, markup=False))
    for w in res.warnings:
        err_console.print(f"[yellow]warning:[/] {w}", soft_wrap=True, highlight=False)
    if json_out:
        print_json(res.to_dict())
        return
    console.print(pareto_table(res))
    c = res.chosen
    m = c.measured if c.verified_ok else None
    peak = (f"measured peak {format_bytes(m['peak_bytes'])}" if m and m.get("peak_bytes") is not None
            else f"predicted peak {format_bytes(c.peak_bytes)}")
    thr = f"{m['throughput']:.4g} {c.unit} measured" if m else f"{c.throughput:.4g} {c.unit} predicted"
    lossy = f" [bold yellow]LOSSY: {', '.join(c.lossy)}[/]" if c.lossy else ""
    console.print(f"wrote [bold]{escape(str(res.output))}[/] ({peak}, {thr}){lossy}; "
                  f"{res.new_trials} trials in {res.search_s:.1f} s of search"
                  + (f" + {res.elapsed_s - res.search_s:.1f} s of verification" if res.verified else "")
                  + f", study {res.study_name!r} in {shown_url(res.storage or '')}",
                  soft_wrap=True, highlight=False)
    from memtune.distributed import launch_prefix

    # the profile's ranks: a plan for a torchrun script runs under torchrun too
    run = " ".join([*launch_prefix(res.world_size), *(["-m"] if res.world_size > 1 else []), "memtune", "apply",
                    str(res.output)])
    console.print(f"run it: {run}", highlight=False, markup=False)


@app.command(name="apply", context_settings={"allow_interspersed_args": True})
def apply_cmd(
    plan: Annotated[str, typer.Argument(help="plan.yaml (from `memtune tune`, or written by hand).")],
    args: Annotated[list[str] | None, typer.Argument(metavar="[SCRIPT] [-- SCRIPT_ARGS...]", help="The script and its arguments; default: the plan's `run` section.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Stop after N optimizer steps (default: let the script finish).")] = None,
    report_out: Annotated[str | None, typer.Option("--report", help="Write what was applied and the measured peak and step time as JSON (checked before the run).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --report file (only a regular file).")] = False,
    blocks: Annotated[str | None, typer.Option("--blocks", help="Glob over module paths for the repeated blocks, e.g. 'model.layers.*'.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Run the training script unchanged with a plan applied at run time; report peak memory and step time."""
    from pathlib import Path

    from memtune.distributed import free_group, is_rank0
    from memtune.errors import ScriptError
    from memtune.io import check_writable, write_json_atomic
    from memtune.patcher import run_apply
    from memtune.strategies import load_plan
    from memtune.units import format_bytes, format_seconds

    args = list(args or [])
    script = args.pop(0) if args and (args[0].endswith(".py") or Path(args[0]).is_file()) else None

    def show(notes: list[tuple[str, str]]) -> None:
        if not is_rank0():  # under torchrun: rank 0 speaks for all (the script's group is live here)
            return
        t = Table(title="memtune apply: what was applied", title_justify="left")
        t.add_column("strategy", style="bold")
        t.add_column("what")
        for s_, n_ in notes:
            t.add_row(s_, escape(n_))
        if not notes:
            t.add_row("-", "nothing: the plan has no strategy sections (a baseline run)")
        (err_console if json_out else console).print(t)

    with user_errors():
        p = load_plan(plan)
        if report_out:
            check_writable(report_out, force, "--report")
        redirect = contextlib.redirect_stdout(sys.stderr) if json_out else contextlib.nullcontext()
        with redirect:
            relaunch = _relaunch("apply", plan, *([script] if script else []),
                                 *(["--steps", str(steps)] if steps is not None else []),
                                 *(["--report", report_out] if report_out else []), *(["--force"] if force else []),
                                 *(["--blocks", blocks] if blocks else []), *(["--json"] if json_out else []),
                                 "--", *args)
            res = run_apply(p, script, args or None, steps=steps, blocks_pattern=blocks, on_notes=show,
                            relaunch=relaunch, end_group=True)
            free_group()  # the stopped script's group and its threads, before interpreter exit
        if report_out and res.rank == 0:  # rank 0's report holds every rank's peak (res.ranks)
            write_json_atomic(report_out, res.to_dict())
        if res.failure:
            sys.stderr.write(res.failure["traceback"])
            raise ScriptError(f"the script failed under the plan ({res.failure['exc_type']}: "
                              f"{res.failure['message']}); its traceback is above")
    if res.rank != 0:
        return
    if json_out:
        print_json(res.to_dict())
        return
    t = Table(title="memtune apply: measured", show_header=False, title_justify="left")
    t.add_column("key", style="bold")
    t.add_column("value")
    t.add_row("script", escape(" ".join([res.script or "", *res.argv])))
    t.add_row("steps", str(res.steps) + (" (stopped by --steps)" if res.stopped else ""))
    over = f" (largest of {res.world_size} ranks)" if res.ranks else ""
    t.add_row("peak allocated", format_bytes(res.peak_allocated_bytes) + over if res.peak_allocated_bytes is not None
              else "n/a (CPU run)")
    if res.peak_reserved_bytes is not None:
        t.add_row("peak reserved", format_bytes(res.peak_reserved_bytes))
    t.add_row("step time (median)", format_seconds(res.step_s) if res.step_s is not None else "n/a (fewer than 2 steps)")
    if res.lossy:
        t.add_row("LOSSY sections", ", ".join(res.lossy))
    console.print(t)
    if report_out:
        console.print(f"wrote {report_out}", highlight=False)


@app.command(name="export")
def export_cmd(
    plan: Annotated[str, typer.Argument(help="plan.yaml (from `memtune tune`, or written by hand).")],
    to: Annotated[str, typer.Option("--to", help="hf (transformers TrainingArguments), lightning (lightning.Trainer) or accelerate (Accelerator).")],
    json_out: JsonOpt = False,
) -> None:
    """Print the settings a framework already has that a plan maps to; what has none is listed, for the callback."""
    from memtune.integrations.export import export_file
    from memtune.render import render_export

    with user_errors():
        exp = export_file(plan, to)
    if json_out:
        print_json(exp.to_dict())
        return
    render_export(exp, console)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
