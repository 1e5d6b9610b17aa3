import os
import sys
from pathlib import Path

import pytest

# Kernel modules must see TRITON_INTERPRET before they import triton: on a machine without CUDA, run
# every Triton kernel in the interpreter.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def load_benchmark(name: str):
    """A module of benchmarks/ (not a package) by file name, for tests of its helpers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def examples_dir() -> Path:
    return EXAMPLES


@pytest.fixture
def python_exe() -> str:
    return sys.executable
