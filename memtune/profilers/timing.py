"""Timing observers: a clock that records CUDA events on GPU (no synchronisation inside the step) and
`perf_counter` on CPU, read once the step has ended."""

from __future__ import annotations

import statistics
import time

import torch


class Clock:
    def __init__(self, cuda: bool):
        self.cuda = cuda and torch.cuda.is_available()

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def elapsed(self, a, b) -> float:
        """Seconds from mark a to mark b (call `sync` first on GPU)."""
        if self.cuda:
            return a.elapsed_time(b) / 1e3
        return b - a


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0
