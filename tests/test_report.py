"""`memtune report`: HTML that parses, embedded PNGs that are real images, CSV columns as documented,
one-line errors for bad inputs. Hand-built profiles and studies keep this fast (a few seconds on 2 cores)."""

import base64
import json
import pickle
import random
import re
import struct
import subprocess
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memtune.cli import app
from memtune.plan import SectionConfig
from memtune.profile import BlockProfile, Hardware, OptimizerProfile, Peak, Profile
from memtune.report import CSV_COLUMNS, pareto_mask, snapshot_timeline
from memtune.strategies.base import _REGISTRY, Strategy

pytest.importorskip("matplotlib")
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def make_profile(n_layers: int = 4, gpu: bool = True) -> Profile:
    blocks = [BlockProfile(name="tok_emb", cls="Embedding", kind="other", index=0, fwd_s=1e-4, bwd_s=2e-4,
                           activation_bytes=0, param_bytes={"float32": 8 * MiB}, trainable_param_bytes=8 * MiB)]
    for i in range(n_layers):
        blocks.append(BlockProfile(
            name=f"blocks.{i}", cls="Block", index=i + 1, param_bytes={"float32": 12 * MiB},
            trainable_param_bytes=12 * MiB, activation_bytes=(40 + i) * MiB, input_bytes=4 * MiB,
            output_bytes=4 * MiB, transient_bytes=8 * MiB, bwd_transient_bytes=10 * MiB, fwd_s=3e-3, bwd_s=6e-3))
    blocks.append(BlockProfile(name="lm_head", cls="Linear", kind="other", index=n_layers + 1, fwd_s=2e-3, bwd_s=4e-3,
                               activation_bytes=60 * MiB, input_bytes=4 * MiB, param_bytes={"float32": 8 * MiB},
                               trainable_param_bytes=8 * MiB))
    params = sum(sum(b.param_bytes.values()) for b in blocks)
    return Profile(
        script="examples/gpt.py", argv=["--steps", "3"], torch_version="2.13", model_cls="GPT", blocks=blocks,
        device="cuda" if gpu else "cpu",
        hardware=Hardware(device="cuda", gpu_name="NVIDIA H100 80GB HBM3", gpu_total_bytes=80 * 2**30,
                          h2d_gbps=25, d2h_gbps=25) if gpu else Hardware(),
        optimizers=[OptimizerProfile(cls="torch.optim.adamw.AdamW", kind="adamw", param_bytes=params,
                                     state_bytes=2 * params, step_s=2e-3)],
        param_bytes=params, trainable_param_bytes=params, grad_bytes=params, optimizer_state_bytes=2 * params,
        step_start_bytes=3 * params, peak=Peak(allocated_bytes=int(3.2 * params + 280 * MiB), phase="backward",
                                               measured=gpu),
        step_s=0.06, fwd_s=0.015, bwd_s=0.03, optimizer_s=2e-3, batch_size=8, seq_len=256, steps=3,
    )


@dataclass(frozen=True)
class _CkptConfig(SectionConfig):
    blocks: tuple = ()


class _Ckpt(Strategy):
    """A test-only checkpoint section: `{blocks: [i, ...]}` recomputes those repeated blocks."""

    name = "test_ckpt"
    order = 50

    def validate(self, section):
        return _CkptConfig(tuple(section["blocks"]))

    def effect(self, profile, config, sim):
        rep = [b for b in sim.blocks if b.kind == "repeated"]
        for i in config.blocks:
            b = rep[i]
            b.mode, b.kept_bytes = "recompute", b.input_bytes
            b.bwd_extra_bytes, b.recompute_s = b.act_bytes, b.fwd_s


@pytest.fixture
def test_strategy(monkeypatch):
    monkeypatch.setitem(_REGISTRY, "test_ckpt", _Ckpt())


@pytest.fixture
def profile_path(tmp_path) -> Path:
    return make_profile().save(tmp_path / "profile.json")


@pytest.fixture(scope="module")
def gpt_profile(tmp_path_factory) -> Path:
    """A real profile of the bundled GPT, shrunk so it takes a second or two in-process."""
    runner_mod = pytest.importorskip("memtune.profilers.runner")
    out = tmp_path_factory.mktemp("gpt") / "profile.json"
    runner_mod.profile_script(str(ROOT / "examples" / "gpt.py"), argv=[
        "--layers", "2", "--width", "32", "--heads", "2", "--seq-len", "16", "--batch-size", "2", "--vocab", "64"],
        steps=3, warmup=0, output=out, measure_hardware=False)
    return out


def make_study(path: Path, name: str = "memtune-test", failed: bool = False) -> str:
    """A study shaped as memtune/tune writes it: search trials + two verification trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{path}"
    study = optuna.create_study(storage=url, study_name=name, direction="maximize")
    budget = 1.5 * 2**30
    study.set_user_attr("budget_bytes", budget)
    study.set_user_attr("limit_bytes", budget * 0.95)
    for i in range(14):
        peak = (0.8 + 0.1 * i) * 2**30
        thr = 100 + 12 * i - 0.6 * i * i + (7 if i % 3 == 0 else 0)
        attrs = {"memtune_kind": "search", "memtune_constraint": [(peak - budget * 0.95) / 2**30],
                 "predicted_peak_bytes": peak, "predicted_step_s": 8 / thr, "predicted_throughput": thr,
                 "unit": "samples/s", "lossy": ["compress"] if i == 5 else [], "plan": f"checkpoint 0-{i}",
                 "plan_key": f"k{i}", "batch_size": 8}
        study.add_trial(optuna.trial.create_trial(value=thr, user_attrs=attrs))
    # a repeat of plan k3 (the sampler proposes plans again): left out of the table
    study.add_trial(optuna.trial.create_trial(value=1.0, user_attrs={"memtune_kind": "search", "plan_key": "k3",
                                                                      "predicted_peak_bytes": 1.0,
                                                                      "predicted_throughput": 1.0}))
    for of, peak_m, step_m in ((6, 1.45 * 2**30, 8 / 150), (4, 1.18 * 2**30, 8 / 140)):
        ua = study.trials[of].user_attrs
        m = ({"status": "failed", "detail": "exit 1"} if failed else
             {"status": "ok", "peak_bytes": peak_m, "step_s": step_m, "throughput": 8 / step_m})
        study.add_trial(optuna.trial.create_trial(value=8 / step_m, user_attrs={
            "memtune_kind": "verify", "of_trial": of, "plan_key": ua["plan_key"], "plan": ua["plan"],
            "predicted_peak_bytes": ua["predicted_peak_bytes"], "predicted_step_s": ua["predicted_step_s"],
            "predicted_throughput": ua["predicted_throughput"], "unit": "samples/s", "measured": m}))
    return url


class _Html(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.tags: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for k in ("src", "href"):
            if a.get(k) and not a[k].startswith("data:"):
                self.external.append(a[k])


def check_png(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    assert w >= 400 and h >= 200
    assert len(data) > 10_000  # a real plot, not an empty canvas
    assert data.endswith(b"IEND\xaeB`\x82")
    return w, h


def check_html(path: Path, n_images: int) -> str:
    text = path.read_text()
    p = _Html()
    p.feed(text)
    p.close()
    assert p.tags[:1] == ["html"] and "body" in p.tags
    assert p.external == []  # self-contained: opens offline
    assert len(p.imgs) == n_images
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        check_png(base64.b64decode(src.split(",", 1)[1]))
    return text


def documented_columns() -> dict[str, list[str]]:
    """docs/report.md: the first-column `names` of the table under each `### NAME.csv` heading."""
    out: dict[str, list[str]] = {}
    current = None
    for line in (ROOT / "docs" / "report.md").read_text().splitlines():
        m = re.match(r"^### (\w+)\.csv", line)
        if m:
            current = out.setdefault(m.group(1), [])
        elif current is not None and (m := re.match(r"^\| `(\w+)` \|", line)):
            current.append(m.group(1))
    return out


def check_csvs(csv_dir: Path, names: set[str]) -> dict:
    import pandas as pd

    assert {p.stem for p in csv_dir.glob("*.csv")} == names
    docs = documented_columns()
    out = {}
    for n in names:
        df = pd.read_csv(csv_dir / f"{n}.csv")
        assert list(df.columns) == CSV_COLUMNS[n] == docs[n]
        assert len(df) > 0
        out[n] = df
    return out


def test_columns_documented():
    assert documented_columns() == CSV_COLUMNS


def test_profile_report(tmp_path, profile_path):
    out = tmp_path / "r.html"
    r = runner.invoke(app, ["report", str(profile_path), "-o", str(out), "--png", str(tmp_path / "png"),
                            "--csv", str(tmp_path / "csv")])
    assert r.exit_code == 0, r.output
    text = check_html(out, 3)
    assert "Memory by component" in text and "NVIDIA H100" in text
    for f in ("memory", "blocks", "timeline"):
        check_png((tmp_path / "png" / f"{f}.png").read_bytes())
    t = check_csvs(tmp_path / "csv", {"memory", "blocks", "timeline"})
    assert set(t["memory"]["component"]) >= {"parameters", "optimizer state", "activations"}
    assert t["memory"]["plan_bytes"].isna().all()
    assert t["blocks"]["block"].tolist()[:2] == ["tok_emb", "blocks.0"]
    assert t["blocks"]["activation_bytes"].iloc[1] == 40 * MiB
    sim = t["timeline"][t["timeline"]["series"] == "simulated baseline"]
    assert sim["t_s"].is_monotonic_increasing and sim["event"].iloc[-1] == "end"
    # the simulated step lasts the blocks' forward + backward + optimizer (and glue), in seconds
    assert 0.04 < sim["t_s"].iloc[-1] < 0.2


def test_real_profile_of_bundled_gpt(tmp_path, gpt_profile):
    r = runner.invoke(app, ["report", str(gpt_profile), "-o", str(tmp_path / "r.html"), "--csv", str(tmp_path / "csv")])
    assert r.exit_code == 0, r.output
    check_html(tmp_path / "r.html", 3)
    t = check_csvs(tmp_path / "csv", {"memory", "blocks", "timeline"})
    blocks = t["blocks"]
    assert (blocks["kind"] == "repeated").sum() == 2
    assert (blocks.loc[blocks["kind"] == "repeated", "activation_bytes"] > 0).all()


def test_real_plan_with_checkpoint(tmp_path, gpt_profile):
    from memtune.strategies import strategy_names

    if "checkpoint" not in strategy_names():
        pytest.skip("checkpoint strategy not registered")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"checkpoint: {{blocks: all}}\nprovenance: {{profile: {gpt_profile}}}\n")
    r = runner.invoke(app, ["report", str(plan), "-o", str(tmp_path / "r.html"), "--csv", str(tmp_path / "csv")])
    assert r.exit_code == 0, r.output
    check_html(tmp_path / "r.html", 3)
    b = check_csvs(tmp_path / "csv", {"memory", "blocks", "timeline"})["blocks"]
    assert set(b.loc[b["kind"] == "repeated", "plan_choice"]) <= {"recompute", "selective"}


def test_plan_report_marks_choices(tmp_path, profile_path, test_strategy):
    plan = tmp_path / "plan.yaml"
    plan.write_text("memtune_plan: 1\ntest_ckpt: {blocks: [0, 2]}\nprovenance: {profile: profile.json, budget: 1GiB}\n")
    r = runner.invoke(app, ["report", str(plan), "-o", str(tmp_path / "r.html"), "--csv", str(tmp_path / "csv")])
    assert r.exit_code == 0, r.output
    text = check_html(tmp_path / "r.html", 3)
    assert "budget" in text
    t = check_csvs(tmp_path / "csv", {"memory", "blocks", "timeline"})
    b = t["blocks"].set_index("block")
    assert b.loc["blocks.0", "plan_choice"] == "recompute" and b.loc["blocks.1", "plan_choice"] == "keep"
    assert b.loc["blocks.2", "plan_kept_bytes"] == 4 * MiB
    mem = t["memory"].set_index("component")
    assert mem.loc["activations", "plan_bytes"] < mem.loc["activations", "baseline_bytes"]
    assert set(t["timeline"]["series"]) == {"simulated baseline", "simulated plan"}


def test_study_report(tmp_path, profile_path):
    make_study(tmp_path / "study.db")
    r = runner.invoke(app, ["report", str(tmp_path / "study.db"), "-o", str(tmp_path / "r.html"),
                            "--profile", str(profile_path), "--csv", str(tmp_path / "csv"), "--png",
                            str(tmp_path / "png")])
    assert r.exit_code == 0, r.output
    check_html(tmp_path / "r.html", 5)
    assert {p.stem for p in (tmp_path / "png").glob("*.png")} == {"memory", "blocks", "timeline", "pareto", "verified"}
    t = check_csvs(tmp_path / "csv", {"memory", "blocks", "timeline", "trials"})["trials"]
    assert len(t) == 14  # the repeat of a plan is left out
    assert t["chosen"].sum() == 1
    # chosen as `memtune tune --verify` chooses: best measured throughput among plans that ran
    assert t.loc[t["chosen"], "trial"].item() == 6
    assert t["verify_status"].eq("ok").sum() == 2
    front = t[t["pareto"]].sort_values("predicted_peak_bytes")
    assert front["predicted_throughput"].is_monotonic_increasing
    assert t.loc[~t["feasible"], "predicted_peak_bytes"].min() > 1.5 * 2**30 * 0.95


def test_study_without_profile_and_plan_with_study(tmp_path, profile_path, test_strategy):
    make_study(tmp_path / "study.db")
    r = runner.invoke(app, ["report", str(tmp_path / "study.db"), "-o", str(tmp_path / "s.html")])
    assert r.exit_code == 0, r.output
    check_html(tmp_path / "s.html", 2)
    assert "--profile" in r.output  # says how to add the memory sections
    plan = tmp_path / "plan.yaml"
    plan.write_text("test_ckpt: {blocks: [1]}\nprovenance: {profile: profile.json, budget_bytes: 1610612736, "
                    "study: {name: memtune-test, storage: study.db, trial: 4}}\n")
    r = runner.invoke(app, ["report", str(plan), "-o", str(tmp_path / "p.html"), "--csv", str(tmp_path / "csv")])
    assert r.exit_code == 0, r.output
    check_html(tmp_path / "p.html", 5)
    import pandas as pd

    t = pd.read_csv(tmp_path / "csv" / "trials.csv")
    assert t.loc[t["chosen"], "trial"].tolist() == [4]  # the plan's own trial, not the study's best


def test_allocator_timeline(tmp_path):
    prof = make_profile()
    # a torch.cuda.memory._snapshot() shape: 100 MiB live before recording, +50 +30 -50 during it
    snap = {"segments": [{"device": 0, "blocks": [{"size": 100 * MiB, "state": "active_allocated"},
                                                  {"size": 30 * MiB, "state": "active_allocated"},
                                                  {"size": 70 * MiB, "state": "inactive"}]}],
            "device_traces": [[{"action": "alloc", "addr": 1, "size": 50 * MiB, "time_us": 1000},
                               {"action": "alloc", "addr": 2, "size": 30 * MiB, "time_us": 3000},
                               {"action": "free_requested", "addr": 1, "size": 50 * MiB, "time_us": 4000},
                               {"action": "free_completed", "addr": 1, "size": 50 * MiB, "time_us": 4000}]]}
    assert snapshot_timeline(snap) == [(0.0, 100 * MiB), (0.0, 150 * MiB), (0.002, 180 * MiB), (0.003, 130 * MiB)]
    with open(tmp_path / "snap.pickle", "wb") as f:
        pickle.dump(snap, f)
    prof.extra["memory_timeline"] = "snap.pickle"  # relative to the profile's folder
    prof.save(tmp_path / "p.json")
    r = runner.invoke(app, ["report", str(tmp_path / "p.json"), "-o", str(tmp_path / "r.html"), "--csv",
                            str(tmp_path / "csv")])
    assert r.exit_code == 0, r.output
    t = check_csvs(tmp_path / "csv", {"memory", "blocks", "timeline"})["timeline"]
    assert (t["series"] == "allocator (measured)").sum() == 4

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "snap.pickle", "wb") as f:
        pickle.dump(Evil(), f)
    r = runner.invoke(app, ["report", str(tmp_path / "p.json"), "-o", str(tmp_path / "r2.html")])
    assert r.exit_code == 0 and "pwned" not in r.output
    assert "could not be read" in r.output


def test_pareto_mask():
    assert pareto_mask([1, 2, 3, 2], [10, 20, 15, 20]) == [True, True, False, True]
    rng = random.Random(0)
    for _ in range(300):  # the sweep against the definition, with many ties
        n = rng.randint(0, 10)
        pk = [rng.randint(0, 4) for _ in range(n)]
        th = [rng.randint(0, 4) for _ in range(n)]
        pts = list(zip(pk, th, strict=True))
        brute = [not any(p2 <= p and t2 >= t and (p2 < p or t2 > t) for j, (p2, t2) in enumerate(pts) if j != i)
                 for i, (p, t) in enumerate(pts)]
        assert pareto_mask(pk, th) == brute, (pk, th)


def _one_line_error(r, *needles):
    assert r.exit_code == 1, r.output
    err = r.stderr
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize("make, needle", [
    (lambda d: d / "missing.json", "not found"),
    (lambda d: d, "is a directory"),
    (lambda d: (d / "x.txt").write_text("hello world") and d / "x.txt", "neither a memtune profile"),
    (lambda d: (d / "x.json").write_text('{"a": 1}') and d / "x.json", "not a memtune profile"),
    (lambda d: (d / "x.json").write_text("{bad") and d / "x.json", "not valid JSON"),
    (lambda d: (d / "p.yaml").write_text("nosuch: {}\n") and d / "p.yaml", "unknown section 'nosuch'"),
    (lambda d: (d / "p.yaml").write_text("memtune_plan: 1\n") and d / "p.yaml", "--profile"),
])
def test_bad_inputs(tmp_path, make, needle):
    src = make(tmp_path)
    r = runner.invoke(app, ["report", str(src), "-o", str(tmp_path / "out.html")])
    _one_line_error(r, needle)
    assert not (tmp_path / "out.html").exists()


def test_sqlite_that_is_not_a_study(tmp_path):
    import sqlite3

    con = sqlite3.connect(tmp_path / "x.db")
    con.execute("create table t (a int)")
    con.commit()
    con.close()
    _one_line_error(runner.invoke(app, ["report", str(tmp_path / "x.db"), "-o", str(tmp_path / "o.html")]),
                    "not an Optuna study")


def test_no_silent_overwrite(tmp_path, profile_path):
    out = tmp_path / "r.html"
    out.write_text("mine")
    _one_line_error(runner.invoke(app, ["report", str(profile_path), "-o", str(out)]), "--force")
    assert out.read_text() == "mine"
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "blocks.csv").write_text("mine")
    r = runner.invoke(app, ["report", str(profile_path), "-o", str(tmp_path / "r2.html"), "--csv", str(tmp_path / "csv")])
    _one_line_error(r, "blocks.csv exists")
    assert not (tmp_path / "r2.html").exists() and not (tmp_path / "csv" / "memory.csv").exists()
    r = runner.invoke(app, ["report", str(profile_path), "-o", str(out), "--csv", str(tmp_path / "csv"), "--force",
                            "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["sections"] == ["memory", "blocks", "timeline"]
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_missing_matplotlib_names_the_extra(tmp_path, profile_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = runner.invoke(app, ["report", str(profile_path), "-o", str(tmp_path / "r.html")])
    _one_line_error(r, "pip install 'memtune[report]'")


def test_subprocess(tmp_path, profile_path):
    r = subprocess.run([sys.executable, "-m", "memtune", "report", str(profile_path), "-o", str(tmp_path / "r.html")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    check_html(tmp_path / "r.html", 3)


def test_empty_profile_and_storage_url(tmp_path):
    Profile().save(tmp_path / "empty.json")
    r = runner.invoke(app, ["report", str(tmp_path / "empty.json"), "-o", str(tmp_path / "e.html")])
    assert r.exit_code == 0, r.output
    assert "no memory measurements" in r.output
    check_html(tmp_path / "e.html", 0)
    url = make_study(tmp_path / "two.db", name="a")
    r = runner.invoke(app, ["report", url, "-o", str(tmp_path / "s.html")])  # a storage URL works as well
    assert r.exit_code == 0, r.output
    check_html(tmp_path / "s.html", 2)
    make_study(tmp_path / "two.db", name="b")
    _one_line_error(runner.invoke(app, ["report", url, "-o", str(tmp_path / "t.html")]), "--study NAME")
    _one_line_error(runner.invoke(app, ["report", url, "--study", "c", "-o", str(tmp_path / "t.html")]),
                    "no study 'c'")
    r = runner.invoke(app, ["report", url, "--study", "b", "-o", str(tmp_path / "t.html")])
    assert r.exit_code == 0, r.output


def test_study_whose_verifications_all_failed(tmp_path):
    make_study(tmp_path / "s.db", failed=True)
    r = runner.invoke(app, ["report", str(tmp_path / "s.db"), "-o", str(tmp_path / "r.html"), "--csv",
                            str(tmp_path / "csv")])
    assert r.exit_code == 0, r.output
    check_html(tmp_path / "r.html", 1)  # the Pareto chart; nothing measured to put against predictions
    assert "no chosen plan" in r.output
    t = check_csvs(tmp_path / "csv", {"trials"})["trials"]
    assert not t["chosen"].any() and t["verify_status"].eq("failed").sum() == 2
