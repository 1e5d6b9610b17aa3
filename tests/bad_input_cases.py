"""Bad input to every command, as cases that run: each one a command in a fresh folder, the exit code and the
one line it must print, and a check that no file there changed.

tests/test_bad_input.py runs every case; tests/scripts/bad_input_doc.py runs them too and writes the table of
docs/bad-input.md from what they printed, so the doc shows what the commands really say (the test checks the
doc is current).

Each case runs in its own folder holding a stored real profile (`profile.json`: gpt-125m from
benchmarks/accuracy_results.json), a plan tuned for it (`plan.yaml`), a training script (`tiny_train.py`) and
a text file (`notes.txt`); the case's setup adds what it needs. Most run in-process through typer's CliRunner;
`subprocess=True` runs `python -m memtune` for real (for a signal, or the real entry point).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "scripts" / "tiny_train.py"
STORED = ROOT / "benchmarks" / "accuracy_results.json"


@dataclass
class Case:
    group: str
    what: str
    args: list[str]
    expect: str  # a piece of the one line it prints
    code: int = 1
    setup: Callable[[Path], None] | None = None
    subprocess: bool = False
    interrupt_after_s: float | None = None  # send SIGINT this long after the study file appears
    script_raises: bool = False  # the user's script raised: its traceback is printed above the one line
    id: str = ""

    @property
    def command(self) -> str:
        return "memtune " + shlex.join(self.args)


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    changed: list[str] = field(default_factory=list)  # files there before that differ after
    created: list[str] = field(default_factory=list)

    def message(self, workdir: Path) -> str:
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        msg = lines[-1] if lines else ""
        for d in {str(workdir.resolve()), str(workdir)}:
            msg = msg.replace(d, "<dir>")
        msg = re.sub(r"\b\d+ trials kept", "N trials kept", msg)  # how many the search got to before Ctrl-C
        return re.sub(r"memtune-[0-9a-f]{16}-", "memtune-<digest>-", msg)  # changes with any new profile field


# --- the folder each case runs in --------------------------------------------------------------------------


def stored_profile() -> dict:
    data = json.loads(STORED.read_text())
    return next(m["profile"] for m in data["models"] if m["model"] == "gpt-125m")


def write_common(d: Path) -> None:
    from memtune.profile import Profile

    prof = Profile.from_dict(stored_profile())
    prof.save(d / "profile.json")
    plan = {"memtune_plan": 1, "run": {"script": "tiny_train.py", "argv": ["--steps", "4"]},
            "checkpoint": {"blocks": "all"},
            "provenance": {"profile": "profile.json", "profile_digest": prof.digest(), "budget_bytes": 2**31}}
    (d / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    shutil.copy(TINY, d / "tiny_train.py")
    (d / "notes.txt").write_text("a file of the user's\n")


def snapshot(d: Path) -> dict[str, str]:
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            out[rel] = "link:" + os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            out[rel] = "file:" + hashlib.sha256(p.read_bytes()).hexdigest()
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = "dir"
        else:
            out[rel] = f"special:{stat.S_IFMT(st.st_mode)}:{st.st_rdev}"
    return out


def _edit_profile(fn: Callable[[dict], None], name: str = "profile.json") -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        data = json.loads((d / "profile.json").read_text())
        fn(data)
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(json.dumps(data))
    return setup


def _write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
    return setup


def _symlink(name: str, target: str) -> Callable[[Path], None]:
    return lambda d: os.symlink(target, d / name)


def _fifo(name: str) -> Callable[[Path], None]:
    return lambda d: os.mkfifo(d / name)


def _mkdir(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).mkdir()


def _both(*fns: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        for f in fns:
            f(d)
    return setup


def _del(*keys: str) -> Callable[[dict], None]:
    def fn(data: dict) -> None:
        for k in keys:
            cur = data
            *path, last = k.split(".")
            for part in path:
                cur = cur[int(part)] if isinstance(cur, list) else cur[part]
            del cur[last]
    return fn


def _set(key: str, value) -> Callable[[dict], None]:
    def fn(data: dict) -> None:
        cur = data
        *path, last = key.split(".")
        for part in path:
            cur = cur[int(part)] if isinstance(cur, list) else cur[part]
        cur[last] = value
    return fn


def _plan(text: str) -> Callable[[Path], None]:
    return _write("bad.yaml", text)


BINARY = bytes(range(256)) * 4
RUN = "run: {script: tiny_train.py, argv: [--steps, '4']}\n"

# --- the cases ----------------------------------------------------------------------------------------------

CASES: list[Case] = [
    # outputs, checked before anything runs
    Case("outputs", "profile -o in a folder no file can be created in (/proc)",
         ["profile", "tiny_train.py", "-o", "/proc/memtune-profile.json"], "cannot create files in /proc"),
    Case("outputs", "profile -o under a parent that is a file",
         ["profile", "tiny_train.py", "-o", "notes.txt/profile.json"], "notes.txt is a file, not a folder"),
    Case("outputs", "profile -o an existing file, no --force",
         ["profile", "tiny_train.py", "-o", "profile.json"], "profile.json exists: pass --force"),
    Case("outputs", "profile -o a symlink, with --force",
         ["profile", "tiny_train.py", "-o", "link.json", "--force"], "is a symbolic link: memtune replaces only "
         "regular files, even with --force", setup=_symlink("link.json", "notes.txt")),
    Case("outputs", "profile -o a named pipe (a device-like node), with --force",
         ["profile", "tiny_train.py", "-o", "pipe", "--force"], "is a named pipe: memtune replaces only regular",
         setup=_fifo("pipe")),
    Case("outputs", "profile -o a directory, with --force",
         ["profile", "tiny_train.py", "-o", "out", "--force"], "out is a directory", setup=_mkdir("out")),
    Case("outputs", "profile -o empty", ["profile", "tiny_train.py", "-o", ""], "-o is empty"),
    Case("outputs", "tune -o in /proc", ["tune", "profile.json", "--budget", "2GiB", "-o", "/proc/plan.yaml"],
         "cannot create files in /proc"),
    Case("outputs", "tune -o under a parent that is a file",
         ["tune", "profile.json", "--budget", "2GiB", "-o", "notes.txt/plan.yaml"], "notes.txt is a file"),
    Case("outputs", "tune -o an existing plan, no --force", ["tune", "profile.json", "--budget", "2GiB"],
         "plan.yaml exists: pass --force"),
    Case("outputs", "tune -o a symlink, with --force",
         ["tune", "profile.json", "--budget", "2GiB", "-o", "link.yaml", "--force"], "is a symbolic link",
         setup=_symlink("link.yaml", "plan.yaml")),
    Case("outputs", "tune: the study beside the plan is a directory",
         ["tune", "profile.json", "--budget", "2GiB", "-o", "new.yaml"], "is not a regular file",
         setup=_mkdir("new.study.db")),
    Case("outputs", "tune: the study beside the plan is not an SQLite file",
         ["tune", "profile.json", "--budget", "2GiB", "-o", "new.yaml"], "is not an SQLite database",
         setup=_write("new.study.db", "not a database\n")),
    Case("outputs", "tune --storage in /proc",
         ["tune", "profile.json", "--budget", "2GiB", "-o", "new.yaml", "--storage", "sqlite:////proc/s.db"],
         "cannot create files in /proc"),
    Case("outputs", "apply --report in /proc", ["apply", "plan.yaml", "--report", "/proc/apply.json"],
         "cannot create files in /proc"),
    Case("outputs", "apply --report an existing file: the hint names --report",
         ["apply", "plan.yaml", "--report", "notes.txt"], "give --report another path"),
    Case("outputs", "apply --report a symlink, with --force",
         ["apply", "plan.yaml", "--report", "link.json", "--force"], "is a symbolic link",
         setup=_symlink("link.json", "notes.txt")),
    Case("outputs", "report -o in /proc", ["report", "profile.json", "-o", "/proc/r.html"], "cannot create files"),
    Case("outputs", "report -o an existing file, no --force", ["report", "profile.json", "-o", "notes.txt"],
         "notes.txt exists: pass --force"),
    Case("outputs", "report --png under a parent that is a file",
         ["report", "profile.json", "-o", "r.html", "--png", "notes.txt/png"], "notes.txt is a file"),
    Case("outputs", "report --csv is a file", ["report", "profile.json", "-o", "r.html", "--csv", "notes.txt"],
         "notes.txt is not a folder"),
    # sizes and durations
    Case("arguments", "tune --budget without a unit", ["tune", "profile.json", "--budget", "16", "-o", "new.yaml"],
         "a size needs a unit"),
    Case("arguments", "tune --budget 0", ["tune", "profile.json", "--budget", "0GiB", "-o", "new.yaml"],
         "a budget must be positive"),
    Case("arguments", "tune --budget not a size", ["tune", "profile.json", "--budget", "lots", "-o", "new.yaml"],
         "bad size 'lots'"),
    Case("arguments", "tune --timeout 0s",
         ["tune", "profile.json", "--budget", "2GiB", "-o", "new.yaml", "--timeout", "0s"],
         "the search needs a positive time"),
    Case("arguments", "tune --timeout not a duration",
         ["tune", "profile.json", "--budget", "2GiB", "-o", "new.yaml", "--timeout", "soon"], "bad duration"),
    Case("arguments", "tune --margin 150%",
         ["tune", "profile.json", "--budget", "2GiB", "-o", "new.yaml", "--margin", "150%"], "below 100%"),
    Case("arguments", "tune --objective unknown",
         ["tune", "profile.json", "--budget", "2GiB", "-o", "new.yaml", "--objective", "speed"], "choose one of"),
    Case("arguments", "tune --trials not a number",
         ["tune", "profile.json", "--budget", "2GiB", "--trials", "many"], "Invalid value for '--trials'"),
    Case("arguments", "tune --storage mysql:// without its driver",
         ["tune", "profile.json", "--budget", "2GiB", "-o", "new.yaml", "--storage",
          "mysql://memtune:secret@localhost/studies"], "pip install mysqlclient", subprocess=True),
    Case("arguments", "tune --storage of an unknown database",
         ["tune", "profile.json", "--budget", "2GiB", "-o", "new.yaml", "--storage", "nosuchdb://host/x"],
         "SQLAlchemy cannot use it"),
    Case("arguments", "estimate --budget without a unit", ["estimate", "profile.json", "--budget", "16"],
         "a size needs a unit"),
    Case("arguments", "estimate --budget 0", ["estimate", "profile.json", "--budget", "0MiB"],
         "a budget must be positive"),
    Case("arguments", "estimate --batch-size 0", ["estimate", "profile.json", "--batch-size", "0"],
         "must be a positive integer"),
    Case("arguments", "report --budget without a unit", ["report", "profile.json", "-o", "r.html", "--budget", "16"],
         "a size needs a unit"),
    Case("arguments", "an unknown command", ["optimise", "profile.json"], "No such command 'optimise'"),
    Case("arguments", "a missing argument", ["tune", "--budget", "2GiB"], "Missing argument"),
    # profiles
    Case("profiles", "profile without `blocks`", ["estimate", "p.json"], "required field blocks",
         setup=_edit_profile(_del("blocks"), "p.json")),
    Case("profiles", "a block without its name", ["estimate", "p.json"], "required field blocks[0].name",
         setup=_edit_profile(_del("blocks.0.name"), "p.json")),
    Case("profiles", "a field of the wrong type", ["estimate", "p.json"],
         "field blocks[2].activation_bytes must be an integer, got a string",
         setup=_edit_profile(_set("blocks.2.activation_bytes", "12 MiB"), "p.json")),
    Case("profiles", "a nested field of the wrong type", ["tune", "p.json", "--budget", "2GiB", "-o", "new.yaml"],
         "field peak.allocated_bytes must be an integer, got null",
         setup=_edit_profile(_set("peak.allocated_bytes", None), "p.json")),
    Case("profiles", "a list field given as a string", ["estimate", "p.json"], "field argv must be a list",
         setup=_edit_profile(_set("argv", "--preset 125m"), "p.json")),
    Case("profiles", "another schema version", ["estimate", "p.json"], "has profile schema 2",
         setup=_edit_profile(_set("schema_version", 2), "p.json")),
    Case("profiles", "JSON that is not a profile", ["estimate", "p.json"], "is not a memtune profile",
         setup=_write("p.json", "[1, 2, 3]\n")),
    Case("profiles", "a binary file", ["estimate", "p.json"], "is not a text file", setup=_write("p.json", BINARY)),
    Case("profiles", "not JSON", ["estimate", "plan.yaml"], "is not valid JSON"),
    Case("profiles", "not found", ["estimate", "nope.json"], "not found"),
    Case("profiles", "a directory", ["tune", "d", "--budget", "2GiB", "-o", "new.yaml"], "is a directory",
         setup=_mkdir("d")),
    # plans
    Case("plans", "a binary plan", ["apply", "bad.yaml"], "is not a text file", setup=_write("bad.yaml", BINARY)),
    Case("plans", "run.argv given as a string", ["apply", "bad.yaml"], "run.argv must be a list of arguments",
         setup=_plan("run: {script: tiny_train.py, argv: --steps 4}\n")),
    Case("plans", "a key given twice", ["apply", "bad.yaml"], "key 'checkpoint' is given twice (line 2 and line 3)",
         setup=_plan(RUN + "checkpoint: {blocks: all}\ncheckpoint: {blocks: [0]}\n")),
    Case("plans", "a key given twice inside a section", ["estimate", "profile.json", "-p", "bad.yaml"],
         "key 'blocks' is given twice", setup=_plan(RUN + "checkpoint:\n  blocks: all\n  blocks: [0]\n")),
    Case("plans", "a !!python tag", ["apply", "bad.yaml"], "is refused as unsafe",
         setup=_plan(RUN + "checkpoint: !!python/object/apply:os.system [echo hi]\n")),
    Case("plans", "YAML syntax error", ["apply", "bad.yaml"], "is not valid YAML at line 2",
         setup=_plan(RUN + "checkpoint: {blocks: [0, 1}\n")),
    Case("plans", "an unknown section", ["apply", "bad.yaml"], "unknown section 'chekpoint'",
         setup=_plan(RUN + "chekpoint: {blocks: all}\n")),
    Case("plans", "run.knobs not a mapping", ["apply", "bad.yaml"], "run.knobs must be a mapping",
         setup=_plan("run: {script: tiny_train.py, knobs: --batch-size=8}\n")),
    Case("plans", "another plan version", ["apply", "bad.yaml"], "plan version 2", setup=_plan("memtune_plan: 2\n")),
    Case("plans", "plan not found", ["apply", "nope.yaml"], "not found"),
    Case("plans", "plan is a directory", ["apply", "d"], "is a directory", setup=_mkdir("d")),
    # export to a framework's settings
    Case("export", "export --to a framework memtune does not export to", ["export", "plan.yaml", "--to", "deepspeed"],
         "unknown export target 'deepspeed'; choose one of: hf, lightning, accelerate"),
    Case("export", "export of a plan not found", ["export", "nope.yaml", "--to", "hf"], "not found"),
    Case("export", "export of a plan that does not validate", ["export", "bad.yaml", "--to", "lightning"],
         "checkpoint.mode: 'fast' is not allowed", setup=_plan(RUN + "checkpoint: {blocks: all, mode: fast}\n")),
    # report and its profile
    Case("report", "a plan whose profile beside it is another model's",
         ["report", "sub/plan.yaml", "-o", "r.html"], "is not the profile sub/plan.yaml was tuned on",
         setup=_both(_edit_profile(_set("param_bytes", 12345), "sub/profile.json"),
                     lambda d: shutil.copy(d / "plan.yaml", d / "sub" / "plan.yaml"))),
    Case("report", "a plan whose profile is missing", ["report", "sub/plan.yaml", "-o", "r.html"],
         "tuned on profile gone.json, which is not found",
         setup=_write("sub/plan.yaml", "checkpoint: {blocks: all}\nprovenance: {profile: gone.json}\n")),
    Case("report", "source not found", ["report", "nope.yaml", "-o", "r.html"], "not found"),
    # the user's script, and Ctrl-C
    Case("runs", "the script raises: its own traceback, then one line",
         ["profile", "tiny_train.py", "-o", "p2.json", "--", "--fail-at", "3"],
         "the script raised ValueError", script_raises=True, subprocess=True),
    Case("runs", "Ctrl-C during tune: the study is kept",
         ["tune", "profile.json", "--budget", "2GiB", "-o", "new.yaml", "--trials", "100000", "--timeout", "10m"],
         "trials kept in study", code=130, subprocess=True, interrupt_after_s=1.5),
]
for i, c in enumerate(CASES, 1):
    c.id = f"{i:02d}-{c.group}"

# files a case may create although it fails (the folder memtune made for a later file is not one)
ALLOWED_NEW = {"p2.json"}  # the script-raised case saves what was measured, as documented


def run_case(case: Case, d: Path) -> Outcome:
    """Run one case in the empty folder `d`."""
    write_common(d)
    if case.setup:
        case.setup(d)
    before = snapshot(d)
    if case.subprocess:
        code, out, err = _run_subprocess(case, d)
    else:
        from typer.testing import CliRunner

        from memtune.cli import app

        with _chdir(d):
            r = CliRunner().invoke(app, case.args)
        code, out, err = r.exit_code, r.stdout, r.stderr
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            import traceback

            err += "".join(traceback.format_exception(r.exception))
    after = snapshot(d)
    changed = [k for k, v in before.items() if after.get(k) != v]
    created = [k for k in after if k not in before and not k.startswith("__pycache__")]
    return Outcome(code, out, err, changed, created)


@contextlib.contextmanager
def _chdir(d: Path):
    old = os.getcwd()
    os.chdir(d)
    try:
        yield
    finally:
        os.chdir(old)


def _run_subprocess(case: Case, d: Path) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [sys.executable, "-m", "memtune", *case.args]
    if case.interrupt_after_s is None:
        r = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=300)
        return r.returncode, r.stdout, r.stderr
    proc = subprocess.Popen(cmd, cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t_end = time.monotonic() + 120
    study = d / "new.study.db"
    while not study.exists() and proc.poll() is None and time.monotonic() < t_end:
        time.sleep(0.1)
    time.sleep(case.interrupt_after_s)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def problems(case: Case, o: Outcome, d: Path) -> list[str]:
    """What is wrong with an outcome: exit code, more than one line, a traceback, a file changed."""
    bad = []
    if o.code != case.code:
        bad.append(f"exit {o.code}, want {case.code}")
    lines = [ln for ln in o.stderr.splitlines() if ln.strip()]
    msg = o.message(d)
    if case.script_raises:
        frames = [ln for ln in lines if ln.lstrip().startswith('File "')]
        if "Traceback" not in o.stderr or any("/memtune/" in f for f in frames):
            bad.append("want the script's own traceback (its frames only) above the message")
    else:
        if len(lines) != 1:
            bad.append(f"{len(lines)} lines on stderr, want 1")
        if "Traceback" in o.stderr:
            bad.append("a traceback")
    if case.expect not in " ".join(msg.split()):
        bad.append(f"message lacks {case.expect!r}")
    if o.changed:
        bad.append(f"changed {o.changed}")
    extra = [c for c in o.created if c not in ALLOWED_NEW and not c.endswith(".study.db")]
    if extra:
        bad.append(f"created {extra}")
    if any(c.endswith(".study.db") for c in o.created) and case.interrupt_after_s is None:
        bad.append(f"created a study ({o.created}) though it failed before the search")
    if bad:
        bad.append(f"stderr: {o.stderr[-2000:]!r}")
    return bad


def render_table(rows: list[tuple[Case, Outcome, Path]]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    out = ["| # | case | command | exit | message (stderr) |", "|---|---|---|---|---|"]
    for case, o, d in rows:
        msg = o.message(d)
        if case.script_raises:
            msg = "(the script's traceback, then) " + msg
        out.append(f"| {case.id.split('-')[0]} | {cell(case.what)} | `{cell(case.command)}` | {o.code} | "
                   f"{cell(msg)} |")
    return "\n".join(out) + "\n"
