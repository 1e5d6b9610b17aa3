"""The zoo's DDP script under a real torchrun with two gloo ranks.

Every script's own training (a loss printed at its tiny size) is checked under memtune by
tests/test_zoo_pipeline.py, which profiles, tunes and applies each one; a separate plain-python run of all 18
cost CI 67 s of a 2-core machine for what the pipeline's unpatched profile already runs.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ZOO = Path(__file__).resolve().parents[1] / "examples" / "zoo"

LOSS = re.compile(r"loss[^0-9\-]{0,12}-?\d+\.\d+", re.IGNORECASE)
TIMEOUT_S = 240


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(cmd):
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=_env(), cwd=ZOO.parent)
        return r.returncode, r.stdout, r.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        return "timeout", e.stdout or "", e.stderr or "", time.perf_counter() - t0


def _torchrun():
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else ([shutil.which("torchrun")] if shutil.which("torchrun") else None)


def test_ddp_under_torchrun_two_gloo_ranks():
    torchrun = _torchrun()
    if torchrun is None:
        pytest.skip("torchrun not found")
    cmd = [*torchrun, "--standalone", "--nproc-per-node", "2", str(ZOO / "ddp_torchrun.py"), "--steps", "3",
           "--device", "cpu"]
    rc, out, err, _ = _run(cmd)
    if rc != 0 and "done:" in out and "terminate called without an active exception" in err:
        # gloo's threads can abort a rank at process teardown after the run finished (torch, not the script:
        # once in five CI runs on 2 cores, 2026-12-02); run it once more
        rc, out, err, _ = _run(cmd)
    assert rc == 0, err[-3000:]
    assert "world size 2" in out and "backend gloo" in out
    assert LOSS.search(out)
    assert out.count("done:") == 1  # rank-0 printing only
