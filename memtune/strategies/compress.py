"""Activation compression: the saved tensors of chosen blocks are kept quantized between forward and
backward (int8 with a per-group absmax scale, or fp8 e4m3), in the spirit of Mesa (Pan et al. 2021) and
COAT (Xi et al. 2024). Lossy.

```yaml
compress: {blocks: [4, 5, 6, 7], dtype: int8}        # or blocks: all; dtype: fp8 on GPUs with e4m3
compress: {blocks: all, dtype: int8, min_size: 1MiB} # smaller saved tensors stay as they are
```
Only floating tensors of at least `min_size` are quantized; integer tensors, small ones, parameters and
their autocast copies stay as they are. A block that `checkpoint` recomputes is refused (nothing of it is
saved: strategies/layout.py). The codec is a stage of the block's saved-tensor pipeline
(strategies/saved_tensors.py); with `offload` of the same block the compressed bytes are what goes to the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memtune.blocks import refs_to_yaml, validate_block_refs
from memtune.costmodel import measured_mode, note_sources
from memtune.errors import EnvironmentNotSupported, PlanError
from memtune.plan import SectionConfig, check_choice, check_keys
from memtune.strategies.base import ApplyContext, SearchOptions, Strategy, register
from memtune.strategies.layout import COMPRESSED, compact
from memtune.undo import Undo
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


@dataclass(frozen=True)
class CompressConfig(SectionConfig):
    blocks: tuple[int | str, ...] | str
    dtype: str = "int8"
    min_size: int | None = None

    @property
    def lossy(self) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"blocks": refs_to_yaml(self.blocks), "dtype": self.dtype}
        if self.min_size is not None:
            out["min_size"] = self.min_size
        return out

    def describe(self) -> str:
        return f"{self.dtype} saved activations of blocks {refs_to_yaml(self.blocks)}"


@register
class Compress(Strategy):
    name = "compress"
    order = 60
    summary = "keep chosen blocks' saved activations quantized (int8/fp8) until backward (lossy)"

    def validate(self, section: Any) -> CompressConfig:
        if not isinstance(section, dict):
            raise PlanError("compress: give a mapping, e.g. {blocks: all, dtype: int8}")
        check_keys(section, KEYS, "compress")
        if "blocks" not in section:
            raise PlanError("compress: `blocks` is required, e.g. {blocks: [0, 1], dtype: int8}")
        min_size = None
        if "min_size" in section:
            try:
                min_size = parse_size(section["min_size"])
            except Exception as e:
                raise PlanError(f"compress.min_size: {e}") from None
        return CompressConfig(blocks=validate_block_refs(section["blocks"], "compress.blocks"),
                              dtype=check_choice(section.get("dtype", "int8"), DTYPES, "compress.dtype"),
                              min_size=min_size)

    def block_modes(self, config: CompressConfig) -> dict[str, Any]:
        return {"compress": config.blocks}

    # --- search and cost model --------------------------------------------------------------------
    def space(self, trial: Any, profile, layout: Any, opts: SearchOptions) -> dict[str, Any] | None:
        if opts.lossless_only:
            return None
        blocks = compact(layout.blocks(*COMPRESSED), len(profile.repeated_blocks))
        if not blocks:
            return None
        dtypes = ["int8"] + (["fp8"] if _has_fp8(profile) else [])
        return {"blocks": blocks, "dtype": trial.suggest_categorical("compress.dtype", dtypes)}

    def effect(self, profile, config: CompressConfig, sim) -> None:
        """What the codec keeps and costs: the profiler's measurement of this block's class compressed [whatif]
        when it has one (int8; fp8 codes are the same size), else the codec's ratio on the block's floating
        saved bytes and its kernel traffic at the measured copy bandwidth."""
        from memtune.kernels.activation_quant import ratio

        names = profile.resolve_blocks(config.blocks, "compress.blocks")
        gbps = profile.hardware.d2d_gbps or 0.0
        if gbps <= 0:  # CPU profile or no measurement: the torch reference runs at host memory speed
            gbps = 20.0
        bw = gbps * 1e9 * KERNEL_EFFICIENCY
        by_name = {b.name: b for b in sim.blocks}
        total_saved = 0.0
        measured, formula = [], []
        for name in names:
            b = by_name.get(name)
            if b is None:
                continue
            m = measured_mode(profile, b, "compress")
            if m is not None:
                measured.append(name)
                kept = b.kept * m.kept_share()
                total_saved += b.kept - kept
                b.mode = "compress+offload" if b.mode == "offload" else "compress"
                b.kept_bytes = kept
                b.bwd_extra_bytes = max(b.bwd_extra_bytes, m.extra_bwd_peak())
                b.extra_fwd_s += m.extra_fwd_s()
                b.extra_bwd_s += m.extra_bwd_s()
                continue
            formula.append(name)
            bp = profile.block(name)
            by_dtype = bp.activation_bytes_by_dtype or {}
            if by_dtype:
                floating = {k: v for k, v in by_dtype.items() if k in _FLOAT_BYTES}
                other = sum(v for k, v in by_dtype.items() if k not in _FLOAT_BYTES)
                scale = b.act_bytes / max(1, sum(by_dtype.values()))  # profile bytes -> this sim's batch
            else:  # older profiles: assume the block saves bf16/fp16
                floating, other, scale = {"bfloat16": b.act_bytes}, 0.0, 1.0
            comp = sum(v * ratio(config.dtype, _FLOAT_BYTES[k]) for k, v in floating.items())
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
        sim.notes.append(f"compress: {config.dtype} saved activations of {len(names)} block(s), "
                         f"{format_bytes(total_saved)} less kept per micro-batch")
        note_sources(sim, "compress", measured, formula,
                     f"formula: codec ratio, {OVERHEAD_FACTOR:g}x its kernel traffic at {gbps:.0f} GB/s")

    # --- the live run -----------------------------------------------------------------------------
    def apply(self, ctx: ApplyContext, config: CompressConfig) -> Undo:
        from memtune.kernels.activation_quant import fp8_supported

        names = ctx.layout.names(*COMPRESSED)
        dtype = config.dtype
        if dtype == "fp8" and ctx.device.type == "cuda" and not fp8_supported(ctx.device):
            raise EnvironmentNotSupported("compress.dtype fp8 needs a GPU with fp8 (compute capability >= 8.9): "
                                          "use dtype: int8")
        min_size = config.min_size if config.min_size is not None else DEFAULT_MIN_SIZE
        params = {p.data_ptr() for p in ctx.model.parameters()} | {b.data_ptr() for b in ctx.model.buffers()}
        undo = ctx.saved_tensors.add_codec(names, make_codec(dtype, min_size, params))
        moved = [n for n in names if ctx.layout.mode(n) == "compress+offload"]
        ctx.note("compress", f"{dtype} saved activations (>= {format_bytes(min_size)}) of {len(names)} block(s)"
                 + (f"; {len(moved)} then offloaded to the host" if moved else ""))
        return undo


def _has_fp8(profile) -> bool:
    name = (profile.hardware.gpu_name or "").upper()
    return any(k in name for k in ("H100", "H200", "H800", "H20", "L4", "L40", "RTX 40", "B100", "B200", "GB200"))
