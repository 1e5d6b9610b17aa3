"""The cost model re-predicts every stored measurement of docs/accuracy.md as the stored results say.

benchmarks/accuracy_results.json holds each model's profile, each plan and the prediction the doc shows;
a change to the cost model or a strategy's effect that moves one of them must re-render the doc
(`python benchmarks/accuracy.py --from benchmarks/accuracy_results.json --save ... --doc docs/accuracy.md`)
and say why, rather than drift silently.
"""

import json
from pathlib import Path

import pytest

from memtune.estimate import estimate
from memtune.profile import Profile
from memtune.strategies import plan_from_dict

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_results.json"


def _rows():
    data = json.loads(RESULTS.read_text())
    for rec in data["models"]:
        for row in rec["rows"]:
            if row.get("pred_peak") is not None:
                yield rec["model"], rec["profile"], row


def test_every_stored_plan_re_predicts_identically():
    rows = list(_rows())
    assert len(rows) >= 40
    profiles: dict[str, Profile] = {}
    for model, prof, row in rows:
        p = profiles.setdefault(model, Profile.from_dict(prof))
        est = estimate(p, plan_from_dict(row["plan_dict"]))
        assert est.peak_bytes == pytest.approx(row["pred_peak"], rel=1e-9), (model, row["plan"])
        assert est.step_s == pytest.approx(row["pred_step_s"], rel=1e-9), (model, row["plan"])
        assert est.peak_phase == row["pred_phase"], (model, row["plan"])
