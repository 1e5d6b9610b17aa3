"""Every zoo script (examples/zoo/) runs with plain python at its tiny size, trains a few steps and prints a loss.

The scripts are run as real subprocesses, all at once from a thread pool (each with one intra-op thread, so they
do not fight over the cores), then checked one by one.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ZOO = Path(__file__).resolve().parents[1] / "examples" / "zoo"

# script -> arguments for a short run (each accepts --steps; the HF ones also their own spellings)
RUNS = {
    "compiled.py": ["--steps", "3"],  # first: torch.compile on CPU takes longest
    "hf_trainer.py": ["--max-steps", "3", "--logging-steps", "1"],
    "lightning_module.py": ["--steps", "3"],
    "accelerate_loop.py": ["--steps", "3"],
    "peft_lora.py": ["--steps", "3"],
    "lora_handwritten.py": ["--steps", "3"],
    "resnet_amp.py": ["--steps", "3"],
    "vit.py": ["--steps", "3"],
    "encoder_decoder.py": ["--steps", "3"],
    "unet_diffusion.py": ["--steps", "3"],
    "gan.py": ["--steps", "3"],
    "distill.py": ["--steps", "3"],
    "grad_accum.py": ["--steps", "3", "--accum", "2"],
    "fused_adamw.py": ["--steps", "3"],
    "ddp_torchrun.py": ["--steps", "3"],
    "lstm_lm.py": ["--steps", "3", "--log-interval", "1"],
    "moe.py": ["--steps", "3"],
    "llama7b_full.py": ["--steps", "3"],
}
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


def test_every_zoo_script_is_listed():
    on_disk = {p.name for p in ZOO.glob("*.py")}
    assert on_disk == set(RUNS), f"scripts without a run here: {on_disk - set(RUNS)}; listed but missing: {set(RUNS) - on_disk}"


def test_zoo_scripts_train_at_tiny_size():
    cmds = {name: [sys.executable, str(ZOO / name), *args, "--device", "cpu"] for name, args in RUNS.items()}
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(cmds, pool.map(_run, cmds.values()), strict=True))
    failures = []
    for name, (rc, out, err, secs) in results.items():
        if rc != 0:
            failures.append(f"{name}: exit {rc} after {secs:.0f}s\n{err[-3000:]}")
        elif not LOSS.search(out):
            failures.append(f"{name}: no loss printed\n{out[-2000:]}")
    assert not failures, "\n\n".join(failures)


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
