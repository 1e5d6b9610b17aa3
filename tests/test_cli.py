import json
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from memtune import __version__
from memtune.cli import app, user_errors
from memtune.errors import InputError

runner = CliRunner()


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0
    assert r.stdout.strip() == f"memtune {__version__}"


def test_help_lists_env():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    assert "env" in r.stdout


def test_env_json_without_driver(monkeypatch):
    import pynvml

    def boom():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", boom)
    r = runner.invoke(app, ["env", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["nvml"]["available"] is False
    assert "no NVIDIA driver" in info["nvml"]["reason"]
    assert info["host"]["ram_total_bytes"] > 0
    assert info["host"]["cpu_cores_logical"] >= 1
    assert info["triton"]["mode"]


def test_env_table_without_driver(monkeypatch):
    import pynvml

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: (_ for _ in ()).throw(pynvml.NVMLError(9)))
    r = runner.invoke(app, ["env"])
    assert r.exit_code == 0
    assert "no NVIDIA driver found" in r.stdout
    assert "torch" in r.stdout


def test_env_with_fake_gpu(monkeypatch):
    import pynvml

    class Mem:
        total, free = 80 * 2**30, 79 * 2**30

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlSystemGetDriverVersion", lambda: "580.159.04")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 1)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: i)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda h: Mem)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: "NVIDIA H100 80GB HBM3")
    r = runner.invoke(app, ["env", "--json"])
    info = json.loads(r.stdout)
    assert info["nvml"]["available"] is True
    assert info["nvml"]["driver"] == "580.159.04"
    assert info["nvml"]["gpus"][0]["memory_total_bytes"] == 80 * 2**30


def test_user_error_is_one_line_exit_1(capsys):
    with pytest.raises(typer.Exit) as e, user_errors():
        raise InputError("bad size 'x':\n write 16GiB")
    assert e.value.exit_code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert "bad size 'x': write 16GiB" in err


def test_subprocess_entry_points():
    r = subprocess.run([sys.executable, "-m", "memtune", "--version"], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == f"memtune {__version__}"
    r = subprocess.run([sys.executable, "-m", "memtune", "nosuchcommand"], capture_output=True, text=True)
    assert r.returncode == 1  # a usage error is one line and exit 1, like every error memtune reports
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
