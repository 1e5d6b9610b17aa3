"""What-if probes: one block of each repeated class re-run after the measured steps, on a host copy of the
inputs it had in the memory step, in a configuration the profile cannot otherwise show (its weights in
bf16, ...). Each probe measures on the user's own blocks what the cost model would otherwise guess."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from memtune.profile import WhatIf
from memtune.profilers import memory as mem


@dataclass
class HostTensor:
    """A block input kept on the host for the probe, with what it was on the device."""

    t: torch.Tensor
    requires_grad: bool


def to_host(t: torch.Tensor) -> HostTensor:
    return HostTensor(t.detach().to("cpu", copy=True), t.requires_grad)


def map_tensors(obj: Any, fn: Callable[[Any], Any], depth: int = 0) -> Any:
    """`obj` with every tensor (or HostTensor) replaced by fn(it); tuples, lists and dicts rebuilt, anything
    else (None, flags, cache objects) kept as it is."""
    if isinstance(obj, (torch.Tensor, HostTensor)):
        return fn(obj)
    if depth > 6:
        return obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(map_tensors(x, fn, depth + 1) for x in obj)
    if isinstance(obj, list):
        return [map_tensors(x, fn, depth + 1) for x in obj]
    if isinstance(obj, dict) and type(obj) is dict:
        return {k: map_tensors(v, fn, depth + 1) for k, v in obj.items()}
    return obj


def probe_worthy(module: nn.Module) -> bool:
    """Parameters that are all plain tensors (a DTensor/FSDP block is left alone: its forward would run
    collectives on this rank alone)."""
    return all(type(p.data) is torch.Tensor for p in module.parameters())


def has_fp32_weights(module: nn.Module) -> bool:
    return any(p.dtype == torch.float32 for p in module.parameters())


def saved_bytes_bf16_params(model: nn.Module, module: nn.Module, inputs: Any, device: torch.device,
                             autocast: str | None, autocast_cache: bool = True) -> int:
    """Bytes `module` saves for backward when its fp32 parameters are bf16 (precision `params: bf16`) and so
    are its floating inputs (the residual stream that bf16 weights upstream produce), counted like the memory
    step counts them (unique storages, parameters and buffers excluded)."""
    import contextlib

    bf16 = torch.bfloat16
    params = {n: (p.detach().to(bf16).requires_grad_(p.requires_grad) if p.dtype == torch.float32 else p)
              for n, p in module.named_parameters()}

    def to_device(h: HostTensor) -> torch.Tensor:
        t = h.t.to(device, dtype=bf16 if h.t.dtype == torch.float32 else h.t.dtype)
        return t.requires_grad_(True) if h.requires_grad and t.is_floating_point() else t

    args, kwargs = map_tensors(inputs, to_device)
    exclude = mem.state_ptrs(model) | {k[0] for p in params.values() if (k := mem.storage_key(p)) is not None}
    counter = mem.SavedTensorCounter(lambda: "probe", exclude)
    counter.active = True
    amp = (torch.autocast(device.type, dtype=getattr(torch, autocast), cache_enabled=autocast_cache)
           if autocast and hasattr(torch, autocast) else contextlib.nullcontext())
    try:
        with torch.enable_grad(), amp, counter.hooks():
            out = torch.func.functional_call(module, params, args, kwargs)
        del out
        return counter.bytes.get("probe", 0)
    finally:
        del args, kwargs, params


# --- what-ifs of the block modes ------------------------------------------------------------------------

# key prefix of a probe of one non-repeated block (by module path) beside the per-class probes of repeated ones
OTHER_PROBE = "@"
PROBED_MODES = ("keep", "recompute", "selective", "compress", "offload", "half", "double")
# "half": kept as it is, at half the batch (inputs sliced along the batch): how the block's time scales;
# "double": at twice a batch of one, which cannot be halved (inputs repeated along the batch). At batch 1 the
# formula's share of time that does not scale (0.4, fitted on small models) made the 7B full fine-tune's
# forward and backward at batch 14 read 2.43 s for about 3.2 measured (H200, 2026-12-04, call 45)


def _first_grad_tensor(obj: Any) -> torch.Tensor | None:
    for t in mem.iter_tensors(obj):
        if t.requires_grad and t.grad_fn is not None:
            return t
    return None


def probe_modes(model: nn.Module, module: nn.Module, inputs: Any, device: torch.device, autocast: str | None,
                modes: tuple[str, ...] = PROBED_MODES, reps: int = 3, batch: int | None = None,
                autocast_cache: bool = True) -> dict[str, WhatIf]:
    """Run `module` forward and backward alone in each block mode, with the strategies' own mechanisms
    (checkpoint's wrapper, compress's codec, offload's transport), and read the CUDA allocator and events.

    The weights are the module's own (shared storage, detached: their gradients go to stand-ins, and the
    weight-gradient bytes are taken out of the backward's peak, as the simulator adds them itself)."""
    import contextlib
    import statistics

    from memtune.strategies.checkpoint import checkpointed
    from memtune.strategies.compress import DEFAULT_MIN_SIZE, make_codec
    from memtune.strategies.offload.activations import ActivationOffloader
    from memtune.strategies.offload.transport import make_transport

    if device.type != "cuda":
        return {}
    cuda = torch.cuda
    params = {n: p.detach().requires_grad_(p.requires_grad) for n, p in module.named_parameters()}
    grad_bytes = sum(p.numel() * p.element_size() for p in params.values() if p.requires_grad)

    def to_device(h: HostTensor) -> torch.Tensor:
        t = h.t.to(device)
        return t.requires_grad_(True) if h.requires_grad and t.is_floating_point() else t

    full = map_tensors(inputs, to_device)
    half = None
    if batch and batch >= 2:
        def cut(h: HostTensor) -> torch.Tensor:
            t = h.t[: batch // 2] if h.t.dim() >= 1 and h.t.shape[0] == batch else h.t
            t = t.to(device)
            return t.requires_grad_(True) if h.requires_grad and t.is_floating_point() else t

        half = map_tensors(inputs, cut)
    double = None
    if batch == 1:
        def twice(h: HostTensor) -> torch.Tensor:
            t = h.t.to(device)
            if t.dim() >= 1 and t.shape[0] == 1:
                t = torch.cat([t, t])
            return t.requires_grad_(True) if h.requires_grad and t.is_floating_point() else t

        double = map_tensors(inputs, twice)
    amp = (torch.autocast(device.type, dtype=getattr(torch, autocast), cache_enabled=autocast_cache)
           if autocast and hasattr(torch, autocast) else contextlib.nullcontext())
    storages = mem.state_ptrs(model)

    def forward(*a: Any, **k: Any) -> Any:
        return torch.func.functional_call(module, params, a, k)

    def runner(mode: str):
        """(forward callable, context for the forward, offloader or None)."""
        if mode in ("recompute", "selective"):
            return checkpointed(forward, "full" if mode == "recompute" else "selective"), contextlib.nullcontext, None
        if mode == "compress":
            pack, unpack = make_codec("int8", DEFAULT_MIN_SIZE, storages)
            return forward, lambda: torch.autograd.graph.saved_tensors_hooks(pack, unpack), None
        if mode == "offload":
            off = ActivationOffloader(make_transport(device), device, storages)

            def hooks():
                g = off.begin("probe")
                return torch.autograd.graph.saved_tensors_hooks(lambda t: off.pack(g, t, t), off.unpack)

            return forward, hooks, off
        return forward, contextlib.nullcontext, None

    def _one_mode(mode: str) -> WhatIf:
        args, kwargs = {"half": half, "double": double}.get(mode) or full
        fwd, ctx, off = runner(mode)
        times_f, times_b, host_f, host_b = [], [], [], []
        w = WhatIf()
        for rep in range(reps + 1):  # the first run warms up (kernels, pinned buffers)
            cuda.synchronize(device)
            a0 = cuda.memory_allocated(device)
            cuda.reset_peak_memory_stats(device)
            e = [cuda.Event(enable_timing=True) for _ in range(4)]
            moved0 = off.bytes_offloaded if off is not None else 0
            with torch.enable_grad(), amp:
                e[0].record()
                h0 = time.perf_counter()
                with ctx():
                    y = fwd(*args, **kwargs)
                h1 = time.perf_counter()
                e[1].record()
            cuda.synchronize(device)
            a1, p1 = cuda.memory_allocated(device), cuda.max_memory_allocated(device)
            t = _first_grad_tensor(y)
            if t is None:
                raise RuntimeError("the block's output needs no gradient")
            out_bytes = mem.tensors_bytes(y, storages)
            gy = torch.randn_like(t)
            cuda.synchronize(device)
            a2 = cuda.memory_allocated(device)
            cuda.reset_peak_memory_stats(device)
            e[2].record()
            h2 = time.perf_counter()
            torch.autograd.backward(t, gy)
            h3 = time.perf_counter()
            e[3].record()
            cuda.synchronize(device)
            p2 = cuda.max_memory_allocated(device)
            if rep:
                times_f.append(e[0].elapsed_time(e[1]) / 1e3)
                times_b.append(e[2].elapsed_time(e[3]) / 1e3)
                host_f.append(h1 - h0)
                host_b.append(h3 - h2)
                w = WhatIf(kept_bytes=max(0, a1 - a0 - out_bytes), fwd_peak_bytes=max(0, p1 - a0),
                           bwd_peak_bytes=max(0, p2 - a2 - grad_bytes),
                           moved_bytes=(off.bytes_offloaded - moved0) if off is not None else 0)
            del y, t, gy
            for p in params.values():
                p.grad = None
            for x in mem.iter_tensors((args, kwargs)):
                x.grad = None
        w.fwd_s, w.bwd_s = statistics.median(times_f), statistics.median(times_b)
        w.fwd_host_s, w.bwd_host_s = statistics.median(host_f), statistics.median(host_b)
        return w



    out: dict[str, WhatIf] = {}
    for mode in modes:
        if mode == "half" and half is None or mode == "double" and double is None:
            continue
        try:
            out[mode] = _one_mode(mode)
        except Exception:
            if mode == "keep":
                raise
            cuda.synchronize(device)  # one mode the block does not take costs its what-if, not the others'
    return out


def host_update_rate(opt: torch.optim.Optimizer, max_elements: int = 32 * 2**20, min_elements: int = 16 * 2**20,
                     reps: int = 2) -> float | None:
    """Parameters per second this host updates with the script's optimizer class and hyper-parameters (its
    first group), as optimizer-state offload would run it (fused CPU kernels where torch has them): what the
    cost model's host update time is made of. A stand-in optimizer on fp32 host tensors shaped like (a
    sample of) the script's parameters, at least `min_elements` so the caches do not flatter it; None when
    the class cannot be built that way."""
    import time

    from memtune.strategies.offload.optimizer_state import fused_cpu_overrides

    shapes, n = [], 0
    for g in opt.param_groups:
        for p in g["params"]:
            if n >= max_elements:
                break
            shapes.append(p.shape)
            n += p.numel()
    if not shapes:
        return None
    if n < min_elements:  # a sample that fits the CPU's caches would run faster than the real update
        shapes.append(torch.Size([min_elements - n]))
        n = min_elements
    gen = torch.Generator().manual_seed(0)
    # in pinned memory and on a worker thread where the offload runs it so (CUDA): the H200 host's fused AdamW
    # ran 8% slower in pinned than in pageable memory, and the sliced update 7% slower on a Python thread
    # (benchmarks/results/run13/host_update.json)
    pin = torch.cuda.is_available()

    def tensor(s):
        return torch.empty(s, pin_memory=pin).normal_(generator=gen)

    params = [tensor(s).requires_grad_() for s in shapes]
    for p in params:
        p.grad = tensor(p.shape).mul_(1e-3)
    hyper = {k: v for k, v in opt.param_groups[0].items() if k not in ("params", "initial_lr")}
    hyper.update(fused_cpu_overrides(opt))
    try:
        stand_in = type(opt)([{"params": params, **hyper}])
    except Exception:
        return None
    times: list[float] = []

    @torch.no_grad()
    def run() -> None:
        for i in range(reps + 1):
            t0 = time.perf_counter()
            stand_in.step()
            if i:
                times.append(time.perf_counter() - t0)

    if pin:
        import threading

        th = threading.Thread(target=run, name="memtune-host-update-probe")
        th.start()
        th.join()
    else:
        run()
    return n / min(times) if times and min(times) > 0 else None


# The one-pass probe's size bounds: the update streams 16 B per parameter through memory, and the rate falls
# with the working set (the H200 host: 5.02G params/s at 16M elements, 4.66G at 128M, 4.7G in the 7B run's
# 6.74B; call 43-45, 2026-12-04): as many elements as the script trains, inside these
ONE_PASS_PROBE = (16 * 2**20, 128 * 2**20)


def host_one_pass_rate(opt: torch.optim.Optimizer, elements: int | None = None, reps: int = 2) -> float | None:
    """Parameters per second of the one-pass host AdamW (kernels/host_adamw.py) that optimizer-state offload
    runs for 16-bit weights with fp32 masters and streamed gradients, measured here as it runs there: pinned
    memory, a worker thread, bf16 gradients, on as many elements as the optimizer holds (ONE_PASS_PROBE
    bounds). None unless the optimizer is torch's AdamW and this host builds the kernel (the cost model then
    charges the three-pass update's extra traffic)."""
    import threading

    from memtune.kernels import host_adamw

    if type(opt) is not torch.optim.AdamW:
        return None
    if elements is None:
        n = sum(p.numel() for g in opt.param_groups for p in g["params"])
        elements = min(ONE_PASS_PROBE[1], max(ONE_PASS_PROBE[0], n))
    fn = host_adamw.kernel()
    if fn is None:
        return None
    pin = torch.cuda.is_available()
    gen = torch.Generator().manual_seed(0)
    p, m, v = (torch.empty(elements, pin_memory=pin).normal_(generator=gen) for _ in range(3))
    v.abs_()
    g = torch.empty(elements, dtype=torch.bfloat16, pin_memory=pin).normal_(generator=gen)
    out = torch.empty(elements, dtype=torch.bfloat16, pin_memory=pin)
    times: list[float] = []

    def run() -> None:
        for i in range(reps + 1):
            t0 = time.perf_counter()
            fn(p, g, m, v, out, 1e-4, 0.9, 0.999, 0.01, 1e-8, 2.0 + i)
            if i:
                times.append(time.perf_counter() - t0)

    th = threading.Thread(target=run, name="memtune-host-update-probe")
    th.start()
    th.join()
    return elements / min(times) if times and min(times) > 0 else None
