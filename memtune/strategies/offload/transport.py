"""Transports: how offload's bytes move between the device and pinned host memory.

`CudaTransport` copies on one side stream per direction through the caching host allocator's pinned buffers;
the compute stream waits on events, so results are right whatever the timing. `CloneTransport` is the CPU
stand-in the tests use (`simulate_host()`): the same bookkeeping, copies are clones, no streams.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from memtune.errors import EnvironmentNotSupported

MIN_BYTES = 64 * 1024  # smaller saved tensors stay on the GPU: not worth a copy and an event

_simulated = 0


def simulated() -> bool:
    """True inside `simulate_host()`: offload runs on CPU with clones standing in for host copies."""
    return _simulated > 0


@contextlib.contextmanager
def simulate_host() -> Iterator[None]:
    """Test-only: allow offload without a GPU; "host" copies are plain clones on the same device."""
    global _simulated
    _simulated += 1
    try:
        yield
    finally:
        _simulated -= 1


class CloneTransport:
    """CPU stand-in used by tests: same bookkeeping, copies are clones, no streams."""

    cuda = False
    min_bytes = 0

    def host_like(self, t: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(t)

    def d2h(self, dst: torch.Tensor, src: torch.Tensor):
        dst.copy_(src)
        return None

    def h2d_new(self, host: torch.Tensor, device: torch.device, after=None):
        return host.clone(), None

    def h2d_fence(self) -> None:
        pass

    def h2d(self, dst: torch.Tensor, src: torch.Tensor):
        dst.copy_(src)
        return None

    def join(self) -> None:
        pass

    def fence_d2h(self) -> None:
        pass

    def scalar_to_host(self, t: torch.Tensor):
        return t.detach().to("cpu", copy=True), None

    def use(self, ev, t: torch.Tensor | None = None) -> None:
        pass

    def sync(self, ev) -> None:
        pass


class CudaTransport:
    """Pinned host buffers (the caching host allocator), one side stream per direction."""

    cuda = True
    min_bytes = MIN_BYTES

    def __init__(self, device: torch.device):
        self.device = device
        self.d2h_stream = torch.cuda.Stream(device)
        self.h2d_stream = torch.cuda.Stream(device)

    def host_like(self, t: torch.Tensor) -> torch.Tensor:
        # preserve_format keeps the strides of a dense tensor: backward sees the very same layout
        return torch.empty_like(t, device="cpu", pin_memory=True)

    def d2h(self, dst: torch.Tensor, src: torch.Tensor):
        s = self.d2h_stream
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(s)
        src.record_stream(s)  # the allocator must not reuse src's memory before the copy ran
        return ev

    def h2d_new(self, host: torch.Tensor, device: torch.device, after=None):
        s = self.h2d_stream
        with torch.cuda.stream(s):
            if after is not None:
                s.wait_event(after)
            dev = torch.empty_strided(host.size(), host.stride(), dtype=host.dtype, device=device)
            dev.copy_(host, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(s)
        return dev, ev

    def h2d_fence(self) -> None:
        # writes into live parameters start only after the compute stream's queued work (the backward)
        self.h2d_stream.wait_stream(torch.cuda.current_stream(self.device))

    def h2d(self, dst: torch.Tensor, src: torch.Tensor):
        s = self.h2d_stream
        with torch.cuda.stream(s):
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(s)
        return ev

    def join(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self.h2d_stream)

    def fence_d2h(self) -> None:
        # the compute stream may change what queued copies down still have to read (e.g. clipping in place)
        torch.cuda.current_stream(self.device).wait_stream(self.d2h_stream)

    def scalar_to_host(self, t: torch.Tensor):
        """A small device tensor to pinned host memory, queued on the compute stream (after what made it)."""
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        h.copy_(t.detach(), non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return h, ev

    def use(self, ev, t: torch.Tensor | None = None) -> None:
        """The compute stream waits for `ev`; `t` (made on a side stream) is now used on the compute stream."""
        cur = torch.cuda.current_stream(self.device)
        if ev is not None:
            cur.wait_event(ev)
        if t is not None:
            t.record_stream(cur)

    def sync(self, ev) -> None:
        if ev is not None:
            ev.synchronize()


def make_transport(device: torch.device):
    if device.type == "cuda":
        return CudaTransport(device)
    if _simulated:
        return CloneTransport()
    raise EnvironmentNotSupported(NO_GPU)


NO_GPU = ("offload needs a CUDA GPU (it moves tensors to pinned host memory); this run has none: remove the "
           "`offload` section from the plan, or run on a machine with a GPU")
