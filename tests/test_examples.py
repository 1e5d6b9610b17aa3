"""Each bundled example is a script a user would write: it runs with plain python and no memtune."""

import importlib.util
import subprocess
import sys

import pytest


def run(examples_dir, name, *args):
    return subprocess.run([sys.executable, str(examples_dir / name), *args], capture_output=True, text=True, timeout=300)


def test_gpt_runs(examples_dir):
    r = run(examples_dir, "gpt.py", "--steps", "3")
    assert r.returncode == 0, r.stderr
    assert "done: 3 steps" in r.stdout


def test_gpt_grad_accum(examples_dir):
    r = run(examples_dir, "gpt.py", "--steps", "2", "--grad-accum", "2", "--layers", "2")
    assert r.returncode == 0, r.stderr


def test_convnet_runs(examples_dir):
    r = run(examples_dir, "convnet.py", "--steps", "3")
    assert r.returncode == 0, r.stderr
    assert "done: 3 steps" in r.stdout


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
def test_hf_llama_runs(examples_dir):
    r = run(examples_dir, "hf_llama.py", "--steps", "2")
    assert r.returncode == 0, r.stderr
    assert "done: 2 steps" in r.stdout


def test_hf_llama_without_transformers(examples_dir, tmp_path):
    # A shadow package that fails to import stands in for a machine without transformers.
    (tmp_path / "transformers").mkdir()
    (tmp_path / "transformers" / "__init__.py").write_text("raise ImportError('not installed')\n")
    r = subprocess.run([sys.executable, str(examples_dir / "hf_llama.py")], capture_output=True, text=True,
                       env={"PYTHONPATH": str(tmp_path), "PATH": ""})
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0
    assert "pip install transformers" in r.stderr
