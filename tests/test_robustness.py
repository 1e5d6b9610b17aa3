"""Bad input and files beyond the one-line table (tests/test_bad_input.py): what memtune must do right, not only
refuse. Outputs are never renamed over anything but a regular file; budgets need units; the whole profile is
validated from its dataclasses; plans read beside their file; the report checks its profile's digest; tune's
timeout bounds the resumed search, Ctrl-C keeps the study, and every option of every command has help."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from memtune.cli import app
from memtune.errors import InputError, Interrupted, PlanError, ProfileError
from memtune.io import check_writable, write_text_atomic
from memtune.plan import parse_plan_text
from memtune.profile import Profile
from memtune.strategies import load_plan
from memtune.units import parse_budget, parse_size

sys.path.insert(0, str(Path(__file__).parent))
import bad_input_cases as bic  # noqa: E402

runner = CliRunner()
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def stored() -> dict:
    return bic.stored_profile()


# --- outputs ------------------------------------------------------------------------------------------------


def test_never_renames_over_a_symlink_even_with_force(tmp_path):
    target = tmp_path / "mine.txt"
    target.write_text("keep\n")
    link = tmp_path / "out.json"
    link.symlink_to(target)
    with pytest.raises(InputError, match="symbolic link"):
        check_writable(link, force=True)
    with pytest.raises(InputError, match="symbolic link"):  # and the writer refuses it on its own too
        write_text_atomic(link, "x")
    assert link.is_symlink() and target.read_text() == "keep\n"


def test_never_renames_over_a_pipe_or_folder(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(InputError, match="named pipe"):
        write_text_atomic(tmp_path / "pipe", "x")
    assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe").st_mode)
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="directory"):
        check_writable(tmp_path / "d", force=True)


@pytest.mark.skipif(not IS_ROOT, reason="making a device node needs root")
def test_never_replaces_a_device_node_as_root(tmp_path):
    """As root, --force replaced /dev/full with a regular file; a node like it (1, 7) in tmp stands in for it."""
    node = tmp_path / "full"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    for args in (["profile", str(bic.TINY), "-o", str(node), "--force"],
                 ["apply", str(tmp_path / "p.yaml"), "--report", str(node), "--force"]):
        (tmp_path / "p.yaml").write_text("run: {script: x.py}\n")
        r = runner.invoke(app, args)
        assert r.exit_code == 1 and "character device" in r.stderr, r.output
        assert stat.S_ISCHR(os.lstat(node).st_mode)


@pytest.mark.skipif(IS_ROOT, reason="root may write in a folder without write permission")
def test_unwritable_folder_is_refused_before_running(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        r = runner.invoke(app, ["profile", str(bic.TINY), "-o", str(ro / "p.json")])
        assert r.exit_code == 1 and "cannot create files in" in r.stderr and "permission denied" in r.stderr
    finally:
        ro.chmod(0o700)


def test_outputs_are_checked_before_the_script_runs(tmp_path):
    """A bad -o used to fail only after the whole run; the script must not start (it would print 'done')."""
    (tmp_path / "f.txt").write_text("x")
    r = runner.invoke(app, ["profile", str(bic.TINY), "-o", str(tmp_path / "f.txt" / "p.json")])
    assert r.exit_code == 1 and "is a file, not a folder" in r.stderr and "done" not in r.stdout


def test_write_failure_is_one_line(tmp_path):
    with pytest.raises(InputError, match="cannot write"):
        write_text_atomic("/proc/memtune-x.json", "x")


# --- sizes --------------------------------------------------------------------------------------------------


def test_budget_needs_a_unit_and_must_be_positive():
    assert parse_budget("16GiB") == 16 * 2**30
    assert parse_budget("16B") == 16 and parse_budget(1024) == 1024  # an int is bytes (plans, library callers)
    for bad, why in (("16", "needs a unit"), ("0GiB", "positive"), ("0", "needs a unit"), ("0.0001B", "positive"),
                     (0, "positive"), (True, "unit")):
        with pytest.raises(InputError, match=why):
            parse_budget(bad)
    assert parse_size("1024") == 1024  # compress.min_size and other sizes in plans may stay bare bytes


def test_compress_min_size_still_takes_bare_bytes():
    from memtune.strategies import plan_from_dict

    plan = plan_from_dict({"compress": {"blocks": "all", "dtype": "int8", "min_size": 4096}})
    assert plan.get("compress").min_size == 4096


# --- profiles -----------------------------------------------------------------------------------------------


def _subset(stored, loaded):
    """Every value the stored document has, the loaded one has too (fields added since take defaults)."""
    if isinstance(stored, dict):
        return all(k in loaded and _subset(v, loaded[k]) for k, v in stored.items())
    if isinstance(stored, list):
        return len(stored) == len(loaded) and all(_subset(a, b) for a, b in zip(stored, loaded, strict=True))
    return stored == loaded


def test_stored_profiles_load_unchanged(stored):
    p = Profile.from_dict(stored)
    assert _subset(stored, p.to_dict())
    assert Profile.from_dict(p.to_dict()).to_dict() == p.to_dict()


def test_missing_blocks_is_refused_not_predicted_smaller(stored):
    """A profile without `blocks` predicted 14.2 MiB instead of 29.2 MiB, exit 0."""
    d = dict(stored)
    del d["blocks"]
    with pytest.raises(ProfileError, match="required field blocks"):
        Profile.from_dict(d, "p.json")


def test_optional_and_unknown_fields(stored):
    d = json.loads(json.dumps(stored))
    for b in d["blocks"]:
        del b["activation_bytes_bf16_params"]  # added to schema 1 later: optional
    for k in ("notes", "extra", "created", "memtune_version", "torch_version"):
        del d[k]
    d["a_field_from_a_newer_memtune"] = {"x": 1}
    p = Profile.from_dict(d)
    assert p.blocks[0].activation_bytes_bf16_params is None and p.notes == []


@pytest.mark.parametrize("path,value,msg", [
    ("steps", "5", "field steps must be an integer, got a string"),
    ("step_s", None, "field step_s must be a number, got null"),
    ("grads_persist", 1, "field grads_persist must be true or false, got an integer"),
    ("hardware", [], "field hardware must be an object, got a list"),
    ("hardware.matmul_tflops.bf16", "fast", "field hardware.matmul_tflops.bf16 must be a number"),
    ("optimizers.0.hyperparams", "lr=1", "field optimizers[0].hyperparams must be an object"),
    ("blocks.1.param_bytes.float32", 1.5, "field blocks[1].param_bytes.float32 must be an integer, got a number"),
    ("batch_size", True, "field batch_size must be an integer or null, got a boolean"),
    ("notes", ["ok", 3], "field notes[1] must be a string"),
])
def test_wrong_types_name_the_field(stored, path, value, msg):
    d = json.loads(json.dumps(stored))
    bic._set(path, value)(d)
    with pytest.raises(ProfileError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        Profile.from_dict(d, "p.json")


def test_schema_is_the_dataclasses():
    """One description of the schema: every field of the profile dataclasses is checked from its type hint."""
    import dataclasses
    import typing

    from memtune import profile as pm

    for klass in (pm.Profile, pm.Hardware, pm.BlockProfile, pm.OptimizerProfile, pm.Peak):
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            pm._describe(hints[f.name])  # every hint is one the validator understands


# --- plans --------------------------------------------------------------------------------------------------


def test_duplicate_keys_name_key_and_lines():
    with pytest.raises(PlanError, match=r"key 'optimizer' is given twice \(line 1 and line 3\)"):
        parse_plan_text("optimizer: {name: adamw}\ncheckpoint: {blocks: all}\noptimizer: {name: sgd}\n", "p.yaml")
    # a YAML merge may override keys on purpose
    data = parse_plan_text("base: &b {blocks: all}\ncheckpoint:\n  <<: *b\n  blocks: [0]\n")
    assert data["checkpoint"] == {"blocks": [0]}


def test_python_tags_are_refused_as_unsafe(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("optimizer: !!python/object/apply:os.system ['touch x']\n")
    with pytest.raises(PlanError, match="refused as unsafe"):
        load_plan(p)


def test_run_argv_as_string_is_refused_not_split_into_characters():
    from memtune.strategies import plan_from_dict

    with pytest.raises(PlanError, match="run.argv must be a list"):
        plan_from_dict({"run": {"script": "t.py", "argv": "--steps 4"}})
    plan = plan_from_dict({"run": {"script": "t.py", "argv": ["--steps", 4]}})
    assert plan.run["argv"] == ["--steps", 4]


def test_relative_script_is_resolved_beside_the_plan(tmp_path, monkeypatch):
    from memtune.patcher import resolve_run

    proj = tmp_path / "proj"
    (proj / "scripts").mkdir(parents=True)
    (proj / "scripts" / "train.py").write_text("print('hi')\n")
    (proj / "plan.yaml").write_text("run: {script: scripts/train.py, argv: [--steps, '2']}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    script, module, argv = resolve_run(load_plan(proj / "plan.yaml"), None, None)
    assert Path(script).resolve() == (proj / "scripts" / "train.py").resolve() and argv == ["--steps", "2"]
    # not beside the plan: as written, from the current folder (tune's verification runs in the profile's cwd)
    (elsewhere / "train2.py").write_text("")
    (proj / "p2.yaml").write_text("run: {script: train2.py}\n")
    assert resolve_run(load_plan(proj / "p2.yaml"), None, None)[0] == "train2.py"
    # a script on the command line wins, as given
    assert resolve_run(load_plan(proj / "plan.yaml"), "other.py", ["-x"])[0] == "other.py"


def test_apply_runs_a_plan_from_another_folder(tmp_path, monkeypatch):
    """`memtune apply proj/plan.yaml` from anywhere runs proj's script (it looked in the current folder)."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "tiny_train.py").write_text(bic.TINY.read_text())
    (proj / "plan.yaml").write_text("run: {script: tiny_train.py, argv: [--steps, '3']}\n")
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["apply", "proj/plan.yaml", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["steps"] == 3


# --- report: the plan's profile -----------------------------------------------------------------------------


def _plan_and_profiles(tmp_path, stored) -> tuple[Path, Path, str]:
    good = Profile.from_dict(stored)
    proj = tmp_path / "proj"
    proj.mkdir()
    good.save(proj / "profile.json")
    plan = proj / "plan.yaml"
    plan.write_text(yaml.safe_dump({"checkpoint": {"blocks": "all"},
                                    "provenance": {"profile": "profile.json", "profile_digest": good.digest(),
                                                   "budget_bytes": 2**31}}))
    other = dict(stored, param_bytes=stored["param_bytes"] + 1)  # an unrelated model's profile
    here = tmp_path / "here"
    here.mkdir()
    (here / "profile.json").write_text(json.dumps(other))
    return plan, here, good.digest()


def test_report_takes_the_profile_beside_the_plan_not_the_current_folders(tmp_path, stored, monkeypatch):
    pytest.importorskip("matplotlib")
    plan, here, _ = _plan_and_profiles(tmp_path, stored)
    monkeypatch.chdir(here)  # holds another profile.json: it used to be read first
    r = runner.invoke(app, ["report", str(plan), "-o", str(tmp_path / "r.html"), "--json"])
    assert r.exit_code == 0, r.output
    assert not any("digest" in n for n in json.loads(r.stdout)["notes"])


def test_report_refuses_a_profile_of_another_digest_unless_given(tmp_path, stored):
    pytest.importorskip("matplotlib")
    plan, here, digest = _plan_and_profiles(tmp_path, stored)
    (plan.parent / "profile.json").write_text((here / "profile.json").read_text())  # swapped beside the plan
    r = runner.invoke(app, ["report", str(plan), "-o", str(tmp_path / "r.html")])
    assert r.exit_code == 1 and "is not the profile" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "r.html").exists()
    r = runner.invoke(app, ["report", str(plan), "--profile", str(here / "profile.json"), "-o",
                            str(tmp_path / "r.html"), "--json"])
    assert r.exit_code == 0, r.output
    assert any("not the profile this plan was tuned on" in n for n in json.loads(r.stdout)["notes"])


def test_tune_records_the_profile_relative_to_the_plan(tmp_path, stored, monkeypatch):
    from memtune.tune import _path_from

    out = tmp_path / "out" / "plan.yaml"
    assert _path_from(out, str(tmp_path / "out" / "profile.json")) == "profile.json"
    assert _path_from(out, str(tmp_path / "profile.json")) == str((tmp_path / "profile.json").resolve())


# --- tune: timeout, resume, Ctrl-C, storage -----------------------------------------------------------------


@pytest.fixture
def prof_path(tmp_path, stored) -> Path:
    p = tmp_path / "profile.json"
    Profile.from_dict(stored).save(p)
    return p


def test_timeout_bounds_the_whole_search_resumed_or_not(tmp_path, prof_path):
    """A resumed study ran 36 s under --timeout 20s: writing the trials to SQLite came after the clock."""
    args = ["tune", str(prof_path), "--budget", "8GiB", "-o", str(tmp_path / "plan.yaml"), "--timeout", "4s",
            "--trials", "100000", "--force", "--json"]
    for run in range(2):
        t = time.perf_counter()
        r = runner.invoke(app, args)
        wall = time.perf_counter() - t
        assert r.exit_code == 0, r.output
        d = json.loads(r.stdout)
        assert d["search_s"] <= 4.0 + 2.5, d["search_s"]  # one last trial and its write may overshoot
        assert wall <= 4.0 + 6.0, wall  # plus loading the profile and writing the plan (it took 4 s + all writes)
        if run == 1:
            assert d["resumed_trials"] > 0
            assert f"resuming {d['resumed_trials']} trials of study" in r.stderr
            assert d["n_trials"] >= d["new_trials"] > 0


def _kept(db: Path) -> int:
    import optuna

    url = f"sqlite:///{db}"
    return len(optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url).trials)


def test_resume_line_counts_what_the_study_holds(tmp_path, prof_path):
    args = ["tune", str(prof_path), "--budget", "8GiB", "-o", str(tmp_path / "plan.yaml"), "--trials", "12",
            "--force"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "resuming" not in r.stderr, r.output
    n = _kept(tmp_path / "plan.study.db")
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert f"resuming {n} trials of study 'memtune-" in r.stderr
    assert _kept(tmp_path / "plan.study.db") == n + 12


def test_ctrl_c_keeps_the_study_and_says_so(tmp_path, prof_path, monkeypatch):
    """Ctrl-C printed Optuna's traceback before 'interrupted'; now one line, exit 130, the trials kept."""
    from memtune.tune import evaluate

    real = evaluate.Tuner.evaluate
    calls = [0]

    def evaluate_then_ctrl_c(self, trial):
        import optuna

        calls[0] += isinstance(trial, optuna.Trial)  # a study's trial, not a seed plan's probe
        if calls[0] == 25:
            os.kill(os.getpid(), signal.SIGINT)  # as the terminal sends it
        return real(self, trial)

    monkeypatch.setattr(evaluate.Tuner, "evaluate", evaluate_then_ctrl_c)
    r = runner.invoke(app, ["tune", str(prof_path), "--budget", "8GiB", "-o", str(tmp_path / "plan.yaml"),
                            "--trials", "100000", "--timeout", "10m"])
    assert r.exit_code == 130, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted: ") and "trials kept in study" in lines[0], r.stderr
    assert "Traceback" not in r.output and not (tmp_path / "plan.yaml").exists()
    kept = _kept(tmp_path / "plan.study.db")
    assert kept >= 25 and f"interrupted: {kept} trials kept" in lines[0]
    # the same command resumes the study
    monkeypatch.setattr(evaluate.Tuner, "evaluate", real)
    r = runner.invoke(app, ["tune", str(prof_path), "--budget", "8GiB", "-o", str(tmp_path / "plan.yaml"),
                            "--trials", "5"])
    assert r.exit_code == 0 and f"resuming {kept} trials" in r.stderr, r.output


def test_interrupted_error_exit_code():
    assert Interrupted("x").exit_code == 130


def test_a_storage_without_its_driver_is_one_line(tmp_path, prof_path):
    r = runner.invoke(app, ["tune", str(prof_path), "--budget", "8GiB", "-o", str(tmp_path / "p.yaml"),
                            "--storage", "postgresql://u:pw@localhost/db"])
    if r.exit_code == 1 and "needs the database driver" in r.stderr:
        assert "pip install psycopg" in r.stderr and "pw@" not in r.stderr and "***" in r.stderr
    else:  # psycopg2 installed here: the database itself is not reachable, still one line
        assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.output


# --- help ---------------------------------------------------------------------------------------------------


def test_every_option_of_every_command_has_help():
    import typer

    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        assert cmd.help, name
        for p in cmd.params:
            if getattr(p, "hidden", False):
                continue
            assert getattr(p, "help", None), f"memtune {name}: {p.name} has no help"
        r = runner.invoke(app, [name, "--help"])
        assert r.exit_code == 0, r.output


def test_tune_help_says_what_the_timeout_covers():
    r = runner.invoke(app, ["tune", "--help"], env={"COLUMNS": "200"})
    text = " ".join(r.stdout.split())
    assert "resumed study or not" in text and "--verify runs come on top" in text


def test_usage_errors_are_one_line_exit_1():
    for args in (["tune"], ["nosuch"], ["estimate", "p.json", "--batch-size", "x"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 1, r.output
        assert len(r.stderr.strip().splitlines()) == 1 and "--help" in r.stderr, r.stderr
    r = runner.invoke(app, [])
    assert r.exit_code == 0 and "Usage" in r.stdout
