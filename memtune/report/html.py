"""The report's one self-contained HTML page: plots embedded as base64 PNG, no external resources."""

from __future__ import annotations

import base64
import html
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memtune.report.data import ReportData
from memtune.report.figures import Plot
from memtune.units import format_bytes, format_seconds

if TYPE_CHECKING:
    import pandas as pd

# --- HTML --------------------------------------------------------------------------------------------------
_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#222;margin:0;
background:#f6f7f9;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:24px 28px 48px;background:#fff;min-height:100vh}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.2em;margin:32px 0 8px;border-bottom:1px solid #e3e3e3;
padding-bottom:4px}.sub{color:#666;margin:0 0 16px;font-size:.92em}
img{max-width:100%;height:auto;display:block;margin:8px 0}
figcaption{color:#555;font-size:.9em;margin-bottom:10px}
table{border-collapse:collapse;font-size:.88em;margin:8px 0}
th,td{padding:3px 10px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th{background:#fafafa;text-align:right}td.l,th.l,td:first-child,th:first-child{text-align:left}
table.facts td{text-align:left;white-space:normal}table.facts td:first-child{color:#666;padding-right:18px}
.kpis{display:grid;grid-template-columns:repeat(auto-fill,minmax(132px,1fr));margin:12px 0}
.kpis{gap:10px}.kpi{border:1px solid #e3e3e3;border-radius:6px;padding:8px 12px}
.kpi b{display:block;font-size:1.3em}.kpi span{color:#666;font-size:.85em}
.lossy{color:#b03a2e;font-weight:bold}details{margin:6px 0}summary{cursor:pointer;color:#0b5cad}
div.scroll{overflow-x:auto}td.l{white-space:normal;min-width:60px}
ul.notes{color:#555;font-size:.9em}pre{background:#f6f8fa;padding:8px 12px;font-size:.85em;overflow-x:auto}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt_table(df: pd.DataFrame, fmt: dict[str, Any]) -> str:
    """An HTML table: numbers right-aligned, text left-aligned, empty cells for missing values."""
    import pandas as pd

    left = {c for c in df.columns if c not in fmt and df[c].dtype == object}

    def cell(col: str, v: Any) -> str:
        text = "" if v is None or (not isinstance(v, (list, dict)) and pd.isna(v)) else (fmt[col](v) if col in fmt else v)
        return f'<td class="l">{_e(text)}</td>' if col in left else f"<td>{_e(text)}</td>"

    head = "".join(f'<th class="l">{_e(c)}</th>' if c in left else f"<th>{_e(c)}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(cell(c, v) for c, v in zip(df.columns, row, strict=True)) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kpis(data: ReportData) -> str:
    items = []
    if data.baseline is not None:
        items.append((format_bytes(data.baseline.peak_bytes), "baseline peak (predicted)"))
    if data.profile is not None and data.profile.peak.allocated_bytes:
        what = "measured peak" if data.profile.peak.measured else "peak (sum of parts, CPU)"
        items.append((format_bytes(data.profile.peak.allocated_bytes), what))
    if data.planned is not None:
        items.append((format_bytes(data.planned.peak_bytes), "plan peak (predicted)"))
        if data.baseline and data.baseline.step_s and data.planned.step_s:
            items.append((f"{data.planned.step_s / data.baseline.step_s:.2f}×", "plan step time vs baseline"))
    elif data.profile is not None and data.profile.step_s:
        items.append((format_seconds(data.profile.step_s), "measured step"))
    if data.budget:
        items.append((format_bytes(data.budget), data.budget_label))
    if data.trials is not None:
        items.append((str(len(data.trials)), "distinct plans in the study"))
        items.append((str(int(data.trials["verify_status"].notna().sum())), "plans verified for real"))
    return '<div class="kpis">' + "".join(f'<div class="kpi"><b>{_e(v)}</b><span>{_e(k)}</span></div>'
                                          for v, k in items) + "</div>"


def _facts(data: ReportData) -> str:
    rows: list[tuple[str, str]] = [("input", f"{data.source} ({data.kind})")]
    p = data.profile
    if p is not None:
        hw = p.hardware
        dev = f"{hw.gpu_name}, {format_bytes(hw.gpu_total_bytes or 0)}" if hw.gpu_name else "CPU"
        rows += [("profile", data.profile_source or ""), ("script", " ".join([p.script or p.module or "?", *p.argv])),
                 ("device", dev), ("torch", p.torch_version), ("model", f"{p.model_cls.rsplit('.', 1)[-1]}, {len(p.blocks)} blocks "
                  f"({len(p.repeated_blocks)} repeated), {format_bytes(p.param_bytes)} of parameters"),
                 ("optimizer", ", ".join(o.kind for o in p.optimizers) or "?")]
        if p.batch_size:
            rows.append(("batch", f"{p.batch_size}" + (f" × {p.seq_len} tokens" if p.seq_len else "")))
    if data.plan is not None and data.plan.sections:
        for name, sec in data.plan.sections.items():
            rows.append((f"plan: {name}", sec.describe()))
        lossy = data.plan.lossy
        if lossy:
            rows.append(("lossy", f'<span class="lossy">{_e(", ".join(lossy))}</span>'))
    if data.study_name:
        rows.append(("study", data.study_name))
    body = "".join(f"<tr><td>{_e(k)}</td><td>{v if k == 'lossy' else _e(v)}</td></tr>" for k, v in rows)
    return f'<table class="facts">{body}</table>'


def render_html(data: ReportData, tables: dict[str, pd.DataFrame], figures: list[Plot]) -> str:
    import pandas as pd

    B = lambda v: format_bytes(v)  # noqa: E731
    T = lambda v: format_seconds(v)  # noqa: E731
    figs = {f.name: f for f in figures}
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>memtune report: "
             f"{_e(Path(data.source).name)}</title><meta name=\"viewport\" content=\"width=device-width, "
             f"initial-scale=1\"><style>{_CSS}</style></head><body><main>",
             f"<h1>memtune report</h1><p class=\"sub\">{_e(Path(data.source).name)} · generated "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p>", _kpis(data), _facts(data)]

    def fig(name: str) -> str:
        f = figs.get(name)
        if f is None:
            return ""
        b64 = base64.b64encode(f.png).decode()
        return (f'<figure style="margin:0"><img alt="{_e(f.title)}" src="data:image/png;base64,{b64}">'
                f"<figcaption>{_e(f.caption)}</figcaption></figure>")

    if "memory" in tables:
        mem = tables["memory"]
        mem = pd.concat([mem, pd.DataFrame([{"component": "total", "baseline_bytes": mem["baseline_bytes"].sum(),
                                             "plan_bytes": mem["plan_bytes"].sum(min_count=1)}])])
        if data.planned is None:
            mem = mem.drop(columns=["plan_bytes"])
        parts += ["<h2>Memory by component</h2>", fig("memory"),
                  _fmt_table(mem.rename(columns={"baseline_bytes": "baseline", "plan_bytes": "plan"}),
                             {"baseline": B, "plan": B})]
    if "blocks" in tables:
        df = tables["blocks"]
        show = df if data.plan is not None else df.drop(columns=["plan_choice", "plan_kept_bytes"])
        parts += ["<h2>Blocks</h2>", fig("blocks"),
                  f"<details><summary>table of {len(df)} blocks</summary>"
                  + _fmt_table(show, {"activation_bytes": B, "input_bytes": B, "fwd_s": T, "bwd_s": T,
                                      "plan_kept_bytes": B}) + "</details>"]
    if "timeline" in tables:
        parts += ["<h2>Memory over one step</h2>", fig("timeline")]
    if "trials" in tables:
        parts += ["<h2>Study</h2>", fig("pareto"), fig("verified")]
        tr = tables["trials"]
        best = tr[tr["pareto"] | tr["chosen"] | tr["verify_status"].notna()].sort_values("predicted_peak_bytes")
        cols = ["trial", "plan", "predicted_peak_bytes", "predicted_step_s", "predicted_throughput", "feasible",
                "chosen", "verify_status", "measured_peak_bytes", "measured_step_s", "lossy"]
        cols = [c for c in cols if best[c].notna().any() and (best[c] != "").any()]  # leave out empty columns
        show = best[cols].rename(columns={"predicted_peak_bytes": "peak", "predicted_step_s": "step",
                                          "predicted_throughput": "throughput", "verify_status": "verified",
                                          "measured_peak_bytes": "measured peak", "measured_step_s": "measured step"})
        parts.append(f"<p>{len(best)} Pareto, chosen and verified plans (predicted unless marked measured; all "
                     f"{len(tr)} in trials.csv with --csv):</p><div class=\"scroll\">"
                     + _fmt_table(show, {"peak": B, "measured peak": B, "step": T, "measured step": T,
                                         "throughput": lambda v: f"{v:.4g}",
                                         "feasible": lambda v: "yes" if v else "no",
                                         "chosen": lambda v: "★" if v else ""}) + "</div>")
    notes = list(data.notes) + (list(data.planned.notes) if data.planned is not None else [])
    if notes:
        parts.append("<h2>Notes</h2><ul class=\"notes\">" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)
