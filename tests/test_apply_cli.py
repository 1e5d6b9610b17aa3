"""`memtune apply`: through CliRunner and a real subprocess, on the bundled GPT example (CPU, tiny)."""

import json
import subprocess
import sys

import torch
from typer.testing import CliRunner

from memtune.cli import app

runner = CliRunner()
TINY = ["--layers", "2", "--width", "32", "--heads", "4", "--seq-len", "16", "--vocab", "64", "--batch-size", "2",
        "--steps", "3"]


def write_plan(tmp_path, body, examples_dir, argv=TINY):
    p = tmp_path / "plan.yaml"
    p.write_text(f"run: {{script: {examples_dir / 'gpt.py'}, argv: {json.dumps(argv)}}}\n" + body)
    return p


def test_apply_runs_plan_and_writes_report(tmp_path, examples_dir):
    plan = write_plan(tmp_path, "checkpoint: {blocks: all}\n", examples_dir)
    rep = tmp_path / "apply.json"
    r = runner.invoke(app, ["apply", str(plan), "--report", str(rep)])
    assert r.exit_code == 0, r.output
    assert "full checkpointing on 2 block(s)" in r.output
    assert "step time" in r.output
    d = json.loads(rep.read_text())
    assert d["steps"] == 3 and d["step_s"] > 0 and d["notes"][0]["strategy"] == "checkpoint"
    r2 = runner.invoke(app, ["apply", str(plan), "--report", str(rep)])
    assert r2.exit_code == 1 and "--force" in r2.output  # never overwrites silently


def test_apply_steps_knobs_and_script_argument(tmp_path, examples_dir):
    plan = tmp_path / "plan.yaml"
    plan.write_text("run: {knobs: {--batch-size: 3}}\ncheckpoint: {blocks: [0], mode: selective}\n")
    r = runner.invoke(app, ["apply", str(plan), str(examples_dir / "gpt.py"), "--steps", "2", "--json", "--", *TINY])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout[r.stdout.index("{"):])
    assert d["steps"] == 2 and d["stopped"] is True
    assert d["argv"][d["argv"].index("--batch-size") + 1] == "3"


def test_bad_plan_is_one_line_error(tmp_path, examples_dir):
    plan = write_plan(tmp_path, "checkpoint: {blocks: all, mode: sometimes}\n", examples_dir)
    r = runner.invoke(app, ["apply", str(plan)])
    assert r.exit_code == 1
    assert "'sometimes' is not allowed; choose one of: full, selective" in r.output
    assert "Traceback" not in r.output


def test_offload_without_gpu_refused_before_script(tmp_path, examples_dir):
    if torch.cuda.is_available():
        return
    plan = write_plan(tmp_path, "offload: {optimizer_state: true}\n", examples_dir)
    r = runner.invoke(app, ["apply", str(plan)])
    assert r.exit_code == 1 and "offload needs a CUDA GPU" in r.output
    assert "parameters on" not in r.output  # the script never started


def test_contradictory_plan_refused(tmp_path, examples_dir):
    plan = write_plan(tmp_path, "checkpoint: {blocks: [0]}\noffload: {activations: [0]}\n", examples_dir)
    r = runner.invoke(app, ["apply", str(plan)])
    assert r.exit_code == 1 and "given two modes" in r.output


def test_script_failure_reported_as_theirs(tmp_path, examples_dir):
    plan = write_plan(tmp_path, "checkpoint: {blocks: all}\n", examples_dir, argv=[*TINY, "--heads", "5"])
    rep = tmp_path / "r.json"
    r = runner.invoke(app, ["apply", str(plan), "--report", str(rep)])
    assert r.exit_code == 1 and "the script failed under the plan" in r.output
    assert json.loads(rep.read_text())["failure"]["exc_type"]


def test_real_subprocess(tmp_path, examples_dir):
    plan = write_plan(tmp_path, "checkpoint: {blocks: all}\n", examples_dir)
    out = subprocess.run([sys.executable, "-m", "memtune", "apply", str(plan), "--steps", "2", "--json"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["steps"] == 2 and d["notes"][0]["strategy"] == "checkpoint"


def test_plan_not_matching_the_model_stops_script_with_one_line(tmp_path, examples_dir):
    plan = write_plan(tmp_path, "checkpoint: {blocks: [7]}\n", examples_dir)  # the tiny GPT has 2 blocks
    r = runner.invoke(app, ["apply", str(plan)])
    assert r.exit_code == 1 and "block 7 is out of range" in r.output
    assert "step    0" not in r.output  # stopped before the first step


def test_a_model_moved_after_its_optimizer_is_patched_at_its_first_forward(monkeypatch, tmp_path):
    """accelerate's prepare and Lightning move the model after its optimizer is built: on a GPU machine the
    plan is applied when the model first runs, where it runs (CPU stand-in: CUDA said available)."""
    import textwrap

    import torch

    from memtune.patcher import run_apply

    script = tmp_path / "moved.py"
    flags = tmp_path / "flags"
    script.write_text(textwrap.dedent(f"""
        import torch
        m = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()) for _ in range(3)])
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        before = "forward" in m[1].__dict__  # (the script would move the model here)
        for i in range(3):
            m(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
        open({str(flags)!r}, "w").write(f"{{before}} {{'forward' in m[1].__dict__}}")
    """))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    res = run_apply({"checkpoint": {"blocks": "all"}}, str(script), [], steps=None)
    assert res.failure is None and res.steps == 3
    assert flags.read_text() == "False True"  # not patched at the optimizer: at the first forward
    assert any("checkpointing on 3 block(s)" in n for _, n in res.notes)
