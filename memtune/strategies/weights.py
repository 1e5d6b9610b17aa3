"""Frozen weights stored quantized: the nn.Linear weights that do not require grad (a LoRA/QLoRA-style
fine-tune's frozen base) kept in bf16, int8 (per-row absmax, LLM.int8's weight format) or NF4 (QLoRA's 4-bit
NormalFloat, block 64, optionally double-quantized scales), chosen per block or per module class. Lossy.

```yaml
weights: {format: nf4}                                # every repeated block's frozen Linears, NF4 + double quant
weights: {blocks: [0, "2-5"], format: int8}           # chosen blocks, like the other block strategies
weights: {blocks: {all: nf4, lm_head: int8}}          # a format per block reference (later entries win)
weights: {format: nf4, classes: {LlamaMLP: int8, LlamaAttention: keep}}  # per module class (nearest wins)
weights: {format: nf4, double_quant: false, kernel: fused}
```
Formats: bf16 (2 B/param), int8 (1 + 4/in B/param), nf4 (0.515869 B/param with double quantization, 0.5625
without), keep (leave as the script has it). `classes` names the class of the Linear or of a module above it
(LlamaMLP, LlamaDecoderLayer, ...); the nearest such module decides, and it wins over `blocks`. `blocks: all`
is every repeated block; other blocks (an untied, frozen `lm_head`) are named by path.

What `apply` does to each chosen nn.Linear whose weight does not require grad: the weight is quantized on
its device (memtune/kernels: nf4.py, int8_weight.py), the Parameter's storage is freed, and the module's
forward becomes `memtune.kernels.frozen_linear.frozen_linear` (dequantize into one workspace shared by all
layers + cuBLAS; or with `kernel: fused` an NF4 GEMM that dequantizes inside its K loop). Trainable
parameters, biases and adapters are untouched: beside the base Linear (a hand-written LoRA) or around it
(peft's `lora.Linear`, whose `base_layer` is the nn.Linear quantized here). A frozen weight has no master
copy, optimizer state or gradient. Left alone, each with a note: weights that require grad, weights shared
with another module (tied embeddings), Linear subclasses with their own forward or whose parent reads the
weight (MultiheadAttention's out_proj), modules whose forward is already patched (accelerate hooks), the
base of a peft DoRA layer (DoRA reads the base weight), the head of the plan's fused loss (it reads the
head's weight). The search space has one format choice per repeated block class; other blocks are named
by hand.

While applied:
- `module.weight` is a placeholder of the weight's shape, dtype and device: one NaN element seen through a
  stride-0 view, so code that reads the weight instead of calling the module gets NaN rather than silent
  zeros, and writing to it fails. The slot in `module._parameters` is None, so `parameters()` leaves the
  frozen weight out (other sections, e.g. precision's casts and master copies, never see it).
- `state_dict()` keeps every key, in order: `<prefix>weight` is the weight dequantized to its original dtype,
  on the CPU (a full state_dict, as peft's `save_pretrained` takes before filtering the adapters, costs host
  memory and one dequantize per layer, not GPU memory). `load_state_dict` of a tensor under that key
  quantizes it into the module's format (shape checked).
- `model.to(device)` leaves the quantized weight where it is; the next forward moves it to its input's device.
Undo puts the Parameter objects back holding the dequantized values (lossy: the original bits are not
kept); at the end of a `memtune apply` run nothing is restored.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memtune.blocks import refs_to_yaml, resolve_block_refs, unwrap_model, validate_block_refs
from memtune.costmodel import SimStep, drop_autocast_copies
from memtune.errors import PlanError
from memtune.plan import SectionConfig, check_bool, check_choice, check_keys
from memtune.strategies.base import ApplyContext, PlanFacts, SearchOptions, Strategy, register
from memtune.strategies.layout import compact
from memtune.undo import Undo, Undos, replace_on_instance
from memtune.units import format_bytes

FORMATS = ("keep", "bf16", "int8", "nf4")
KERNELS = ("dequant", "fused")
KEYS = {"format": "keep | bf16 | int8 | nf4 (default nf4) for the frozen Linears of `blocks`",
        "blocks": "block references ('all', indices, 'a-b', module paths; default all), or a mapping "
                  "{block reference: format}",
        "classes": "mapping {module class name: format}: the Linear's own class or a module's above it",
        "double_quant": "true (default): NF4 block scales in 8 bits (groups of 256), as QLoRA",
        "kernel": "dequant (default: dequantize into a workspace, then cuBLAS) | fused (NF4 Triton GEMM)"}
_ELEM = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_LOW = ("bfloat16", "float16", "bf16", "fp16", "half", "torch.bfloat16", "torch.float16")

# Sources of the cost model's numbers:
#   [fmt]   bytes per parameter computed from the formats (memtune.kernels.frozen_linear.bytes_per_param):
#           nf4 + double quant 0.5 + 1/64 + 4/(64*256) = 0.515869; nf4 0.5625; int8 1 + 4/in; bf16 2.
#   [bench] benchmarks/weights.py on the profile's GPU: forward + input gradient of a 4096 x 11008 layer at
#           8192 tokens, ours minus bf16 cuBLAS, per parameter (read from its results file when present).
#   [bw]    otherwise one dequantize pass in forward and one in backward, each reading the stored bytes and
#           writing the compute dtype, at the profile's device-copy bandwidth x KERNEL_EFFICIENCY (the
#           activation_quant pack/unpack kernels, the same kind of single memory-bound pass, reach 80-94% of
#           it on an H100: benchmarks/compress.py).
KERNEL_EFFICIENCY = 0.8
CPU_GBPS = 20.0  # a CPU profile: the torch reference runs at host memory speed
# The workspace holds the largest quantized layer in the compute dtype. A Llama block's largest Linear (the
# MLP's 11008 x 4096) is 22% of its weights, a GPT block's (4d x d) 33%: the estimate takes a third of the
# largest quantized block's frozen parameters.
LARGEST_LINEAR_SHARE = 1 / 3
# A class's frozen bytes are worth a search choice when they are at least this share of the profiled peak.
WORTH_SHARE = 0.01
RESULTS_ENV = "MEMTUNE_WEIGHTS_BENCH"
RESULTS_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "weights_results.json"

Refs = tuple[int | str, ...] | str
TRAINABLE = "trainable weight"


@dataclass(frozen=True)
class WeightsConfig(SectionConfig):
    # (block references, format) in the order written: a later entry wins for a block named twice
    blocks: tuple[tuple[Refs, str], ...] = (("all", "nf4"),)
    classes: tuple[tuple[str, str], ...] = ()  # (module class name, format)
    double_quant: bool = True
    kernel: str | None = None  # None: dequant

    @property
    def lossy(self) -> bool:
        return any(f != "keep" for _, f in self.blocks + self.classes)

    @property
    def kernel_name(self) -> str:
        return self.kernel or "dequant"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if len(self.blocks) == 1:
            refs, fmt = self.blocks[0]
            out["blocks"] = refs_to_yaml(refs)
            out["format"] = fmt
        elif self.blocks:
            out["blocks"] = {r: fmt for refs, fmt in self.blocks for r in (["all"] if refs == "all" else refs)}
        if self.classes:
            out["classes"] = dict(self.classes)
        if not self.double_quant:
            out["double_quant"] = False
        if self.kernel is not None:
            out["kernel"] = self.kernel
        return out

    def describe(self) -> str:
        def name(fmt: str) -> str:
            return "nf4 (8-bit scales)" if fmt == "nf4" and self.double_quant else fmt

        parts = [f"{name(f)} in blocks {refs_to_yaml(r)}" for r, f in self.blocks if f != "keep"]
        parts += [f"{name(f)} in {c}" for c, f in self.classes if f != "keep"]
        if not parts:
            return "unchanged"
        extra = ", fused NF4 GEMM" if self.kernel == "fused" else ""
        return "frozen Linear weights " + "; ".join(parts) + extra


def _check_format(value: Any, where: str) -> str:
    return check_choice(value, FORMATS, where)


@register
class Weights(Strategy):
    name = "weights"
    order = 15  # before precision: its casts and fp32 masters never see the quantized (unregistered) weights
    summary = "frozen Linear weights stored in bf16 / int8 / NF4, dequantized per layer (lossy)"

    # --- the plan section -------------------------------------------------------------------------
    def validate(self, section: Any) -> WeightsConfig:
        if section is None:
            section = {}
        if isinstance(section, str):
            section = {"format": section}
        if not isinstance(section, dict):
            raise PlanError("weights: give a mapping, e.g. {format: nf4} or {blocks: {all: nf4, lm_head: int8}}")
        check_keys(section, KEYS, "weights")
        fmt = section.get("format")
        if fmt is not None:
            _check_format(fmt, "weights.format")
        raw = section.get("blocks")
        entries: list[tuple[Refs, str]] = []
        if isinstance(raw, dict):
            if fmt is not None:
                raise PlanError("weights: give either `blocks` as a mapping {block: format} or `blocks` with "
                                "`format`, not both")
            for ref, f in raw.items():
                where = f"weights.blocks[{ref!r}]"
                entries.append((validate_block_refs(ref, where), _check_format(f, where)))
        elif raw is not None:
            entries.append((validate_block_refs(raw, "weights.blocks"), fmt or "nf4"))
        elif fmt is not None or "classes" not in section:
            entries.append(("all", fmt or "nf4"))
        classes = section.get("classes") or {}
        if not isinstance(classes, dict):
            raise PlanError("weights.classes: give a mapping {module class name: format}, e.g. {LlamaMLP: int8}")
        cls_entries = []
        for cls, f in classes.items():
            if not isinstance(cls, str) or not cls.isidentifier():
                raise PlanError(f"weights.classes: {cls!r} is not a class name (e.g. LlamaMLP, Linear)")
            cls_entries.append((cls, _check_format(f, f"weights.classes.{cls}")))
        dq = section.get("double_quant", True)
        check_bool(dq, "weights.double_quant")
        kernel = section.get("kernel")
        if kernel is not None:
            check_choice(kernel, KERNELS, "weights.kernel")
        return WeightsConfig(blocks=tuple(entries), classes=tuple(cls_entries), double_quant=dq, kernel=kernel)

    def conflicts(self, config: WeightsConfig, facts: PlanFacts) -> list[str]:
        out = []
        if config.lossy and facts.sharding_stage and facts.sharding_stage >= 2:
            out.append(f"weights: sharding stage {facts.sharding_stage} (FSDP2) shards registered parameters; the "
                       "quantized frozen weights are not parameters while applied: use sharding stage 1 or drop one")
        if config.lossy and facts.params_dtype:
            # The live run would work (precision never sees the quantized weights), but precision's cost-model
            # effect halves every fp32 byte of the profile, frozen ones included, after this section has
            # replaced them: the estimate would count those bytes twice.
            out.append(f"weights with precision params: {facts.params_dtype} cannot be estimated together yet "
                       "(precision's cost model would halve frozen fp32 weights that weights already stores "
                       "quantized): use precision {autocast: bf16} with weights (adapters stay fp32), or drop one")
        return out

    # --- search -----------------------------------------------------------------------------------
    def space(self, trial: Any, profile: Any, layout: Any, opts: SearchOptions) -> dict[str, Any] | None:
        if opts.lossless_only:
            return None
        min_bytes = max(2**20, WORTH_SHARE * _reference_bytes(profile))
        rep = profile.repeated_blocks
        by_cls: dict[str, list[int]] = {}
        for i, bp in enumerate(rep):
            if bp.frozen_param_bytes > 0:
                by_cls.setdefault(bp.cls, []).append(i)
        blocks: dict[int | str, str] = {}
        for cls, idx in by_cls.items():
            if sum(rep[i].frozen_param_bytes for i in idx) < min_bytes:
                continue
            fmt = trial.suggest_categorical(f"weights.{cls}", _choices(rep[idx[0]]))
            if fmt != "keep":
                refs = compact(idx, len(rep))
                for r in ["all"] if refs == "all" else refs:
                    blocks[r] = fmt
        # Other blocks (an untied frozen lm_head) are left to the plan's author: the fused loss reads its head's
        # weight, so a plan with both leaves that head alone at apply time, which the estimate cannot see.
        if not blocks:
            return None
        if len(blocks) == 1:
            (ref, fmt), = blocks.items()
            return {"blocks": ref if ref == "all" else [ref], "format": fmt}
        return {"blocks": blocks}

    def lossy_seed(self, profile: Any, opts: SearchOptions) -> dict[str, Any]:
        if opts.lossless_only:
            return {}
        min_bytes = max(2**20, WORTH_SHARE * _reference_bytes(profile))
        by_cls: dict[str, list[Any]] = {}
        for bp in profile.repeated_blocks:
            if bp.frozen_param_bytes > 0:
                by_cls.setdefault(bp.cls, []).append(bp)
        return {f"weights.{cls}": "nf4" for cls, bps in by_cls.items()
                if sum(b.frozen_param_bytes for b in bps) >= min_bytes and "nf4" in _choices(bps[0])}

    # --- cost model -------------------------------------------------------------------------------
    def effect(self, profile: Any, config: WeightsConfig, sim: Any) -> None:
        fmts = profile_formats(profile, config)
        known = {b.cls for b in profile.blocks}
        unknown = [c for c, f in config.classes if c not in known and f != "keep"]
        by_name = {b.name: b for b in sim.blocks}
        low = (profile.autocast or "").lower() in _LOW
        timing, how = _kernel_timing(profile, config)
        saved_total = ws_bytes = 0.0
        counts: Counter[str] = Counter()
        for bp in profile.blocks:
            fmt = fmts.get(bp.name, "keep")
            b = by_name.get(bp.name)
            if fmt == "keep" or b is None or bp.frozen_param_bytes <= 0 or not _linear_like(bp):
                continue
            dname, elem = frozen_dtype(bp)
            n = bp.frozen_param_bytes / elem
            in_features = max(64, int(math.sqrt(n / 12))) if bp.kind == "repeated" else 4096
            new = n * _bytes_per_param(fmt, in_features, config.double_quant)
            saved = max(0.0, bp.frozen_param_bytes - new)  # [fmt]
            b.param_bytes = max(0.0, b.param_bytes - saved)
            sim.param_bytes -= saved
            saved_total += saved
            counts[fmt] += 1
            if low and dname == "float32" and b.autocast_copy_bytes > 0:
                # autocast no longer casts these weights, so their 16-bit copies are not saved [amp]
                fp32 = bp.param_bytes.get("float32", 0)
                drop_autocast_copies(SimStep(blocks=[b]), min(1.0, bp.frozen_param_bytes / fp32) if fp32 else 0.0)
            ce = 2 if low else elem  # the compute dtype's element size
            if fmt == "bf16" and ce == 2:
                continue  # used as stored: no workspace, no kernel
            if config.kernel_name == "dequant":
                ws_bytes = max(ws_bytes, n * LARGEST_LINEAR_SHARE * ce)
            fwd_s, bwd_s = timing(fmt, n, ce)
            b.extra_fwd_s += fwd_s
            b.extra_bwd_s += bwd_s
        sim.param_bytes += ws_bytes  # the shared workspace lives for the whole run
        sim.lossy.append(self.name)
        sim.source(self.name, how)
        what = ", ".join(f"{f} in {k} block(s)" for f, k in sorted(counts.items()))
        sim.notes.append(f"weights: frozen Linear weights {what or 'unchanged'}: {format_bytes(saved_total)} less; "
                         f"workspace {format_bytes(ws_bytes)}")
        if unknown:
            sim.notes.append(f"weights: classes {', '.join(unknown)} are not block classes of the profile: "
                             "their share of a block is unknown, so the estimate leaves them out")

    # --- the live run -----------------------------------------------------------------------------
    def apply(self, ctx: ApplyContext, config: WeightsConfig) -> Undo:
        from memtune.kernels.frozen_linear import Workspace

        targets, skipped = select_linears(ctx, config)
        ws = Workspace()
        before = after = 0
        counts: Counter[str] = Counter()
        with Undos() as undos:
            for path, mod, fmt in targets:
                undo, b0, b1 = quantize_linear(mod, fmt, config, ws, lambda: ctx.run_over, device=ctx.device)
                undos.add(undo, path)
                before, after = before + b0, after + b1
                counts[fmt] += 1
            undos.add(ws.release, "workspace")
        what = ", ".join(f"{k} {f}" for f, k in sorted(counts.items())) or "none"
        ctx.note(self.name, f"frozen Linear weights quantized: {what}; {format_bytes(before)} -> "
                            f"{format_bytes(after)}; compute: "
                            + ("fused NF4 GEMM (nf4 on Triton devices), dequantize + matmul otherwise"
                               if config.kernel == "fused" else "dequantize into a shared workspace + matmul"))
        trainable = skipped.pop(TRAINABLE, [])
        if trainable:
            ctx.note(self.name, f"{len(trainable)} trainable Linear weight(s) untouched (adapters and the like)")
        for reason, paths in skipped.items():
            shown = ", ".join(paths[:4]) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")
            ctx.note(self.name, f"left alone ({reason}): {shown}")
        return undos


# --- shared by effect, space and apply ------------------------------------------------------------------


def _bytes_per_param(fmt: str, in_features: int, double_quant: bool) -> float:
    from memtune.kernels.frozen_linear import bytes_per_param

    return bytes_per_param(fmt, in_features, double_quant)


def _reference_bytes(profile: Any) -> float:
    if profile.peak.allocated_bytes:
        return float(profile.peak.allocated_bytes)
    acts = sum(b.activation_bytes for b in profile.blocks)
    return float(profile.param_bytes + profile.grad_bytes + profile.optimizer_state_bytes + acts)


def _linear_like(bp: Any) -> bool:
    """Blocks whose frozen parameters are (mostly) Linear weights: repeated layers, and other pieces that
    are not embeddings or norms (an untied lm_head, a frozen projector)."""
    if bp.kind == "repeated":
        return True
    low = bp.cls.lower()
    return not any(k in low for k in ("embedding", "norm"))


def frozen_dtype(bp: Any) -> tuple[str, int]:
    """(dtype name, element size) of a block's frozen parameters: the dtype whose bytes are nearest above
    the frozen bytes (a bf16 base with fp32 adapters: bf16), else the block's largest dtype."""
    frozen = bp.frozen_param_bytes
    by = {k: v for k, v in (bp.param_bytes or {}).items() if k in _ELEM}
    fits = sorted((v - frozen, k) for k, v in by.items() if v >= frozen * 0.999)
    if fits:
        name = fits[0][1]
    elif by:
        name = max(by, key=by.get)
    else:
        name = "float32"
    return name, _ELEM[name]


def _choices(bp: Any) -> list[str]:
    return ["keep", "bf16", "int8", "nf4"] if frozen_dtype(bp)[1] > 2 else ["keep", "int8", "nf4"]


def block_formats(config: WeightsConfig, repeated: list[str], all_blocks: list[str]) -> dict[str, str]:
    """Block name -> format from the section's `blocks` entries (later entries win)."""
    out: dict[str, str] = {}
    for refs, fmt in config.blocks:
        for name in resolve_block_refs(refs, repeated, all_blocks, "weights.blocks"):
            out[name] = fmt
    return out


def profile_formats(profile: Any, config: WeightsConfig) -> dict[str, str]:
    """Block name -> format on a profile: `blocks` entries, then `classes` naming a block's own class."""
    out = block_formats(config, [b.name for b in profile.repeated_blocks], [b.name for b in profile.blocks])
    classes = dict(config.classes)
    for bp in profile.blocks:
        if bp.cls in classes:
            out[bp.name] = classes[bp.cls]
    return out


def _load_results() -> dict[str, Any] | None:
    path = Path(os.environ.get(RESULTS_ENV) or RESULTS_FILE)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _kernel_timing(profile: Any, config: WeightsConfig):
    """(timing(fmt, n_params, compute_bytes) -> (fwd_s, bwd_s), how it was computed)."""
    res = _load_results()
    gpu = (profile.hardware.gpu_name or "").strip().lower()
    measured: dict[str, float] = {}
    if res and gpu and str(res.get("gpu", "")).strip().lower() == gpu:
        for fmt, row in (res.get("overhead_s_per_param") or {}).items():
            v = row.get(config.kernel_name) if isinstance(row, dict) else None
            if isinstance(v, (int, float)):
                measured[fmt] = max(0.0, float(v))
    gbps = profile.hardware.d2d_gbps or 0.0
    cpu = gbps <= 0
    bw = (CPU_GBPS if cpu else gbps) * 1e9 * KERNEL_EFFICIENCY

    def timing(fmt: str, n: float, ce: float) -> tuple[float, float]:
        if fmt in measured:  # [bench]: forward + input gradient together, split evenly
            return measured[fmt] * n / 2, measured[fmt] * n / 2
        one = n * (_bytes_per_param(fmt, 4096, config.double_quant) + ce) / bw  # [bw]
        return one, one

    if measured:
        how = f"measured: benchmarks/weights.py on {res.get('gpu')} ({config.kernel_name}) for " + \
              ", ".join(sorted(measured))
    else:
        how = (f"formula: one dequantize pass each in forward and backward at "
               f"{'a CPU fallback of ' + str(CPU_GBPS) if cpu else f'{gbps:.0f}'} GB/s x {KERNEL_EFFICIENCY}; "
               f"bytes per parameter from the formats")
    return timing, how


# --- the live model --------------------------------------------------------------------------------------


def _why_not(m: torch.nn.Module, parent: torch.nn.Module | None, uses: Counter[int], dora: set[int]) -> str | None:
    w = m._parameters.get("weight")
    if "_memtune_weights" in m.__dict__:
        return "already quantized"
    if w is None:
        return "no weight"
    if w.requires_grad:
        return TRAINABLE
    if not w.is_floating_point() or w.is_meta or w.numel() == 0:
        return "not a floating weight on a device"
    if uses[id(w)] > 1:
        return "weight shared with another module (tied)"
    if type(m).forward is not torch.nn.Linear.forward or isinstance(m, torch.nn.modules.linear.NonDynamicallyQuantizableLinear) \
            or isinstance(parent, torch.nn.MultiheadAttention):
        return "a Linear whose own class or parent reads the weight"
    if "forward" in m.__dict__:
        return "forward already patched (e.g. accelerate hooks)"
    if id(m) in dora:
        return "base of a peft DoRA layer (DoRA reads the base weight)"
    return None


def _fused_loss_head(ctx: ApplyContext, model: torch.nn.Module) -> torch.nn.Module | None:
    """The head the plan's fused loss will use (it computes the logits from the head's weight itself)."""
    cfg = ctx.plan.get("loss")
    if cfg is None or not getattr(cfg, "fused", False):
        return None
    from memtune.strategies.loss import find_head

    try:
        return find_head(model, cfg.head)[1]
    except PlanError:  # the loss section reports it
        return None


def select_linears(ctx: ApplyContext, config: WeightsConfig) -> tuple[list[tuple[str, Any, str]], dict[str, list[str]]]:
    """The nn.Linear modules to quantize as (path, module, format), and the chosen ones left alone by reason."""
    model = unwrap_model(ctx.model)
    bf = block_formats(config, ctx.repeated, ctx.block_names)
    classes = dict(config.classes)
    modules = dict(model.named_modules())
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    dora = {id(getattr(m, "base_layer", None)) for m in modules.values()
            if isinstance(getattr(m, "use_dora", None), dict) and any(m.use_dora.values())}
    blocks = sorted(bf, key=len, reverse=True)
    targets: list[tuple[str, Any, str]] = []
    skipped: dict[str, list[str]] = {}
    loss_head = _fused_loss_head(ctx, model)
    for path, m in modules.items():
        if not isinstance(m, torch.nn.Linear):
            continue
        fmt = None
        p: str | None = path
        while p is not None:  # the nearest module (itself first) whose class is named
            mod = modules.get(p)
            if mod is not None and type(mod).__name__ in classes:
                fmt = classes[type(mod).__name__]
                break
            p = (p.rsplit(".", 1)[0] if "." in p else "") if p else None
        if fmt is None:
            block = next((b for b in blocks if b == "" or path == b or path.startswith(b + ".")), None)
            fmt = bf.get(block) if block is not None else None
        if fmt in (None, "keep"):
            continue
        parent = modules.get(path.rsplit(".", 1)[0] if "." in path else "") if path else None
        why = "the fused loss's head (the loss section reads its weight)" if m is loss_head else \
            _why_not(m, parent, uses, dora)
        if why:
            skipped.setdefault(why, []).append(path or type(m).__name__)
            continue
        targets.append((path, m, fmt))
    return targets, skipped


def _placeholder(dtype: torch.dtype, device: torch.device, shape: torch.Size) -> torch.Tensor:
    """The weight's shape, dtype and device over one NaN element (stride 0): reads give NaN, writes fail."""
    return torch.full((1,), float("nan"), dtype=dtype, device=device).expand(shape)


def quantize_linear(m: torch.nn.Module, fmt: str, config: WeightsConfig, ws: Any, run_over=lambda: False,
                    backend: str = "auto", device: torch.device | None = None) -> tuple[Undo, int, int]:
    """Quantize one frozen nn.Linear in place: (undo, bytes before, bytes after). A host weight of a model
    the plan places on an accelerator (`device`: placement deferred the script's move) is quantized there, one
    weight at a time: the device kernels instead of the host reference (minutes for a 7B base), and the
    device never holds more than one unquantized weight."""
    from memtune.kernels.frozen_linear import frozen_linear, quantize_weight

    w = m._parameters["weight"]
    dtype, shape = w.dtype, w.shape
    before = w.numel() * w.element_size()
    src = w.detach()
    if device is not None and device.type != "cpu" and src.device.type == "cpu":
        src = src.to(device)
    with torch.no_grad():
        q = quantize_weight(src, fmt, config.double_quant, backend)
    del src
    home = q.device
    state = {"q": q}
    kernel = config.kernel_name
    dq = config.double_quant

    def forward(input: torch.Tensor) -> torch.Tensor:
        if state["q"].device != input.device:  # the model moved after apply: the weight follows
            state["q"] = state["q"].to(input.device)
            m.__dict__["weight"] = _placeholder(dtype, input.device, shape)
        return frozen_linear(input, state["q"], m.bias, workspace=ws, backend=backend, kernel=kernel)

    cls_save = m._save_to_state_dict
    cls_load = m._load_from_state_dict

    def save(destination, prefix, keep_vars):
        destination[prefix + "weight"] = state["q"].dequantize(dtype).to("cpu")
        cls_save(destination, prefix, keep_vars)

    def load(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            t = state_dict.pop(key)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {got} from checkpoint, "
                                  f"the shape in current model is {tuple(shape)}.")
            else:
                with torch.no_grad():
                    state["q"] = quantize_weight(t.to(device=state["q"].device, dtype=dtype), fmt, dq, backend)
        elif strict:
            missing_keys.append(key)
        cls_load(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    with Undos() as undos:
        m._parameters["weight"] = None
        w.data = torch.empty(0, dtype=dtype, device=w.device)  # frees the weight's storage
        m.__dict__["weight"] = _placeholder(dtype, home, shape)

        def restore() -> None:
            m.__dict__.pop("weight", None)
            if not run_over():
                with torch.no_grad():
                    w.data = state["q"].dequantize(dtype).reshape(shape)
            m._parameters["weight"] = w

        undos.add(restore, "weight")
        undos.add(replace_on_instance(m, "forward", forward))
        undos.add(replace_on_instance(m, "_save_to_state_dict", save))
        undos.add(replace_on_instance(m, "_load_from_state_dict", load))
        undos.add(replace_on_instance(m, "_memtune_weights", state))

    def undo() -> None:
        if run_over():  # the script has ended: leave the module quantized
            return
        undos()

    return undo, before, q.nbytes
