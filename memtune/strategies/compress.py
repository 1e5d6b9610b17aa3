"""Activation compression: the saved tensors of chosen blocks are kept quantized between forward and
backward (int8 with a per-group absmax scale, or fp8 e4m3), in the spirit of Mesa (Pan et al. 2021) and
COAT (Xi et al. 2024). Lossy.

```yaml
compress: {blocks: [4, 5, 6, 7], dtype: int8}        # or blocks: all; dtype: fp8 on GPUs with e4m3
compress: {blocks: all, dtype: int8, min_size: 1MiB} # smaller saved tensors stay as they are
```
Only floating tensors of at least `min_size` are quantized; integer tensors, small ones, parameters and
their autocast copies stay as they are. A block that `checkpoint` recomputes is refused (nothing of it is
saved). With `offload` of the same block, offload's hooks call this strategy's (pack, unpack) from
`ctx.shared["saved_tensor_codecs"]` around the copy to the host, so the compressed bytes travel.
"""

from __future__ import annotations

from typing import Any

import torch

from memtune.errors import EnvironmentNotSupported, PlanError
from memtune.plan import check_choice, check_keys, shared_block_refs, validate_block_refs
from memtune.strategies.base import ApplyContext, SearchOptions, Strategy, Undo, register, wrap_forward
from memtune.units import format_bytes, parse_size

DTYPES = ("int8", "fp8")
KEYS = {"blocks": "block references: indices, ranges 'a-b', module paths or 'all'",
        "dtype": "int8 (any GPU) or fp8 (e4m3, compute capability >= 8.9)",
        "min_size": "smallest saved tensor to quantize, e.g. 1MiB (default)"}
DEFAULT_MIN_SIZE = 2**20
_FLOAT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
# pack/unpack reach this share of the measured device copy bandwidth (80-94% on H100, benchmarks/compress.py)
KERNEL_EFFICIENCY = 0.8
# During a compressed block's backward autograd unpacks one node's saved tensors at a time and frees them
# after it: the live extra is the largest node's set, about 4/17 of a GPT block's saved bytes (the MLP's
# 4x-wide hidden against ~17 widths saved in all).
BWD_LIVE_SHARE = 0.25
# Whole-step cost over kernel-only time: GPT 12x1024, batch 8x1024, bf16 on H100 (benchmarks/compress.py,
# docs/benchmarks.md) lost 1.8 ms per compressed block against ~0.45 ms of pack+unpack traffic (launches,
# contiguous copies of non-dense views, Python hooks).
OVERHEAD_FACTOR = 4.0


_VIEWS = {"ToCopyBackward0", "TBackward0", "ViewBackward0", "TransposeBackward0", "PermuteBackward0",
          "ExpandBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"}


def _is_param_like(t: torch.Tensor, param_ptrs: set[int]) -> bool:
    """A parameter, or a cast/view of one (autocast's bf16 weight copy, a linear's transposed weight):
    kept anyway, so quantizing it saves nothing and only adds error."""
    if isinstance(t, torch.nn.Parameter) or t.data_ptr() in param_ptrs:
        return True
    fn = t.grad_fn
    if fn is None:
        return t.requires_grad  # a leaf that wants a gradient
    for _ in range(4):
        name = type(fn).__name__
        if name == "AccumulateGrad":
            return True
        if name not in _VIEWS or not fn.next_functions:
            return False
        fn = fn.next_functions[0][0]
        if fn is None:
            return False
    return False


def make_codec(dtype: str, min_size: int, param_ptrs: set[int] | None = None, backend: str = "auto"):
    """(pack, unpack) for saved_tensors_hooks: quantizes what is worth it, passes the rest through."""
    from memtune.kernels import activation_quant as aq

    ptrs = param_ptrs if param_ptrs is not None else set()

    def pack(t: torch.Tensor):
        if (t.dtype not in (torch.float32, torch.float16, torch.bfloat16)
                or t.numel() * t.element_size() < min_size or t.layout != torch.strided
                or _is_param_like(t, ptrs)):
            return t
        return aq.pack(t.detach(), dtype, backend=backend)

    def unpack(p):
        return aq.unpack(p, backend=backend) if isinstance(p, aq.Packed) else p

    return pack, unpack


@register
class Compress(Strategy):
    name = "compress"
    order = 60
    summary = "keep chosen blocks' saved activations quantized (int8/fp8) until backward (lossy)"

    def validate(self, section: Any) -> dict[str, Any]:
        if not isinstance(section, dict):
            raise PlanError("compress: give a mapping, e.g. {blocks: all, dtype: int8}")
        check_keys(section, KEYS, "compress")
        if "blocks" not in section:
            raise PlanError("compress: `blocks` is required, e.g. {blocks: [0, 1], dtype: int8}")
        out: dict[str, Any] = {"blocks": validate_block_refs(section["blocks"], "compress.blocks"),
                               "dtype": check_choice(section.get("dtype", "int8"), DTYPES, "compress.dtype")}
        if "min_size" in section:
            try:
                out["min_size"] = parse_size(section["min_size"])
            except Exception as e:
                raise PlanError(f"compress.min_size: {e}") from None
        return out

    def lossy(self, section: dict[str, Any]) -> bool:
        return True

    def conflicts(self, plan, section: dict[str, Any]) -> list[str]:
        ck = plan.get("checkpoint") if plan is not None else None
        if not ck or "blocks" not in ck:
            return []
        if shared_block_refs(section["blocks"], ck["blocks"]):
            return ["compress and checkpoint name the same block(s): a recomputed block saves nothing to "
                    "compress; take those blocks out of one of the two sections"]
        return []

    def describe(self, section: dict[str, Any]) -> str:
        return f"{section['dtype']} saved activations of blocks {section['blocks']}"

    # --- search and cost model --------------------------------------------------------------------
    def space(self, trial: Any, profile, opts: SearchOptions) -> dict[str, Any] | None:
        if opts.lossless_only:
            return None
        n_rep = len(profile.repeated_blocks)
        if n_rep == 0:
            return None
        n = trial.suggest_int("compress.n_blocks", 0, n_rep)
        if n == 0:
            return None
        dtypes = ["int8"] + (["fp8"] if _has_fp8(profile) else [])
        dtype = trial.suggest_categorical("compress.dtype", dtypes)
        # the last blocks: checkpoint's choices usually start from the first ones, so fewer conflicts
        return {"blocks": list(range(n_rep - n, n_rep)), "dtype": dtype}

    def effect(self, profile, section: dict[str, Any], sim) -> None:
        from memtune.kernels.activation_quant import ratio

        names = profile.resolve_blocks(section["blocks"], "compress.blocks")
        gbps = profile.hardware.d2d_gbps or 0.0
        if gbps <= 0:  # CPU profile or no measurement: the torch reference runs at host memory speed
            gbps = 20.0
        bw = gbps * 1e9 * KERNEL_EFFICIENCY
        by_name = {b.name: b for b in sim.blocks}
        total_saved = 0.0
        for name in names:
            b = by_name.get(name)
            if b is None:
                continue
            bp = profile.block(name)
            by_dtype = bp.activation_bytes_by_dtype or {}
            if by_dtype:
                floating = {k: v for k, v in by_dtype.items() if k in _FLOAT_BYTES}
                other = sum(v for k, v in by_dtype.items() if k not in _FLOAT_BYTES)
                scale = b.act_bytes / max(1, sum(by_dtype.values()))  # profile bytes -> this sim's batch
            else:  # older profiles: assume the block saves bf16/fp16
                floating, other, scale = {"bfloat16": b.act_bytes}, 0.0, 1.0
            comp = sum(v * ratio(section["dtype"], _FLOAT_BYTES[k]) for k, v in floating.items())
            orig = sum(floating.values())
            kept = (comp + other) * scale
            total_saved += b.kept - kept
            b.mode = "compress+offload" if b.mode == "offload" else "compress"
            b.kept_bytes = kept
            b.bwd_extra_bytes = max(b.bwd_extra_bytes, BWD_LIVE_SHARE * b.act_bytes)
            # pack: read the original, write the codes; unpack: the reverse
            b.extra_fwd_s += OVERHEAD_FACTOR * (orig + comp) * scale / bw
            b.extra_bwd_s += OVERHEAD_FACTOR * (orig + comp) * scale / bw
        sim.lossy.append("compress")
        sim.notes.append(f"compress: {section['dtype']} saved activations of {len(names)} block(s), "
                         f"{format_bytes(total_saved)} less kept per micro-batch")

    # --- the live run -----------------------------------------------------------------------------
    def apply(self, ctx: ApplyContext, section: dict[str, Any]) -> Undo:
        from memtune.kernels.activation_quant import fp8_supported

        names = ctx.resolve(section["blocks"], "compress.blocks")
        ck = ctx.plan.get("checkpoint") if ctx.plan is not None else None
        if ck and "blocks" in ck:
            recomputed = set(ctx.resolve(ck["blocks"], "checkpoint.blocks"))
            both = [n for n in names if n in recomputed]
            if both:
                raise PlanError(f"compress: blocks {both} are recomputed by checkpoint; take them out of one section")
        dtype = section["dtype"]
        if dtype == "fp8" and ctx.device.type == "cuda" and not fp8_supported(ctx.device):
            raise EnvironmentNotSupported("compress.dtype fp8 needs a GPU with fp8 (compute capability >= 8.9): "
                                          "use dtype: int8")
        min_size = section.get("min_size", DEFAULT_MIN_SIZE)
        params = {p.data_ptr() for p in ctx.model.parameters()} | {b.data_ptr() for b in ctx.model.buffers()}
        pack, unpack = make_codec(dtype, min_size, params)
        codecs = ctx.shared.setdefault("saved_tensor_codecs", {})
        offloaded = set(ctx.shared.get("offloaded_blocks", ()))
        undos = []
        for name in names:
            codecs[name] = (pack, unpack)
            if name in offloaded:
                continue  # offload's hooks call the codec around the host copy
            undos.append(_wrap_forward(ctx.module(name), pack, unpack))
        ctx.note("compress", f"{dtype} saved activations (>= {format_bytes(min_size)}) of {len(names)} block(s)"
                 + (f"; {len(names) - len(undos)} through offload's hooks" if len(undos) < len(names) else ""))

        def undo() -> None:
            for u in reversed(undos):
                u()
            for name in names:
                codecs.pop(name, None)

        return undo


def _wrap_forward(module: torch.nn.Module, pack, unpack) -> Undo:
    def make(inner):
        def forward(*args, **kwargs):
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                return inner(*args, **kwargs)

        return forward

    return wrap_forward(module, make)


def _has_fp8(profile) -> bool:
    name = (profile.hardware.gpu_name or "").upper()
    return any(k in name for k in ("H100", "H200", "H800", "H20", "L4", "L40", "RTX 40", "B100", "B200", "GB200"))
