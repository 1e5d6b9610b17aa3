"""Transports: how offload's bytes move between the device and pinned host memory.

`CudaTransport` copies on one side stream per direction through the caching host allocator's pinned buffers;
the compute stream waits on events, so results are right whatever the timing. `CloneTransport` is the CPU
stand-in the tests use (`simulate_host()`): the same bookkeeping, copies are clones, no streams.

Buffers that live for the whole run (streamed gradients' landing buffers, the host copy of streamed
parameters, the bf16 staging of updated weights) come from `host_buffer`, which carves them out of 1 GiB
pinned segments (`PinnedArena`): the caching host allocator rounds every pinned allocation up to a power of
two, so a Llama-7B MLP weight in bf16 (86 MiB) would take 128 MiB, and 13 GB of such buffers ~17 GB.
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


class PinnedArena:
    """Long-lived pinned host buffers carved out of `segment`-byte pinned allocations (a power of two, so the
    caching host allocator rounds nothing); a buffer that does not fit the current segment's rest starts a
    new one (the rest is lost, at most one buffer's size per segment)."""

    ALIGN = 512

    def __init__(self, segment: int = 1 << 30, pin: bool = True):
        import threading

        self.segment = segment
        self.pin = pin
        self._lock = threading.Lock()  # backward's hooks, the host-update thread and the main thread allocate
        self.segments: list[torch.Tensor] = []
        self.offset = segment  # no segment yet
        self.used = 0  # bytes handed out

    def empty(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            return self._empty(shape, dtype)

    def _empty(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = max(1, torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        self.used += n
        if n > self.segment:  # its own allocation (rounded up by the allocator: rare, a huge embedding)
            return torch.empty(shape, dtype=dtype, pin_memory=self.pin)
        if self.offset + n > self.segment:
            self.segments.append(torch.empty(self.segment, dtype=torch.uint8, pin_memory=self.pin))
            self.offset = 0
        seg = self.segments[-1]
        out = seg[self.offset:self.offset + n].view(dtype)[:torch.Size(shape).numel()].view(shape)
        self.offset += (n + self.ALIGN - 1) // self.ALIGN * self.ALIGN
        return out

    @property
    def reserved(self) -> int:
        return len(self.segments) * self.segment


class CloneTransport:
    """CPU stand-in used by tests: same bookkeeping, copies are clones, no streams."""

    cuda = False
    min_bytes = 0

    def host_like(self, t: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(t)

    def host_buffer(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A host buffer kept for the run (pinned on CUDA: `PinnedArena`)."""
        return torch.empty(shape, dtype=dtype)

    def d2h(self, dst: torch.Tensor, src: torch.Tensor):
        dst.copy_(src)
        return None

    def d2h_many(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]):
        for dst, src in pairs:
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
        self.arena = PinnedArena()

    def host_like(self, t: torch.Tensor) -> torch.Tensor:
        # preserve_format keeps the strides of a dense tensor: backward sees the very same layout
        return torch.empty_like(t, device="cpu", pin_memory=True)

    def host_buffer(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A pinned host buffer kept for the run, from the arena (no power-of-two rounding)."""
        return self.arena.empty(shape, dtype)

    def d2h(self, dst: torch.Tensor, src: torch.Tensor):
        return self.d2h_many([(dst, src)])

    def d2h_many(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]):
        """Copies (dst, src) pairs down on the side stream after the compute stream's queued work: one stream
        switch and one event for all (H200 host: 46 us a tensor one by one, 8.5 in a batch of 300)."""
        if not pairs:
            return None
        s = self.d2h_stream
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(s)
        for _, src in pairs:
            src.record_stream(s)
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
