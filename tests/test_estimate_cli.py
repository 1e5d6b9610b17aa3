"""`memtune estimate` through typer's CliRunner and a real subprocess, on a hand-built profile file."""

import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
from test_costmodel import MB, checkpoint, make_profile
from typer.testing import CliRunner

from memtune.cli import app
from memtune.plan import SectionConfig
from memtune.strategies import base as sbase

runner = CliRunner()


@pytest.fixture
def profile_file(tmp_path):
    path = tmp_path / "profile.json"
    make_profile(measured_peak=1_000 * MB).save(path)
    return path


@dataclass(frozen=True)
class _CkptConfig(SectionConfig):
    changes_numbers: bool = False

    @property
    def lossy(self):
        return self.changes_numbers

    def describe(self):
        return "recompute every block"


class _Ckpt(sbase.Strategy):
    name = "zz_ckpt_test"
    order = 50

    def validate(self, section):
        return _CkptConfig(bool(dict(section or {}).get("lossy")))

    def effect(self, profile, config, sim):
        checkpoint(sim, {b.name for b in sim.blocks if b.kind == "repeated"})


@pytest.fixture
def fake_ckpt(monkeypatch):
    monkeypatch.setitem(sbase._REGISTRY, _Ckpt.name, _Ckpt())


def test_baseline_table_explains_the_measured_peak(profile_file):
    r = runner.invoke(app, ["estimate", str(profile_file)])
    assert r.exit_code == 0, r.output
    assert "baseline (no plan)" in r.stdout
    assert "peak 954 MiB during loss" in r.stdout  # 1000 MB measured, reproduced
    assert "allocator overhead" in r.stdout
    assert "calibrated once on the measured baseline peak" in r.stdout and "(constant)" in r.stdout
    d = json.loads(runner.invoke(app, ["estimate", str(profile_file), "--json"]).stdout)
    assert d["calibration"][1] == pytest.approx(d["estimate"]["breakdown"]["allocator overhead"])
    assert "samples/s" in r.stdout


def test_json_and_budget_verdict(profile_file):
    r = runner.invoke(app, ["estimate", str(profile_file), "--budget", "900MB", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["estimate"]["peak_bytes"] == pytest.approx(1_000 * MB)
    assert d["fits"] is False
    assert d["margin"] == pytest.approx(-100 * MB)
    assert 0 < d["max_batch"] < 8
    r = runner.invoke(app, ["estimate", str(profile_file), "--budget", "2GB"])
    assert "fits" in r.stdout and "to spare" in r.stdout
    r = runner.invoke(app, ["estimate", str(profile_file), "--budget", "900MB"])
    assert "does not fit" in r.stdout and "over by 95.4 MiB" in r.stdout


def test_batch_size_option_scales(profile_file):
    a = json.loads(runner.invoke(app, ["estimate", str(profile_file), "--json"]).stdout)
    b = json.loads(runner.invoke(app, ["estimate", str(profile_file), "--batch-size", "16", "--json"]).stdout)
    assert b["batch_size"] == 16
    assert b["estimate"]["peak_bytes"] > a["estimate"]["peak_bytes"]


def test_profile2_fits_batch_through_both(profile_file, tmp_path):
    p2 = tmp_path / "p16.json"
    make_profile(batch=16, act=180 * MB, measured_peak=1_400 * MB).save(p2)
    r = runner.invoke(app, ["estimate", str(profile_file), "--profile2", str(p2), "--batch-size", "16", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["estimate"]["peak_bytes"] == pytest.approx(1_400 * MB)


def test_plan_with_lossy_section_is_labelled(profile_file, tmp_path, fake_ckpt):
    plan = tmp_path / "plan.yaml"
    plan.write_text("zz_ckpt_test: {lossy: true}\n")
    r = runner.invoke(app, ["estimate", str(profile_file), "--plan", str(plan)])
    assert r.exit_code == 0, r.output
    assert "recompute every block" in r.stdout
    assert "LOSSY" in r.stdout
    d = json.loads(runner.invoke(app, ["estimate", str(profile_file), "-p", str(plan), "--json"]).stdout)
    assert d["estimate"]["lossy"] == ["zz_ckpt_test"]
    assert d["estimate"]["peak_bytes"] < 1_000 * MB
    assert d["estimate"]["time_breakdown"]["recompute"] > 0


@pytest.mark.parametrize("args, words", [
    (["--budget", "16 parsecs"], ["bad size '16 parsecs'", "GiB"]),
    (["--plan", "nope.yaml"], ["plan nope.yaml not found"]),
    (["--batch-size", "0"], ["batch size 0"]),
])
def test_bad_input_is_one_line(profile_file, args, words):
    r = runner.invoke(app, ["estimate", str(profile_file), *args])
    assert r.exit_code == 1
    assert "Traceback" not in r.output
    for w in words:
        assert w in r.output


def test_bad_plan_section_names_allowed(profile_file, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("chekpoint: {blocks: all}\n")
    r = runner.invoke(app, ["estimate", str(profile_file), "--plan", str(plan)])
    assert r.exit_code == 1
    assert "unknown section 'chekpoint'" in r.output and "allowed:" in r.output


def test_missing_or_bad_profile(tmp_path):
    r = runner.invoke(app, ["estimate", str(tmp_path / "none.json")])
    assert r.exit_code == 1 and "not found" in r.output
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    r = runner.invoke(app, ["estimate", str(bad)])
    assert r.exit_code == 1 and "not a memtune profile" in r.output


def test_subprocess(profile_file):
    r = subprocess.run([sys.executable, "-m", "memtune", "estimate", str(profile_file), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["estimate"]["peak_phase"] == "loss"
    r = subprocess.run([sys.executable, "-m", "memtune", "estimate", str(profile_file), "--budget", "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "bad size 'x'" in r.stderr
