"""`memtune tune` through the CLI (CliRunner and a real subprocess), and verification with a stand-in apply."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import memtune.tune as tuning
from memtune.cli import app
from memtune.errors import VerificationFailed
from memtune.estimate import estimate
from memtune.strategies import plan_from_dict
from memtune.tune import space, verify

sys.path.insert(0, str(Path(__file__).parent))
from test_search import install_fakes, make_profile, opts  # noqa: E402

runner = CliRunner()


@pytest.fixture
def fake_strategies(monkeypatch):
    return install_fakes(monkeypatch)


@pytest.fixture
def prof_file(tmp_path):
    p = make_profile()
    path = tmp_path / "profile.json"
    p.save(path)
    return p, path


def test_tune_cli_writes_plan_with_provenance(tmp_path, prof_file, fake_strategies):
    p, path = prof_file
    budget = int(estimate(p).peak_bytes * 0.8)
    out = tmp_path / "plan.yaml"
    args = ["tune", str(path), "--budget", f"{budget}B", "-o", str(out), "--trials", "30", "--seed", "3"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "★" in r.stdout and "Pareto front" in r.stdout
    doc = yaml.safe_load(out.read_text())
    prov = doc["provenance"]
    assert prov["budget_bytes"] == budget and prov["profile_digest"] == p.digest()
    assert prov["predicted"]["peak_bytes"] <= budget and prov["measured"] is None
    assert prov["memtune_version"] and prov["torch_version"]
    assert (tmp_path / "plan.study.db").is_file()  # SQLite next to the output by default
    # the plan a person would apply has the lossy label in its header when lossy
    if prov["lossy"]:
        assert "LOSSY" in out.read_text().splitlines()[1]
    # an existing output is refused without --force; with it the study resumes
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "--force" in r.stderr
    r = runner.invoke(app, [*args, "--force", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["n_trials"] == 60 and data["new_trials"] == 30


def test_tune_cli_infeasible_budget(tmp_path, prof_file, fake_strategies):
    _, path = prof_file
    r = runner.invoke(app, ["tune", str(path), "--budget", "10MB", "-o", str(tmp_path / "p.yaml"), "--trials", "10"])
    assert r.exit_code == 1
    msg = " ".join(r.stderr.split())
    assert "smallest peak" in msg and "raise --budget" in msg and "Traceback" not in r.output
    assert not (tmp_path / "p.yaml").exists()


def test_tune_cli_warns_budget_above_gpu(tmp_path, prof_file, fake_strategies):
    _, path = prof_file  # the profile's GPU has 4 GB
    r = runner.invoke(app, ["tune", str(path), "--budget", "8GB", "-o", str(tmp_path / "p.yaml"), "--trials", "5"])
    assert r.exit_code == 0, r.output
    assert "above the GPU's memory" in " ".join(r.stderr.split())


def test_tune_cli_bad_input(tmp_path, prof_file):
    _, path = prof_file
    r = runner.invoke(app, ["tune", str(path), "--budget", "lots", "-o", str(tmp_path / "p.yaml")])
    assert r.exit_code == 1 and "bad size" in r.stderr
    r = runner.invoke(app, ["tune", str(path), "--budget", "1GB", "--batch-knob", "8,16", "-o", str(tmp_path / "p.yaml")])
    assert r.exit_code == 1 and "--batch-knob" in r.stderr
    r = runner.invoke(app, ["tune", str(tmp_path / "nope.json"), "--budget", "1GB", "-o", str(tmp_path / "p.yaml")])
    assert r.exit_code == 1 and "not found" in r.stderr


def test_verify_picks_on_measurements_and_survives_oom(monkeypatch, tmp_path, fake_strategies):
    """The best predicted plan runs out of memory for real: the next one wins, both recorded in the study."""
    p = make_profile()
    calls = []

    def fake_run(cmd, cwd=None, env=None, capture_output=True, text=True, timeout=None):
        plan_path, report = Path(cmd[cmd.index("apply") + 1]), Path(cmd[cmd.index("--report") + 1])
        calls.append(plan_path)
        if len(calls) == 1:
            return subprocess.CompletedProcess(cmd, 1, "", "torch.OutOfMemoryError: CUDA out of memory.")
        step = {2: 0.5, 3: 0.4}.get(len(calls), 0.6)  # the third plan, predicted slower, measures faster
        report.write_text(json.dumps({"step_s": step, "peak_allocated_bytes": 500 * 10**6, "failure": None}))
        return subprocess.CompletedProcess(cmd, 0, "ok", "")

    monkeypatch.setattr(verify.subprocess, "run", fake_run)
    storage = f"sqlite:///{tmp_path / 'v.db'}"
    res = tuning.tune(p, opts(budget_bytes=int(estimate(p).peak_bytes * 0.8), trials=30, verify=3, storage=storage,
                              study_name="v"))
    assert len(calls) >= 3  # the closed loop may verify more once the measurements correct the model
    assert [c.measured["status"] for c in res.verified][:3] == ["oom", "ok", "ok"]
    assert res.chosen.key == res.verified[2].key  # picked on measurements, not predictions
    assert res.plan.provenance["measured"]["status"] == "ok"
    assert res.plan.provenance["measured"]["peak_bytes"] == 500 * 10**6
    import optuna

    study = optuna.load_study(study_name="v", storage=storage)
    ver = [t for t in study.trials if t.user_attrs.get("memtune_kind") == "verify"]
    assert [t.user_attrs["measured"]["status"] for t in ver][:3] == ["oom", "ok", "ok"]
    assert ver[0].user_attrs["predicted_peak_bytes"] > 0


def test_verify_all_fail_is_an_error(monkeypatch, fake_strategies):
    p = make_profile()
    calls = []

    def oom(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "CUDA out of memory")

    monkeypatch.setattr(verify.subprocess, "run", oom)
    with pytest.raises(VerificationFailed, match=r"none of the \d verified plans.*raise --budget") as e:
        tuning.tune(p, opts(budget_bytes=int(estimate(p).peak_bytes * 0.8), trials=10, verify=2))
    assert "--margin" not in str(e.value)  # a larger margin is never the answer: the loop tried what was left
    assert 2 <= len(calls) <= 6  # the first k, then the plans the corrected model still admits


def _tight_budget(p):
    """Just above checkpointing every block: without 8-bit states only slower (recomputing) plans fit, so the
    fastest plan has them (under a budget with room to spare they buy nothing and are not proposed)."""
    return int(estimate(p, plan_from_dict({"checkpoint": {"blocks": "all"}})).peak_bytes * 1.04)


def test_closed_loop_corrects_a_systematic_under_prediction(monkeypatch, fake_strategies):
    """Every real run peaks 25% above its prediction: the first verified plans run over the budget, their
    measurements correct the model for their family (and the rest), and the loop goes on to a plan that the
    corrected model fits; it ends with a verified plan inside the budget, not with "raise --margin"."""
    p = make_profile()
    budget = _tight_budget(p)
    ran = []

    def fake_run(cmd, **kw):
        plan = plan_from_dict(yaml.safe_load(Path(cmd[cmd.index("apply") + 1]).read_text()))
        peak = estimate(p, plan).peak_bytes * 1.25
        ran.append(peak)
        Path(cmd[cmd.index("--report") + 1]).write_text(json.dumps({"step_s": 0.3, "peak_allocated_bytes": peak}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(verify.subprocess, "run", fake_run)
    res = tuning.tune(p, opts(budget_bytes=budget, trials=40, verify=1, margin=0.01))
    assert ran[0] > budget  # the best predicted plan, verified first, did not fit
    assert res.chosen.verified_ok and res.chosen.measured["peak_bytes"] <= budget
    assert len(res.verified) >= 2
    # the chosen plan's prediction is the corrected one
    assert res.chosen.peak_bytes == pytest.approx(res.chosen.raw_peak_bytes * 1.25, rel=1e-6)
    # the plan keeps the cost model's own prediction beside the corrected one
    prov = res.plan.provenance
    assert prov["model_predicted"]["peak_bytes"] == int(res.chosen.raw_peak_bytes)
    assert prov["predicted"]["peak_bytes"] == int(res.chosen.peak_bytes) > prov["model_predicted"]["peak_bytes"]


def test_a_verified_over_prediction_opens_the_larger_batches(monkeypatch, fake_strategies):
    """Every real run peaks at 60% of its prediction: once a plan is verified, the same plan at the knob's
    other batch sizes is evaluated under the corrected model, and a larger batch the raw model said would not
    fit is verified and chosen (the search alone never tried it in the 7B run that found this)."""
    p = make_profile()
    ran = []

    def fake_run(cmd, **kw):
        doc = yaml.safe_load(Path(cmd[cmd.index("apply") + 1]).read_text())
        bs = int(doc["run"]["knobs"]["--batch-size"])
        peak = estimate(p, plan_from_dict(doc), batch_size=bs).peak_bytes * 0.6
        ran.append(bs)
        Path(cmd[cmd.index("--report") + 1]).write_text(json.dumps({"step_s": 0.1 + 0.01 * bs, "peak_allocated_bytes": peak}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(verify.subprocess, "run", fake_run)
    values = [2, 4, 8, 16, 32]
    raw = {b: estimate(p, plan_from_dict({"checkpoint": {"blocks": "all"}}), batch_size=b).peak_bytes for b in values}
    budget = int(raw[8] * 1.02)  # the raw model fits batch 8 at most; at 60% of it batch 16 fits too
    assert raw[16] * 0.6 < budget * 0.97 < raw[16]
    res = tuning.tune(p, opts(budget_bytes=budget, trials=10, verify=1, batch_flag="--batch-size",
                              batch_values=values, lossless_only=True))
    assert res.chosen.verified_ok and res.chosen.batch_size > max(b for b in values if raw[b] <= budget)
    assert res.chosen.measured["peak_bytes"] <= budget and ran[0] <= 8


def test_verify_avoids_a_section_every_crashed_plan_had(monkeypatch, fake_strategies):
    """The script cannot run 8-bit states (a crash, not an OOM): after k crashes, a plan without them wins."""
    p = make_profile()
    ran = []

    def fake_run(cmd, **kw):
        plan = yaml.safe_load(Path(cmd[cmd.index("apply") + 1]).read_text())
        ran.append(plan)
        if "optimizer" in plan:
            return subprocess.CompletedProcess(cmd, 1, "", "ScriptError: the script cannot use this optimizer")
        Path(cmd[cmd.index("--report") + 1]).write_text(json.dumps({"step_s": 0.3, "peak_allocated_bytes": 1}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(verify.subprocess, "run", fake_run)
    res = tuning.tune(p, opts(budget_bytes=_tight_budget(p), trials=30, verify=1))
    assert len(ran) == 2 and "optimizer" in ran[0] and "optimizer" not in ran[1]
    assert "optimizer" not in res.plan.sections and res.plan.provenance["measured"]["status"] == "ok"


def test_tune_subprocess_help():
    r = subprocess.run([sys.executable, "-m", "memtune", "tune", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--budget" in r.stdout and "--lossless-only" in r.stdout


def test_verify_picks_plans_of_different_kinds(monkeypatch, fake_strategies):
    """The cost model's errors are shared within a kind of plan, so the k verified plans differ in kind."""
    p = make_profile()
    ran = []

    def fake_run(cmd, **kw):
        plan = yaml.safe_load(Path(cmd[cmd.index("apply") + 1]).read_text())
        ran.append(space.plan_family(plan_from_dict(plan)))
        Path(cmd[cmd.index("--report") + 1]).write_text(json.dumps({"step_s": 0.3, "peak_allocated_bytes": 1}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(verify.subprocess, "run", fake_run)
    tuning.tune(p, opts(budget_bytes=int(estimate(p).peak_bytes * 0.8), trials=30, verify=3))
    assert len(ran) == 3 and len(set(ran)) == 3


# --- benchmarks/tune.py's helpers (the GPU benchmark itself runs on a GPU) --------------------------------


@pytest.fixture(scope="module")
def bench():
    from conftest import load_benchmark

    return load_benchmark("tune")


def test_bench_reduced_space_restricts_and_restores(bench):
    import memtune.strategies as strategies
    from memtune.strategies.base import SearchOptions
    from memtune.strategies.layout import propose

    before = strategies.strategy_names()
    p = make_profile(n=8)
    p.extra["clip_grad_norm"] = 1.0  # a clipping script: no update-in-backward
    with bench.reduced_space():
        assert set(strategies.strategy_names()) == {"checkpoint", "optimizer", "offload"}
        fixed = {"blocks.recompute": 3, "optimizer.name": "adamw8bit", "offload.optimizer_state": True}
        t = space.ProbeTrial(fixed)
        layout = propose(t, p, SearchOptions(device="cuda"))
        secs = {s.name: s.space(t, p, layout, SearchOptions(device="cuda")) for s in strategies.all_strategies()}
        assert secs["checkpoint"] == {"blocks": ["5-7"], "mode": "full"}
        assert secs["optimizer"] == {"name": "adamw8bit"}
        assert secs["offload"] == {"activations": [], "optimizer_state": True}
        lossless = space.ProbeTrial({"optimizer.name": "adamw8bit"})
        assert strategies.get_strategy("optimizer").space(lossless, p, None,
                                                          SearchOptions(device="cuda", lossless_only=True)) is None
        assert lossless.distributions["optimizer.name"].choices == ("adamw",)
    assert strategies.strategy_names() == before


def test_bench_sweep_order_keys_and_summary(bench):
    w = dict(bench.WORKLOADS["llama1b"], budgets=[20 * bench.GiB, 32 * bench.GiB])
    ck_all = {"checkpoint": {"blocks": "all", "mode": "full"}}
    tuned = [{"family": "tuned 32 GiB", "plan": ck_all, "batch": 16, "tuned": True, "key": bench.plan_key(ck_all)},
             {"family": "tuned 20 GiB", "plan": {**ck_all, **bench.OFFLOAD_STATE}, "batch": 8, "tuned": True,
              "key": bench.plan_key({**bench.OFFLOAD_STATE, **ck_all})}]
    cfgs = bench.sweep_configs(w, True, tuned)
    assert cfgs[0].get("unpatched") and cfgs[0]["batch"] == 4 and cfgs[0]["plan"] is None  # tuned plans are grid points
    assert cfgs[1]["family"] == "adamw, checkpoint all" and cfgs[4].get("last_of_twin")
    assert [c["k"] for c in cfgs[1:]] == sorted((c["k"] for c in cfgs[1:]), reverse=True)
    assert len(cfgs) == 1 + 9 * 4 - 1

    def pt(c, sps, peak):
        return dict(c, status="ok", samples_per_s=sps, peak_bytes=peak * bench.GiB, spread=0.02)

    by = {(c["family"], c["batch"]): c for c in cfgs}
    sweep = [pt(cfgs[0], 17.7, 35.4), pt(by["adamw, checkpoint all", 16], 17.3, 30.4),
             pt(by["adamw8bit, checkpoint all", 16], 18.0, 19.0), pt(by["adamw + state offload, checkpoint all", 8], 9.0, 13.0),
             dict(family="manual: HF gradient checkpointing", manual=True, batch=16, status="ok", samples_per_s=17.2,
                  peak_bytes=30.4 * bench.GiB, spread=0.01)]
    res = {"sweep": sweep, "tunes": [
        {"budget_bytes": 20 * bench.GiB, "budget": "20 GiB", "status": "ok", "key": tuned[1]["key"], "batch": 8,
         "plan": "offload", "lossy_allowed": False},
        {"budget_bytes": 32 * bench.GiB, "budget": "32 GiB", "status": "ok", "key": tuned[0]["key"], "batch": 16,
         "plan": "ck all", "lossy_allowed": False}]}
    rows = bench.summarize(res, w)
    r20, r32 = rows
    assert r20["best_grid"]["samples_per_s"] == 9.0 and r20["best_any"]["samples_per_s"] == 18.0  # lossy not compared
    assert r20["ratio_vs_best"] == pytest.approx(1.0) and r20["manual"] is None
    assert r32["ratio_vs_best"] == pytest.approx(1.0)  # the lossy 8-bit point is not in a lossless tune's space
    assert r32["speedup_vs_manual"] == pytest.approx(17.3 / 17.2) and r32["within_budget"]
    assert "none fits" in bench.markdown([{"workload": "llama1b", "summary": rows}])
