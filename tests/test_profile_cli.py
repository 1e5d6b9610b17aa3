"""`memtune profile` through typer's CliRunner and one real subprocess."""

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from memtune.cli import app
from memtune.profile import Profile

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "scripts" / "tiny_train.py")
runner = CliRunner()


def test_profile_writes_and_summarises(tmp_path):
    out = tmp_path / "p.json"
    r = runner.invoke(app, ["profile", TINY, "-o", str(out), "--steps", "3", "--", "--steps", "10"])
    assert r.exit_code == 0, r.output
    flat = " ".join(r.stdout.split())  # rich wraps a long path onto its own line
    assert "blocks.0" in r.stdout and "peak" in r.stdout and (f"wrote {out}" in flat or f"wrote\n{out}" in r.stdout)
    assert Profile.load(out).steps == 3
    r = runner.invoke(app, ["profile", TINY, "-o", str(out), "--", "--steps", "10"])
    assert r.exit_code == 1 and "--force" in r.stderr and "Traceback" not in r.output
    r = runner.invoke(app, ["profile", TINY, "-o", str(out), "--force", "--steps", "1", "--", "--steps", "10"])
    assert r.exit_code == 0, r.output


def test_profile_json_stdout_is_clean(tmp_path):
    r = runner.invoke(app, ["profile", TINY, "-o", str(tmp_path / "p.json"), "--steps", "1", "--json",
                            "--blocks", "blocks.*", "--", "--steps", "10"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)  # the script's own prints went to stderr
    assert d["schema_version"] == 1 and len([b for b in d["blocks"] if b["kind"] == "repeated"]) == 3


def test_profile_bad_input(tmp_path):
    r = runner.invoke(app, ["profile", "nope.py", "-o", str(tmp_path / "p.json")])
    assert r.exit_code == 1 and "not found" in r.stderr and r.stderr.count("\n") == 1
    r = runner.invoke(app, ["profile", "-o", str(tmp_path / "p.json")])
    assert r.exit_code == 1 and "give the training script" in r.stderr
    r = runner.invoke(app, ["profile", TINY, "-o", str(tmp_path / "q.json"), "--", "--no-optimizer"])
    assert r.exit_code == 1 and "no torch.optim optimizer" in r.stderr


def test_profile_script_that_raises(tmp_path):
    out = tmp_path / "p.json"
    r = runner.invoke(app, ["profile", TINY, "-o", str(out), "--", "--fail-at", "3"])
    assert r.exit_code == 1
    assert "ValueError: boom at step 3" in r.stderr and "tiny_train.py" in r.stderr
    assert "runpy" not in r.stderr and "capture.py" not in r.stderr
    assert "saved in" in r.stderr and out.exists()


def test_profile_module_and_argv_untouched(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text(Path(TINY).read_text())
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["profile", "-m", "mypkg.train", "--steps", "1", "--", "--steps", "5"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "profile.json").exists()
    r = runner.invoke(app, ["profile", TINY, "-o", "x.json", "--", "--echo", "--", "-q", "a b"])
    assert "ARGV ['--echo', '--', '-q', 'a b']" in r.stdout


def test_profile_real_subprocess(tmp_path):
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, "-m", "memtune", "profile", str(ROOT / "examples" / "gpt.py"), "-o", str(out),
                        "--steps", "3", "--", "--layers", "2", "--width", "32", "--heads", "2", "--seq-len", "16"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    p = Profile.load(out)
    assert [b.name for b in p.repeated_blocks] == ["blocks.0", "blocks.1"]
    assert "top" in r.stdout and "sum of measured parts" in r.stdout
