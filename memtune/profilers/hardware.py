"""What machine this is: GPU (pynvml), host (psutil), Triton, and measured transfer and matmul rates.

`environment()` backs `memtune env` (what users paste into bug reports); `measure_rates()` backs the
profile's hardware section and caches its micro-benchmarks per machine.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from memtune import __version__


def _nvml() -> dict[str, Any]:
    """GPU facts through NVML. Without a driver this says so instead of raising."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as e:  # no library, no driver, no device
        return {"available": False, "reason": f"no NVIDIA driver found ({type(e).__name__})"}
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            gpus.append({
                "index": i,
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory_total_bytes": int(mem.total),
                "memory_free_bytes": int(mem.free),
            })
        return {
            "available": True,
            "driver": driver.decode() if isinstance(driver, bytes) else driver,
            "gpus": gpus,
        }
    except Exception as e:
        return {"available": False, "reason": f"NVML query failed ({type(e).__name__}: {e})"}
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def triton_mode() -> dict[str, Any]:
    """Whether Triton can compile for this machine, or only run in its interpreter."""
    try:
        import triton
    except Exception:
        return {"installed": False, "mode": "unavailable", "version": None}
    if os.environ.get("TRITON_INTERPRET") == "1":
        mode = "interpreter (TRITON_INTERPRET=1)"
    else:
        import torch

        mode = "compiled (CUDA)" if torch.cuda.is_available() else "interpreter only (no GPU)"
    return {"installed": True, "mode": mode, "version": triton.__version__}


def environment() -> dict[str, Any]:
    import torch

    vm = psutil.virtual_memory()
    return {
        "memtune": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "nvml": _nvml(),
        "host": {
            "ram_total_bytes": int(vm.total),
            "ram_available_bytes": int(vm.available),
            "cpu_cores_physical": psutil.cpu_count(logical=False),
            "cpu_cores_logical": psutil.cpu_count(logical=True),
        },
        "triton": triton_mode(),
    }


# --- measured rates ---------------------------------------------------------------------------------

_CACHE = Path(os.environ.get("MEMTUNE_CACHE", Path.home() / ".cache" / "memtune")) / "hardware.json"


def _bench(fn, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds of `fn` (synchronized on CUDA)."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _measure(device: str) -> dict[str, float]:
    import torch

    out: dict[str, float] = {}
    if device == "cuda":
        n = 256 * 2**20  # 256 MiB: large enough to reach the link's plateau
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(n, dtype=torch.uint8, device="cuda")
        out["h2d_gbps"] = n / _bench(lambda: dev.copy_(host, non_blocking=True)) / 1e9
        out["d2h_gbps"] = n / _bench(lambda: host.copy_(dev, non_blocking=True)) / 1e9
        dev2 = torch.empty_like(dev)
        # read + write, as the DESIGN's 2.9 TB/s reference counts it
        out["d2d_gbps"] = 2 * n / _bench(lambda: dev2.copy_(dev)) / 1e9
        del host, dev, dev2
        m = 8192
        dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    else:
        m = 512
        dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}  # bf16 is often slower than fp32 on a CPU
        n = 64 * 2**20
        a = torch.empty(n, dtype=torch.uint8)
        b = torch.empty_like(a)
        out["d2d_gbps"] = 2 * n / _bench(lambda: b.copy_(a)) / 1e9
        out["h2d_gbps"] = out["d2h_gbps"] = out["d2d_gbps"] / 2
    for name, dt in dtypes.items():
        x = torch.randn(m, m, device=device, dtype=dt)
        y = torch.randn(m, m, device=device, dtype=dt)
        out[f"matmul_tflops_{name}"] = 2 * m**3 / _bench(lambda x=x, y=y: x @ y) / 1e12
    return out


def _machine_key(device: str) -> str:
    import torch

    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    return f"{platform.node()}|{device}|{gpu}|torch {torch.__version__}"


@functools.lru_cache(maxsize=2)
def measure_rates(device: str, use_cache: bool = True) -> dict[str, float]:
    """Pinned host<->device GB/s, device copy GB/s and matmul TFLOP/s, cached per machine on disk."""
    key = _machine_key(device)
    cache: dict[str, Any] = {}
    if use_cache and _CACHE.is_file():
        try:
            cache = json.loads(_CACHE.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}
        if key in cache:
            return cache[key]
    rates = _measure(device)
    if use_cache:
        try:
            cache[key] = rates
            _CACHE.parent.mkdir(parents=True, exist_ok=True)
            _CACHE.write_text(json.dumps(cache, indent=2))
        except OSError:
            pass  # a read-only home is not worth failing a profile for
    return rates


def measure_collectives(nbytes: int | None = None, group: Any = None) -> dict[str, float]:
    """All-gather and reduce-scatter bus bandwidth (GB/s) on the live process group, {} without one.

    Collective: every rank must call it. Implemented in memtune/distributed.py (the sharding engineer's).
    """
    from memtune.distributed import measure_collectives as measure

    return measure(nbytes, group)
