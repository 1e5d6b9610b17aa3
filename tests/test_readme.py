"""The README's main job, as `.ci/run` extracts it (.ci/readme_job.py): its commands exist with the options
they use, write only under the ignored `out/`, and can run twice (every output they replace has --force)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import typer

from memtune.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _job():
    spec = importlib.util.spec_from_file_location("readme_job", ROOT / ".ci" / "readme_job.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main_job(ROOT / "README.md")


def test_main_job_commands_use_real_options():
    cmds = _job()
    assert [c[1] for c in cmds] == ["env", "profile", "tune", "apply", "report"]
    group = typer.main.get_command(app)
    for c in cmds:
        assert c[0] == "memtune"
        cmd = group.commands[c[1]]
        opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
        for a in c[2:]:
            if a == "--":
                break
            if a.startswith("-"):
                assert a.split("=")[0] in opts, f"{' '.join(c)}: {a} is not an option of memtune {c[1]}"


def test_main_job_writes_only_under_out_and_can_run_again():
    for c in _job():
        for flag in ("-o", "--report", "--png", "--csv"):
            if flag in c:
                path = c[c.index(flag) + 1]
                assert path.startswith("out/"), f"{' '.join(c)} writes {path} outside out/"
                if c[1] != "apply":  # apply writes no file here
                    assert "--force" in c, f"{' '.join(c)}: a second run needs --force"
    assert "/out/" in (ROOT / ".gitignore").read_text().split()


def test_ci_runs_the_extracted_job_then_the_tests():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_job.py --run" in ci and ci.index("readme_job.py --run") < ci.index("pytest")


def test_install_names_a_venv_and_a_cpu_torch_that_is_reachable():
    text = (ROOT / "README.md").read_text()
    install = text[text.index("## Install"):text.index("## The main job")]
    assert "python3 -m venv" in install and "download.pytorch.org/whl/cpu" in install
    assert "pip install torch==2.13.0" in install  # the CI machines' local CPU build, as .ci/run installs it
