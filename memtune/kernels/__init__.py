"""Triton kernels, each with a pure-torch reference beside it (see DESIGN.md, "Kernels").

Importing this package never imports triton; `triton_usable` says whether a kernel can run for a device.
"""

from __future__ import annotations

import functools
import os


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1, set by tests on CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device) -> bool:
    """Can a Triton kernel run on tensors of `device`? CUDA with triton installed, or any device under the
    interpreter (CPU tensors only: the interpreter reads host memory)."""
    import torch

    dev = torch.device(device)
    if not _triton_importable():
        return False
    if interpreting():
        return dev.type == "cpu"
    return dev.type == "cuda"
