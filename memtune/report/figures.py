"""The report's figures: matplotlib through its object API (`matplotlib.figure.Figure` + Agg), never pyplot,
so nothing global changes in the caller; it is an optional extra, imported here lazily."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

from memtune.errors import EnvironmentNotSupported
from memtune.report.data import _COLORS, _MODE_COLORS, ReportData
from memtune.units import format_bytes

if TYPE_CHECKING:
    import pandas as pd

# --- figures -----------------------------------------------------------------------------------------------
def _mpl():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError:
        raise EnvironmentNotSupported("reports need matplotlib: pip install 'memtune[report]'") from None
    return Figure


def _unit(max_bytes: float) -> tuple[float, str]:
    return (2**30, "GiB") if max_bytes >= 2**30 else (2**20, "MiB") if max_bytes >= 2**20 else (2**10, "KiB")


def _budget_shown(data: ReportData, data_max: float) -> bool:
    """Draw the budget line only where it does not squash the data (a far-off GPU size is named instead)."""
    return bool(data.budget) and data.budget <= 2.5 * data_max


def _budget_note(ax, data: ReportData) -> None:
    if data.budget:
        ax.text(0.99, 0.98, f"{data.budget_label} {format_bytes(data.budget)}: off the scale", color="#c0392b",
                transform=ax.transAxes, ha="right", va="top", fontsize=9)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _style(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)


@dataclass
class Plot:
    name: str  # file stem for --png
    title: str
    caption: str
    png: bytes


def build_figures(data: ReportData, tables: dict[str, pd.DataFrame]) -> list[Plot]:
    Figure = _mpl()
    figs: list[Plot] = []
    if "memory" in tables:
        figs.append(_fig_memory(Figure, data, tables["memory"]))
    if "blocks" in tables:
        figs.append(_fig_blocks(Figure, data, tables["blocks"]))
    if "timeline" in tables:
        figs.append(_fig_timeline(Figure, data, tables["timeline"]))
    if "trials" in tables and len(tables["trials"]):
        figs.append(_fig_pareto(Figure, data, tables["trials"]))
        if tables["trials"][["measured_peak_bytes", "measured_step_s"]].notna().any().any():
            figs.append(_fig_verified(Figure, tables["trials"]))
    return figs


def _fig_memory(Figure, data: ReportData, df: pd.DataFrame) -> Plot:
    has_plan = data.planned is not None
    cols = ["baseline_bytes"] + (["plan_bytes"] if has_plan else [])
    labels = ["baseline"] + (["plan"] if has_plan else [])
    totals = [float(df[c].sum()) for c in cols]
    show_budget = _budget_shown(data, max(totals))
    top = max(totals + [data.budget if show_budget else 0.0])
    div, unit = _unit(top)
    fig = Figure(figsize=(9.5, 4.2))
    ax = fig.subplots()
    _style(ax)
    x = list(range(len(cols)))
    bottom = [0.0] * len(cols)
    negative: dict[str, float] = {}
    for _, row in df.iterrows():
        vals = [float(row[c]) / div for c in cols]
        for c, v in zip(labels, vals, strict=True):
            if v < 0:  # calibration can take bytes away: say so instead of drawing below the stack
                negative[f"{row['component']} ({c})"] = v * div
        vals = [max(v, 0.0) for v in vals]
        if not any(v > 0 for v in vals):
            continue
        ax.bar(x, vals, bottom=bottom, width=0.5, label=row["component"],
               color=_COLORS.get(row["component"]), edgecolor="white", linewidth=0.6)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    for xi, t, h in zip(x, totals, bottom, strict=True):
        ax.annotate(f"peak {format_bytes(t)}", (xi, h), textcoords="offset points", xytext=(0, 4), ha="center",
                    va="bottom", fontsize=10, bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.5})
    top = max([top] + [b * div for b in bottom])
    if not show_budget:
        _budget_note(ax, data)
    elif data.budget:
        ax.axhline(data.budget / div, color="#c0392b", linestyle="--", linewidth=1.5,
                   label=f"{data.budget_label} {format_bytes(data.budget)}")
    ax.set_xticks(x, labels)
    ax.set_xlim(-0.6, len(cols) - 0.4)
    ax.set_ylim(0, top / div * 1.12)
    ax.set_ylabel(f"bytes at the peak ({unit})")
    handles, names = ax.get_legend_handles_labels()  # components top-down as stacked, the budget last
    bars = [(h, n) for h, n in zip(handles, names, strict=True) if n in set(df["component"])][::-1]
    rest = [(h, n) for h, n in zip(handles, names, strict=True) if n not in set(df["component"])]
    ax.legend(*zip(*(bars + rest), strict=True), loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title("Memory at the predicted peak, by component", loc="left")
    caption = ("Stacked bars: what is live at the predicted peak of one training step. "
               + ("Baseline = the script as profiled; plan = the same step with the plan applied. "
                  if has_plan else "Baseline = the script as profiled. ")
               + (f"Dashed line: {data.budget_label} ({format_bytes(data.budget)}). " if data.budget else "")
               + ("Negative, so left out of the bars and counted in the peak: "
                  + ", ".join(f"{k} {format_bytes(v)}" for k, v in negative.items())
                  + " (the cost model's calibration to the measured peak)." if negative else ""))
    return Plot("memory", "Memory by component", caption, _png(fig))


def _short(names: list[str], repeated: list[str]) -> list[str]:
    """Drop the module-path prefix the repeated blocks share ("model.layers.3" -> "layers.3", and
    "model.embed_tokens" -> "embed_tokens" with it), so the axis labels stay short."""
    parts = [n.split(".") for n in repeated] or [n.split(".") for n in names]
    k = 0
    while all(len(p) > k + 2 for p in parts) and len({p[k] for p in parts}) == 1 and k < 1:
        k += 1
    prefix = ".".join(parts[0][:k]) + "." if k else ""
    return [n.removeprefix(prefix) if prefix and n.startswith(prefix) and n != prefix[:-1] else n for n in names]


def _fig_blocks(Figure, data: ReportData, df: pd.DataFrame) -> Plot:
    n = len(df)
    names = _short(df["block"].tolist(), df.loc[df["kind"] == "repeated", "block"].tolist())
    div, unit = _unit(float(df["activation_bytes"].max() or 1))
    tmax = float(max(df["fwd_s"].max(), df["bwd_s"].max()))
    tdiv, tunit = (1.0, "s") if tmax >= 1 else (1e-3, "ms") if tmax >= 1e-3 else (1e-6, "µs")
    fig = Figure(figsize=(max(9.5, 0.32 * n + 3), 5.6))
    ax1, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1.1, 1], "hspace": 0.12})
    _style(ax1)
    _style(ax2)
    x = list(range(n))
    has_plan = data.plan is not None
    modes = df["plan_choice"].tolist() if has_plan else ["keep"] * n
    colors = [_MODE_COLORS.get(m, "#444444") for m in modes]
    ax1.bar(x, df["activation_bytes"] / div, color=colors, width=0.75)
    if has_plan and df["plan_kept_bytes"].notna().any():
        ax1.scatter(x, df["plan_kept_bytes"] / div, marker="_", s=160, color="black", zorder=3,
                    label="kept under the plan")
    ax1.set_ylabel(f"activations ({unit})")
    if has_plan:
        from matplotlib.patches import Patch

        seen = list(dict.fromkeys(modes))
        handles = [Patch(color=_MODE_COLORS.get(m, "#444444"), label=m) for m in seen]
        if df["plan_kept_bytes"].notna().any():
            from matplotlib.lines import Line2D

            handles.append(Line2D([], [], color="black", marker="_", linestyle="", markersize=12,
                                  label="kept under the plan"))
        ax1.legend(handles=handles, title="plan choice", loc="center left", bbox_to_anchor=(1.01, 0.5),
                   frameon=False)
    w = 0.38
    ax2.bar([i - w / 2 for i in x], df["fwd_s"] / tdiv, width=w, color="#0072B2", label="forward")
    ax2.bar([i + w / 2 for i in x], df["bwd_s"] / tdiv, width=w, color="#E69F00", label="backward")
    ax2.set_ylabel(f"time per call ({tunit})")
    ax2.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax2.set_xticks(x, names, rotation=45 if n > 8 else 0, ha="right" if n > 8 else "center",
                   rotation_mode="anchor", fontsize=8)
    ax1.set_title("Per block: activations saved for backward, and forward/backward time", loc="left")
    caption = ("Top: bytes each block saves for its backward (parameters excluded)"
               + ("; the colour is the plan's choice for the block, the black tick what it keeps on the device "
                  "between its forward and backward under the plan." if has_plan else ".")
               + " Bottom: measured forward and backward seconds per call.")
    return Plot("blocks", "Blocks", caption, _png(fig))


def _fig_timeline(Figure, data: ReportData, df: pd.DataFrame) -> Plot:
    show_budget = _budget_shown(data, float(df["live_bytes"].max()))
    top = max(float(df["live_bytes"].max()), data.budget if show_budget else 0.0)
    div, unit = _unit(top)
    tmax = float(df["t_s"].max()) or 1.0
    tdiv, tunit = (1.0, "s") if tmax >= 2 else (1e-3, "ms")
    fig = Figure(figsize=(9.5, 4.0))
    ax = fig.subplots()
    _style(ax)
    colors = {"simulated baseline": "#0072B2", "simulated plan": "#009E73", "allocator (measured)": "#D55E00"}
    for series, g in df.groupby("series", sort=False):
        color = colors.get(series, "#444444")
        sim = series.startswith("simulated")
        i = g["live_bytes"].idxmax()
        label = f"{series}\npeak {format_bytes(g.loc[i, 'live_bytes'])}" + (f" at {g.loc[i, 'event']}" if sim else "")
        ax.step(g["t_s"] / tdiv, g["live_bytes"] / div, where="post", color=color,
                linewidth=1.8 if sim else 1.0, alpha=1.0 if sim else 0.85, label=label)
        ax.plot([g.loc[i, "t_s"] / tdiv], [g.loc[i, "live_bytes"] / div], "o", color=color, markersize=5)
    if not show_budget:
        _budget_note(ax, data)
    elif data.budget:
        ax.axhline(data.budget / div, color="#c0392b", linestyle="--", linewidth=1.2,
                   label=f"{data.budget_label} {format_bytes(data.budget)}")
    ax.set_xlim(0, tmax / tdiv)
    ax.set_ylim(0, top / div * 1.1)
    ax.set_xlabel(f"time into the step ({tunit})")
    ax.set_ylabel(f"live bytes ({unit})")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title("Memory over one step", loc="left")
    caption = ("The cost model's simulated step: the forward keeps each block's activations, the backward frees "
               "them and creates gradients, then the optimizer step; times are the profile's per-block times")
    if data.allocator_timeline:
        caption += ". Orange: the allocator's live bytes as PyTorch's memory history recorded them."
    else:
        caption += ". The allocator's real timeline is drawn here too when the profile was taken with " \
                   "`memtune profile --memory-timeline` on a GPU."
    return Plot("timeline", "Memory over one step", caption, _png(fig))


def _fig_pareto(Figure, data: ReportData, df: pd.DataFrame) -> Plot:
    d = df.dropna(subset=["predicted_peak_bytes", "predicted_throughput"])
    d = d[d["state"] == "COMPLETE"]
    pmax = float(d["predicted_peak_bytes"].max()) if len(d) else 1.0
    show_budget = _budget_shown(data, pmax)
    top = max(pmax, data.budget if show_budget else 0.0)
    div, unit = _unit(top)
    unit_t = next((u for u in d["throughput_unit"].dropna()), "samples/s")
    fig = Figure(figsize=(9.5, 4.4))
    ax = fig.subplots()
    _style(ax)
    y = "predicted_throughput"
    feas, infeas = d[d["feasible"]], d[~d["feasible"]]
    ax.scatter(feas["predicted_peak_bytes"] / div, feas[y], s=18, color="#8fa3b8", label="fits the budget")
    if len(infeas):
        ax.scatter(infeas["predicted_peak_bytes"] / div, infeas[y], s=18, marker="x", color="#e0a89f",
                   label="over the budget")
    front = d[d["pareto"]].sort_values("predicted_peak_bytes")
    if len(front):
        ax.step(front["predicted_peak_bytes"] / div, front[y], where="post", color="#0072B2", linewidth=1.5,
                marker="o", markersize=5, label="Pareto front")
    ver = d[d["verify_status"].notna()]
    if len(ver):
        ax.scatter(ver["predicted_peak_bytes"] / div, ver[y], s=70, facecolors="none", edgecolors="black",
                   linewidth=1.0, label="verified for real")
    ch = d[d["chosen"]]
    if len(ch):
        ax.scatter(ch["predicted_peak_bytes"] / div, ch[y], s=260, marker="*", color="#E69F00", edgecolor="black",
                   linewidth=0.8, zorder=5, label=f"chosen (trial {int(ch.iloc[0]['trial'])})")
    if not show_budget:
        _budget_note(ax, data)
    elif data.budget:
        ax.axvline(data.budget / div, color="#c0392b", linestyle="--", linewidth=1.2,
                   label=f"{data.budget_label} {format_bytes(data.budget)}")
        if data.limit and data.limit < data.budget:
            ax.axvline(data.limit / div, color="#c0392b", linestyle=":", linewidth=1.0,
                       label=f"less safety margin {format_bytes(data.limit)}")
    ax.set_xlabel(f"predicted peak memory ({unit})")
    ax.set_ylabel(f"predicted throughput ({unit_t})")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title("Study: peak memory against throughput", loc="left")
    caption = (f"{len(d)} distinct plans of study {data.study_name!r}, predicted by the cost model. The Pareto "
               "front joins the plans no other plan beats on both memory and throughput; the star is the chosen "
               "plan (crosses: over the budget less the safety margin).")
    return Plot("pareto", "Pareto front", caption, _png(fig))


def _fig_verified(Figure, df: pd.DataFrame) -> Plot:
    v = df[df["verify_status"].notna()]
    fig = Figure(figsize=(9.5, 4.0))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"wspace": 0.3})
    for ax in (ax1, ax2):
        _style(ax)
        ax.grid(axis="x", color="#e5e5e5", linewidth=0.8)
    pk = v.dropna(subset=["measured_peak_bytes"])
    if len(pk):
        div, unit = _unit(float(max(pk["predicted_peak_bytes"].max(), pk["measured_peak_bytes"].max())))
        _diag(ax1, pk["predicted_peak_bytes"] / div, pk["measured_peak_bytes"] / div, pk)
        ax1.set_xlabel(f"predicted peak ({unit})")
        ax1.set_ylabel(f"measured peak ({unit})")
    else:
        ax1.text(0.5, 0.5, "no peaks measured", ha="center", va="center", transform=ax1.transAxes)
        ax1.set_xticks([])
        ax1.set_yticks([])
    ax1.set_title("Peak memory", loc="left")
    st = v.dropna(subset=["predicted_step_s", "measured_step_s"])
    if len(st):
        _diag(ax2, st["predicted_step_s"] * 1e3, st["measured_step_s"] * 1e3, st)
        ax2.set_xlabel("predicted step (ms)")
        ax2.set_ylabel("measured step (ms)")
    else:
        ax2.text(0.5, 0.5, "no step times measured", ha="center", va="center", transform=ax2.transAxes)
        ax2.set_xticks([])
        ax2.set_yticks([])
    ax2.set_title("Step time", loc="left")
    caption = f"{len(v)} plans run for real ({', '.join(f'{n} {k}' for k, n in v['verify_status'].value_counts().items())}). "
    caption += "On the dashed diagonal the prediction is exact; the orange point is the chosen plan."
    if len(pk):
        err = (pk["measured_peak_bytes"] - pk["predicted_peak_bytes"]) / pk["measured_peak_bytes"]
        caption += (f" Peak error (measured - predicted) / measured: median {err.median():+.1%}, "
                    f"worst {err.abs().max():.1%}.")
    return Plot("verified", "Predicted against measured", caption, _png(fig))


def _diag(ax, x, y, rows) -> None:
    lo = float(min(x.min(), y.min())) * 0.95
    hi = float(max(x.max(), y.max())) * 1.05
    ax.plot([lo, hi], [lo, hi], color="#999999", linestyle="--", linewidth=1)
    colors = ["#E69F00" if c else "#0072B2" for c in rows["chosen"]]
    ax.scatter(x, y, s=36, color=colors, edgecolor="black", linewidth=0.5, zorder=3)
    for xi, yi, t in zip(x, y, rows["trial"], strict=True):
        ax.annotate(str(int(t)), (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7, color="#555555")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
