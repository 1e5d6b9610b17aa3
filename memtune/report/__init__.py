"""`memtune report`: tables and plots a person would rather look at than read.

One input (a profile, a plan or a tuning study) -> one self-contained HTML file (plots embedded as base64
PNG, no external resources: it opens offline), and on request the same plots as PNG files and the tables as
CSV files (columns documented in docs/report.md).

- `data.py`: reading the input, the cost model's view of it, the tables.
- `figures.py`: the plots (matplotlib, optional, imported lazily).
- `html.py`: the page.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from memtune.io import write_bytes_atomic
from memtune.report.data import CSV_COLUMNS, build_tables, load_report_data, snapshot_timeline
from memtune.report.figures import _mpl, build_figures
from memtune.report.html import render_html
from memtune.tune.records import pareto_mask

__all__ = ["CSV_COLUMNS", "ReportResult", "pareto_mask", "snapshot_timeline", "write_report"]


@dataclass
class ReportResult:
    html: Path
    pngs: list[Path] = field(default_factory=list)
    csvs: list[Path] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def write_report(source: str | os.PathLike, out: str | os.PathLike = "report.html", *,
                 png_dir: str | os.PathLike | None = None, csv_dir: str | os.PathLike | None = None,
                 force: bool = False, profile: str | os.PathLike | None = None, budget: str | int | None = None,
                 study_name: str | None = None) -> ReportResult:
    """Render the report of a profile, plan or study: HTML, and PNGs/CSVs when asked."""
    from memtune.io import check_output_dir, check_writable
    from memtune.units import parse_budget

    check_writable(out, force, "-o")
    for d, opt in ((png_dir, "--png"), (csv_dir, "--csv")):
        if d is not None:
            check_output_dir(d, opt)
    if budget is not None:
        parse_budget(budget)  # before any reading: a bare number or 0 is refused
    _mpl()  # fail on a missing matplotlib before reading anything
    data = load_report_data(source, profile=profile, budget=budget, study_name=study_name)
    tables = build_tables(data)
    figures = build_figures(data, tables)
    # Check every target before writing any, so a refused overwrite leaves nothing half-written.
    pngs = [check_writable(Path(png_dir) / f"{f.name}.png", force, "--png") for f in figures] if png_dir is not None else []
    csvs = [check_writable(Path(csv_dir) / f"{n}.csv", force, "--csv") for n in tables] if csv_dir is not None else []
    for f, p in zip(figures, pngs, strict=False):
        write_bytes_atomic(p, f.png)
    for (name, df), p in zip(tables.items(), csvs, strict=False):
        write_bytes_atomic(p, df[CSV_COLUMNS[name]].to_csv(index=False).encode())
    html_path = write_bytes_atomic(Path(out), render_html(data, tables, figures).encode("utf-8"))
    return ReportResult(html=html_path, pngs=pngs, csvs=csvs, sections=[f.name for f in figures],
                        notes=data.notes)
