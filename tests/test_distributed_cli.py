"""The CLI on several ranks, for real: torchrun and Lightning's own launcher, 2 CPU processes over gloo.

One torchrun profile of examples/zoo/ddp_torchrun.py (module fixture) serves the profile and tune tests. A
sitecustomize on the ranks' path says at interpreter exit whether a process group is still alive (initialized,
or its gloo threads still running): memtune stops the script before its own destroy_process_group(), and a
gloo group alive at exit can abort the process (`terminate called without an active exception`).
"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "examples" / "zoo"
DDP = [str(ZOO / "ddp_torchrun.py"), "--steps", "30", "--device", "cpu"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
SITE = """\
import atexit, glob, os, sys

def _say():
    if "RANK" in os.environ or "LOCAL_RANK" in os.environ:  # a rank, not torchrun's agent
        names = []
        for comm in glob.glob("/proc/self/task/*/comm"):  # native threads (Linux)
            try:
                names.append(open(comm).read().strip())
            except OSError:
                pass
        d = sys.modules.get("torch.distributed")
        alive = bool(d is not None and d.is_available() and d.is_initialized())
        alive = alive or any("gloo" in n for n in names)
        print(f"memtune-test: process group alive at exit: {alive}", file=sys.stderr, flush=True)

atexit.register(_say)
"""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("site")
    (d / "sitecustomize.py").write_text(SITE)
    return d


def _run(cmd, site_dir, cwd, timeout=240):
    """Run in a session of its own, so that a hang can be ended: the launcher and what it started."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(p for p in (str(site_dir), str(ROOT), os.environ.get("PYTHONPATH")) if p))
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.terminate()  # torchrun passes SIGTERM on to its ranks, which run in sessions of their own
            try:
                p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"{' '.join(cmd[:8])} ... hung for {timeout} s")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _groups_at_exit(stderr):
    # the two ranks share one stderr: their lines can land without the newline between them
    return re.findall(r"process group alive at exit: (True|False)", stderr)


@pytest.fixture(scope="module")
def ddp_profile(tmp_path_factory, site_dir):
    d = tmp_path_factory.mktemp("ddp")
    proc = _run([*TORCHRUN, "-m", "memtune", "profile", "-o", "profile.json", "--steps", "3", DDP[0], "--", *DDP[1:]], site_dir, d)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return d, proc


def test_torchrun_profile_written_once_and_group_destroyed(ddp_profile):
    d, proc = ddp_profile
    prof = json.loads((d / "profile.json").read_text())
    assert prof["world_size"] == 2 and prof["ddp"] is True
    assert proc.stdout.count("memtune profile:") == 1 and proc.stdout.count("wrote profile.json") == 1
    # both ranks ended the group the stopped script left behind
    assert _groups_at_exit(proc.stderr) == ["False", "False"], proc.stderr[-3000:]


def test_verification_launches_like_the_profile(tmp_path):
    from memtune.tune.verify import apply_command

    one = apply_command(tmp_path / "p.yaml", 3, tmp_path / "r.json", 1)
    assert one[:4] == [sys.executable, "-m", "memtune", "apply"]
    two = apply_command(tmp_path / "p.yaml", 3, tmp_path / "r.json", 2)
    assert two[:6] == [*TORCHRUN[:3], "--standalone", "--nproc-per-node", "2"]
    assert two[6:9] == ["-m", "memtune", "apply"]


def test_tune_verify_on_a_torchrun_profile(ddp_profile, site_dir):
    """--verify runs each plan under torchrun on 2 ranks (plain python had no rendezvous and always
    failed) and the hint says how to run the plan."""
    d, _ = ddp_profile
    proc = _run([sys.executable, "-m", "memtune", "tune", "profile.json", "--budget", "1GiB", "--verify", "1",
                 "--trials", "10", "--timeout", "3s", "--verify-steps", "3", "-o", "plan.yaml"], site_dir, d)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "measured)" in proc.stdout  # the chosen plan's throughput was measured, not predicted
    measured = yaml.safe_load((d / "plan.yaml").read_text())["provenance"]["measured"]
    assert measured["status"] == "ok" and measured["ranks"] == 2  # on 2 ranks, as profiled
    assert "run it: torchrun --nproc-per-node 2 -m memtune apply plan.yaml" in proc.stdout


def test_torchrun_apply_prints_and_reports_from_rank_0(tmp_path, site_dir):
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"run: {{script: {DDP[0]}, argv: {json.dumps(DDP[1:])}}}\ncheckpoint: {{blocks: all}}\n")
    proc = _run([*TORCHRUN, "-m", "memtune", "apply", str(plan), "--steps", "2", "--report", "apply.json"],
                site_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert out.count("what was applied") == 1 and out.count("memtune apply: measured") == 1
    assert out.count("wrote apply.json") == 1
    rep = json.loads((tmp_path / "apply.json").read_text())
    assert rep["rank"] == 0 and rep["world_size"] == 2 and rep["steps"] == 2
    assert [r["rank"] for r in rep["ranks"]] == [0, 1]  # every rank's peak, gathered on rank 0
    assert _groups_at_exit(proc.stderr) == ["False", "False"], proc.stderr[-3000:]


def test_lightning_ddp_two_devices_profiles_every_rank(tmp_path, site_dir):
    """Lightning starts rank 1 itself (`sys.executable sys.argv...`): it must run under memtune too, else
    rank 0 stops after its steps while rank 1 trains on, and the run hangs."""
    pytest.importorskip("lightning")
    proc = _run([sys.executable, "-m", "memtune", "profile", "-o", "profile.json", "--steps", "3",
                 str(ZOO / "lightning_module.py"), "--", "--devices", "2", "--device", "cpu", "--steps", "30"],
                site_dir, tmp_path, timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    prof = json.loads((tmp_path / "profile.json").read_text())
    assert prof["world_size"] == 2 and prof["ddp"] is True and prof["steps"] == 3
    assert proc.stdout.count("wrote profile.json") == 1
    assert _groups_at_exit(proc.stderr) == ["False", "False"], proc.stderr[-3000:]
