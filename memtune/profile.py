"""The Profile: what `memtune profile` measured, as a versioned JSON document (schema: docs/profile.md).

Everything downstream (cost model, search, patcher, reports) reads this. Add fields only with defaults (and
`metadata=OPTIONAL`, so that profiles written before them still load), never rename one without bumping
SCHEMA_VERSION.

The dataclasses below are the schema, in one place: loading validates a document against their type hints
(`_build`), every field required unless marked `OPTIONAL` (provenance, notes, fields added later), and a
wrong or missing field is one line naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memtune.blocks import resolve_block_refs
from memtune.errors import ProfileError

SCHEMA_VERSION = 1
# a field a profile may leave out: informational, or added to the schema after its first profiles
OPTIONAL = {"optional": True}


@dataclass
class Hardware:
    device: str = "cpu"  # "cuda" or "cpu"
    gpu_name: str | None = None
    gpu_total_bytes: int | None = None
    gpu_free_bytes: int | None = None
    driver: str | None = None
    host_ram_bytes: int = 0
    cpu_cores: int = 0
    h2d_gbps: float = 0.0  # pinned host -> device, measured
    d2h_gbps: float = 0.0  # device -> pinned host, measured
    d2d_gbps: float = 0.0  # device copy, bytes read + written
    matmul_tflops: dict[str, float] = field(default_factory=dict)  # by dtype name: "bf16", "fp32"
    # optimizer-state offload's host update: parameters per second with the script's optimizer (measured on
    # GPU profiles by profilers/probes.py `host_update_rate`; None: not measured)
    host_update_params_per_s: float | None = field(default=None, metadata=OPTIONAL)
    # ... and the one-pass AdamW (kernels/host_adamw.py) for 16-bit weights with fp32 masters, where this host
    # builds it (None: not measured, or no compiler)
    host_one_pass_params_per_s: float | None = field(default=None, metadata=OPTIONAL)
    world_size: int = 1
    allgather_gbps: float | None = None  # measured when distributed (bus bandwidth)
    reduce_scatter_gbps: float | None = None


@dataclass
class WhatIf:
    """One block of a repeated class (or a large block of a model without repeated ones) re-run by the profiler
    in one mode (profilers/probes.py), on the inputs it had in the memory step, at the profile's batch size,
    alone (nothing before or after it). Bytes are CUDA allocator readings relative to the block's own start;
    times are CUDA-event medians."""

    kept_bytes: int = field(default=0, metadata=OPTIONAL)  # allocated from the end of its forward to its backward, its output excluded
    fwd_peak_bytes: int = field(default=0, metadata=OPTIONAL)  # highest allocation above the start during its forward (output included)
    bwd_peak_bytes: int = field(default=0, metadata=OPTIONAL)  # highest allocation above the backward's start, weight gradients excluded
    fwd_s: float = field(default=0.0, metadata=OPTIONAL)
    bwd_s: float = field(default=0.0, metadata=OPTIONAL)
    moved_bytes: int = field(default=0, metadata=OPTIONAL)  # offload: bytes its saved tensors sent to the host
    # host seconds to issue its forward and its backward (medians; 0: not measured): what a mode's hooks cost
    # the host, which a host-bound script pays in its step
    fwd_host_s: float = field(default=0.0, metadata=OPTIONAL)
    bwd_host_s: float = field(default=0.0, metadata=OPTIONAL)


@dataclass
class BlockProfile:
    """One block: a repeated layer (kind="repeated") or another top-level piece (embeddings, head...)."""

    name: str  # module path inside the model, e.g. "blocks.3"
    cls: str  # class name, e.g. "Block"
    kind: str = "repeated"  # "repeated" or "other"
    index: int = 0  # position in forward execution order among all blocks
    param_bytes: dict[str, int] = field(default_factory=dict)  # by dtype name, e.g. {"float32": 4096}
    trainable_param_bytes: int = 0
    frozen_param_bytes: int = 0
    n_params: int = 0
    activation_bytes: int = 0  # saved for backward: unique storages, parameters and buffers excluded
    activation_bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    input_bytes: int = 0  # tensor inputs of the block's forward (what a checkpointed block keeps)
    # the part of input_bytes an earlier block of the step took as input too (a shared mask or position bias)
    shared_input_bytes: int = field(default=0, metadata=OPTIONAL)
    output_bytes: int = 0
    transient_bytes: int = 0  # largest allocation above the running total inside its forward
    bwd_transient_bytes: int = 0  # the same inside its backward
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    calls_per_step: int = 1  # forward calls per optimizer step (gradient accumulation multiplies this)
    # what-if probe: saved bytes of this block's class with its floating parameters and inputs in bf16,
    # under the script's autocast (what precision `params: bf16` makes of it); None when not probed
    activation_bytes_bf16_params: int | None = field(default=None, metadata=OPTIONAL)
    # what-if probes: this block's class measured in each mode the plan space can give it ("keep",
    # "recompute", "selective", "compress", "offload", "half"); empty when not probed (CPU profiles, older ones)
    what_ifs: dict[str, WhatIf] = field(default_factory=dict, metadata=OPTIONAL)


@dataclass
class OptimizerProfile:
    cls: str  # "torch.optim.adamw.AdamW"
    kind: str  # "adamw", "adam", "sgd", "adafactor", ... (lower-case class name)
    n_param_groups: int = 1
    n_params: int = 0  # elements
    param_bytes: int = 0
    state_bytes: int = 0  # after the first step
    hyperparams: dict[str, Any] = field(default_factory=dict)  # lr, betas, eps, weight_decay, fused, ...
    step_s: float = 0.0


@dataclass
class Peak:
    allocated_bytes: int = 0  # max_memory_allocated on GPU; on CPU the sum of measured parts
    reserved_bytes: int = 0
    phase: str = "unknown"  # "forward", "loss", "backward", "optimizer"
    measured: bool = True  # False on CPU: the peak is the sum of the measured parts, not an allocator read
    where: str | None = None  # the block in which it happened, when known


@dataclass
class Profile:
    schema_version: int = SCHEMA_VERSION
    memtune_version: str = field(default="", metadata=OPTIONAL)
    torch_version: str = field(default="", metadata=OPTIONAL)
    created: str = field(default="", metadata=OPTIONAL)
    script: str | None = None  # path as given
    module: str | None = None  # for `memtune profile -m pkg.mod`
    argv: list[str] = field(default_factory=list)  # the script's own arguments
    cwd: str = ""
    device: str = "cpu"
    hardware: Hardware = field(default_factory=Hardware)
    model_cls: str = ""
    blocks: list[BlockProfile] = field(default_factory=list)
    optimizers: list[OptimizerProfile] = field(default_factory=list)
    param_bytes: int = 0
    trainable_param_bytes: int = 0
    grad_bytes: int = 0
    optimizer_state_bytes: int = 0
    buffer_bytes: int = 0
    other_module_bytes: int = field(default=0, metadata=OPTIONAL)  # parameters and buffers of modules no optimizer trains (EMA copy, teacher)
    other_activation_bytes: int = 0  # saved for backward outside every block (loss, glue code)
    # the part of it saved before the first repeated block ran (a ResNet stem's max-pool indices): it lives
    # until the end of backward, not only until the loss's backward
    other_activation_before_bytes: int = field(default=0, metadata=OPTIONAL)
    loss_transient_bytes: int = 0  # largest transient between the last block's forward and backward start
    step_start_bytes: int = 0  # allocated when a step's first forward starts
    peak: Peak = field(default_factory=Peak)
    step_s: float = 0.0  # median of clean steps, taken without per-block hooks
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    optimizer_s: float = 0.0
    steps: int = 0
    warmup: int = 0
    batch_size: int | None = None
    seq_len: int | None = None
    tokens_per_step: int | None = None
    micro_batches_per_step: int = 1  # forwards per optimizer step (gradient accumulation)
    grads_persist: bool = False  # grads already allocated when a step's first forward starts
    autocast: str | None = None  # dtype name when the script runs under autocast
    # whether autocast's cache keeps each weight's cast until the region ends (`cache_enabled`; Lightning's
    # bf16-mixed turns it off): then a checkpointed block's copies outlive its saved tensors until the loss
    autocast_cache: bool = field(default=True, metadata=OPTIONAL)
    grad_scaler: bool = False
    hf_gradient_checkpointing: bool = False  # the model's own (transformers) checkpointing is on
    world_size: int = 1
    rank: int = 0
    ddp: bool = False  # the script wraps its model in DistributedDataParallel
    notes: list[str] = field(default_factory=list, metadata=OPTIONAL)
    extra: dict[str, Any] = field(default_factory=dict, metadata=OPTIONAL)  # anything a later component keeps

    # --- derived -------------------------------------------------------------------------------
    @property
    def repeated_blocks(self) -> list[BlockProfile]:
        return [b for b in self.blocks if b.kind == "repeated"]

    def resolve_blocks(self, refs: Any, where: str) -> list[str]:
        """A plan section's block references -> this profile's block names (`blocks.resolve_block_refs`)."""
        return resolve_block_refs(refs, [b.name for b in self.repeated_blocks], [b.name for b in self.blocks], where)

    def block(self, name: str) -> BlockProfile:
        for b in self.blocks:
            if b.name == name:
                return b
        raise ProfileError(f"no block named {name!r} in the profile: known blocks are {[b.name for b in self.blocks]}")

    # --- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def digest(self) -> str:
        """Short content hash, recorded in a plan's provenance."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "profile") -> Profile:
        if not isinstance(data, dict) or "schema_version" not in data:
            raise ProfileError(f"{source} is not a memtune profile: write one with `memtune profile SCRIPT`")
        if data["schema_version"] != SCHEMA_VERSION:
            raise ProfileError(
                f"{source} has profile schema {data['schema_version']!r}, this memtune reads {SCHEMA_VERSION}: "
                "profile the script again with this version"
            )
        return _build(cls, data, source, "")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        from memtune.io import read_json

        return cls.from_dict(read_json(path, "profile"), source=str(path))

    def save(self, path: str | Path) -> Path:
        from memtune.io import write_text_atomic

        return write_text_atomic(path, self.to_json())


# --- validation against the dataclasses' type hints ----------------------------------------------------


def _bad(source: str, where: str, what: str) -> ProfileError:
    return ProfileError(f"{source}: field {where} {what}: profile the script again with `memtune profile`, "
                        "or fix the field")


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    if origin is dict or tp is dict:
        return "an object"
    if dataclasses.is_dataclass(tp):
        return "an object"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(tp, str(tp))


def _got(v: Any) -> str:
    if v is None:
        return "null"
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(v), type(v).__name__)
    shown = repr(v) if not isinstance(v, (list, dict)) else ""
    return f"{kind} ({shown[:40]})" if shown else kind


def _value(tp: Any, v: Any, source: str, where: str) -> Any:
    """`v` checked against the type hint `tp` (dataclasses built); a mismatch is one ProfileError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return v
    if origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return _value(a, v, source, where)
            except ProfileError:
                continue
        raise _bad(source, where, f"must be {_describe(tp)}, got {_got(v)}")
    ok: bool
    if dataclasses.is_dataclass(tp):
        if not isinstance(v, dict):
            raise _bad(source, where, f"must be an object, got {_got(v)}")
        return _build(tp, v, source, where + ".")
    if origin is list:
        if not isinstance(v, list):
            raise _bad(source, where, f"must be {_describe(tp)}, got {_got(v)}")
        return [_value(args[0], x, source, f"{where}[{i}]") for i, x in enumerate(v)] if args else v
    if origin is dict or tp is dict:
        if not isinstance(v, dict):
            raise _bad(source, where, f"must be an object, got {_got(v)}")
        if not args:
            return v
        return {k: _value(args[1], x, source, f"{where}.{k}") for k, x in v.items()}
    if tp is bool:
        ok = isinstance(v, bool)
    elif tp is int:
        ok = isinstance(v, int) and not isinstance(v, bool)
    elif tp is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    elif tp is type(None):
        ok = v is None
    else:
        ok = isinstance(v, tp)
    if not ok:
        raise _bad(source, where, f"must be {_describe(tp)}, got {_got(v)}")
    return v


def _build(klass: Any, data: dict[str, Any], source: str = "profile", prefix: str = "") -> Any:
    """A dataclass from a JSON object, every value checked against the field's type hint; a field without
    `OPTIONAL` metadata must be present. Unknown fields are ignored (written by a newer memtune of the same
    schema)."""
    hints = typing.get_type_hints(klass)
    kwargs = {}
    for f in dataclasses.fields(klass):
        where = f"{prefix}{f.name}"
        if f.name not in data:
            if f.metadata.get("optional"):
                continue
            raise ProfileError(f"{source}: required field {where} ({_describe(hints[f.name])}) is missing: "
                               "profile the script again with `memtune profile`")
        kwargs[f.name] = _value(hints[f.name], data[f.name], source, where)
    return klass(**kwargs)
