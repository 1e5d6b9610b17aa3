"""The `memtune` command: a thin Typer app. Each command parses, calls one library function, renders.

Library code raises `MemtuneError`; `user_errors()` turns it into one line on stderr and exit code 1.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from memtune import __version__
from memtune.errors import MemtuneError

app = typer.Typer(
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
    except MemtuneError as e:
        msg = " ".join(str(e).split())
        err_console.print(f"[bold red]error:[/] {msg}", soft_wrap=True, highlight=False, markup=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(130) from None


def print_json(data: Any) -> None:
    # Plain print: rich would wrap long lines and break machine parsing.
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


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


@app.command()
def estimate(
    profile: Annotated[str, typer.Argument(help="profile.json written by `memtune profile`.")],
    plan: Annotated[str | None, typer.Option("--plan", "-p", help="plan.yaml to estimate; none: the baseline.")] = None,
    budget: Annotated[str | None, typer.Option("--budget", "-b", help="GPU memory budget, e.g. 16GiB, 16GB, 16000MiB.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Estimate at this batch size (scaled from the profile).")] = None,
    profile2: Annotated[str | None, typer.Option("--profile2", help="A profile of the same run at another batch size: fit batch scaling through both.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Predict the peak memory and step time of a plan (or the baseline) from a profile, with a breakdown."""
    from memtune.costmodel import estimate_files, render_report

    with user_errors():
        rep = estimate_files(profile, plan, budget, batch_size, profile2)
    if json_out:
        print_json(rep.to_dict())
    else:
        render_report(rep, console)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
