"""The cost model re-predicts every stored measurement of docs/accuracy.md as the stored results say.

benchmarks/accuracy_results.json holds each model's profile, each plan and the prediction the doc shows;
a change to the cost model or a strategy's effect that moves one of them must re-render the doc
(`python benchmarks/accuracy.py --from benchmarks/accuracy_results.json --save ... --doc docs/accuracy.md`)
and say why, rather than drift silently.
"""

import json
from pathlib import Path

import pytest
import yaml

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


def test_the_tuned_7b_offload_plan_predicts_its_measured_peaks():
    """The 7B full fine-tune's profile (call 41) and its tuned plan: peaks measured on the H200 at batch 10
    (call 41's verification), 12 (call 40) and 14 (call 42). The fused loss's batch scaling and lazy logits
    and the autocast copies' fixed share are what bring them within 0.2% (batch 10 read +20% before)."""
    root = RESULTS.parents[1]
    p = Profile.load(root / "benchmarks" / "results" / "run41" / "llama7b.profile.json")
    plan = yaml.safe_load((root / "benchmarks" / "plans" / "llama7b_24gib.yaml").read_text())
    for bs, measured in ((10, 17_963_062_272), (12, 21_222_626_304), (14, 24_482_190_336)):
        plan["run"]["knobs"]["--batch-size"] = bs
        assert estimate(p, plan).peak_bytes == pytest.approx(measured, rel=0.002), bs


def test_the_7b_plan_tune_chose_predicts_its_verified_peak_and_step():
    """Call 46 (H200): the plan `memtune tune --budget 24GiB --verify 2` chose from a profile with the batch-of-one
    doubling probe and the 128M-element host AdamW probe; issue 20 asks the prediction within 3% (peak) and 10%
    (step) of its verified measurement, which the plan file stores."""
    run = RESULTS.parents[1] / "benchmarks" / "results" / "run46"
    plan = yaml.safe_load((run / "llama7b_24gib.yaml").read_text())
    measured = plan["provenance"]["measured"]
    est = estimate(Profile.load(run / "llama7b.profile.json"), plan)
    assert abs(est.peak_bytes / measured["peak_bytes"] - 1) <= 0.03
    assert abs(est.step_s / measured["step_s"] - 1) <= 0.10
    assert any("vocab 32000," in n for n in est.notes)  # the head's width from the profiled tokens
