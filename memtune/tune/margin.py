"""The safety margin: the share of the budget the search keeps free, from the cost model's measured error."""

from __future__ import annotations

import math
import re
from pathlib import Path

from memtune.errors import InputError

DEFAULT_MARGIN = 0.03  # when an accuracy table has no measured peaks (see safety_margin)
# What `safety_margin` computes from docs/accuracy.md (H100, torch 2.11, 2026-11-25, 46 plans: worst peak
# under-prediction -0.9%, GPT-125M compress int8 half; -3.9% before the cost model counted autocast's weight
# copies at the loss's forward); tests/test_search.py keeps the two in step.
PEAK_MARGIN = 0.01


_ROW = re.compile(r"^\|\s*(?P<plan>[^|]+?)\s*\|\s*(?P<meas>[0-9]+(?:\.[0-9]+)?)\s*\|\s*(?P<pred>[0-9]+(?:\.[0-9]+)?)\s*\|", re.M)
MAX_MARGIN = 0.15


def measured_peak_pairs(text: str) -> list[tuple[str, float, float]]:
    """(plan, measured, predicted) peaks from docs/accuracy.md's per-model tables (rows `| plan | measured GiB |
    predicted GiB | ...`; rows that failed or were not run have no number there and are skipped)."""
    return [(m["plan"], float(m["meas"]), float(m["pred"])) for m in _ROW.finditer(text) if float(m["meas"]) > 0]


def safety_margin(accuracy_md: str | Path | None = None) -> tuple[float, str]:
    """The fraction of the budget kept free, from the cost model's measured peak errors in docs/accuracy.md.

    What breaks a budget is an under-prediction (measured > predicted): a plan predicted at P with relative
    under-prediction u = (measured - P) / measured uses P / (1 - u), which stays within the budget B when
    P <= B * (1 - u). So the margin is the largest measured u, rounded up to the next whole percent (a little
    room for plans not measured), and at least 1%:

        margin = clamp(floor(100 * max_u) / 100 + 0.01, 0.01, 0.15)

    Over-predictions (predicted > measured, e.g. bf16 params +16.8% on an H100) only waste memory and do not
    count. On the H100 data of 2026-11-25 (46 plans) the worst is -0.9% (GPT-125M, compress int8 half: 8.66 GiB
    measured, 8.59 predicted): margin 1% (4% before the loss-forward fix, when the worst was -3.9%); 34 points
    of the tune benchmark's Llama sweep, re-predicted, are at worst -0.6%. Without the tables: the
    `median absolute peak error` line, at
    least DEFAULT_MARGIN; without the file: DEFAULT_MARGIN. Verification (`--verify`) measures the real peak
    and rejects plans over the budget whatever the margin.
    """
    if accuracy_md is None:
        # the number, not the doc: an installed memtune has no docs/ to read
        return PEAK_MARGIN, "largest measured peak under-prediction (docs/accuracy.md, H100)"
    path = Path(accuracy_md)
    try:
        text = path.read_text()
    except OSError:
        return DEFAULT_MARGIN, "default"
    pairs = measured_peak_pairs(text)
    if pairs:
        worst = max((meas - pred) / meas for _, meas, pred in pairs)
        frac = math.floor(100 * max(0.0, worst) + 1e-9) / 100 + 0.01
        frac = min(MAX_MARGIN, max(0.01, frac))
        return frac, f"largest peak under-prediction in {path.name} ({max(0.0, worst):.1%} over {len(pairs)} plans)"
    m = re.search(r"median absolute peak error[^0-9\n]{0,40}?([0-9]+(?:\.[0-9]+)?)\s*%", text, re.I)
    if m:
        return min(MAX_MARGIN, max(DEFAULT_MARGIN, float(m.group(1)) / 100)), f"median peak error in {path.name}"
    return DEFAULT_MARGIN, "default"


def parse_margin(text: str | float | None) -> float | None:
    """`5%` or `0.05` -> 0.05; None keeps the cost model's measured error."""
    if text is None or text == "":
        return None
    t = str(text).strip()
    try:
        return float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise InputError(f"bad --margin {text!r}: write a share of the budget, e.g. 5% or 0.05") from None
