"""A plan as the settings a framework already has (`memtune export PLAN --to hf|lightning|accelerate`).

Each plan section (or part of one) becomes a keyword of the framework's own object (transformers'
TrainingArguments, lightning's Trainer, accelerate's Accelerator) where one does the same thing, marked
approximate where the framework's implementation differs (another kernel, another wrapping), or is listed as
not expressible there. What is not expressed is returned as a plan of its own (`rest`), for the callback or
`memtune.apply_plan`, so nothing is applied twice. Needs none of the frameworks installed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memtune.errors import InputError, PlanError
from memtune.plan import Plan

TARGETS = ("hf", "lightning", "accelerate")


@dataclass(frozen=True)
class Target:
    name: str
    framework: str  # the object whose keywords these are
    obj: str  # its name as written in code
    prose: str  # its name in sentences
    imports: str  # the import line for it
    apply_with: str  # how to apply what it cannot express


_TARGETS = {
    "hf": Target("hf", "transformers.TrainingArguments", "TrainingArguments", "TrainingArguments",
                 "from transformers import TrainingArguments",
                 "Trainer(..., callbacks=[memtune.integrations.transformers.MemtuneCallback(REST)])"),
    "lightning": Target("lightning", "lightning.pytorch.Trainer", "Trainer", "lightning.Trainer",
                        "from lightning.pytorch import Trainer",
                        "Trainer(..., callbacks=[memtune.integrations.lightning.MemtuneCallback(REST)])"),
    "accelerate": Target("accelerate", "accelerate.Accelerator", "Accelerator", "Accelerator",
                         "from accelerate import Accelerator",
                         "memtune.apply_plan(model, optimizer, REST) after accelerator.prepare(...)"),
}


@dataclass
class Setting:
    """One keyword of the framework's object."""

    name: str
    value: Any  # a JSON value; for an object, the expression's text (then `expression` is true)
    section: str  # the plan part it expresses, e.g. "precision.autocast"
    exact: bool = True  # false: the framework does the same thing its own way (see note)
    note: str = ""
    expression: bool = False

    @property
    def code(self) -> str:
        return f"{self.name}={self.value if self.expression else _py(self.value)}"


@dataclass
class Unexpressed:
    """A plan part with no equivalent setting, and why (with the nearest thing the framework has, if any)."""

    part: str
    value: Any
    reason: str


@dataclass
class Export:
    target: str
    framework: str
    obj: str
    plan: str | None
    settings: list[Setting] = field(default_factory=list)
    imports: list[str] = field(default_factory=list)
    unexpressed: list[Unexpressed] = field(default_factory=list)
    rest: dict[str, Any] = field(default_factory=dict)  # the sections left for the callback / apply_plan
    rest_problem: str | None = None  # the rest does not validate as a plan on its own
    apply_with: str = ""
    lossy: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for s, obj in zip(d["settings"], self.settings, strict=True):
            s["code"] = obj.code
        return d


def _py(v: Any) -> str:
    """A JSON-like value as Python source (double-quoted strings, True/False/None)."""
    if isinstance(v, bool) or v is None:
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_py(k)}: {_py(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_py(x) for x in v) + "]"
    return repr(v)


class _Out:
    """What the section handlers write to."""

    def __init__(self, target: Target, plan: Plan):
        self.t, self.plan = target, plan
        self.settings: list[Setting] = []
        self.imports: list[str] = []
        self.unexpressed: list[Unexpressed] = []
        self.rest: dict[str, Any] = {}

    @property
    def fw(self) -> str:
        return self.t.prose

    def set(self, name: str, value: Any, section: str, *, exact: bool = True, note: str = "",
            expression: bool = False, imports: str | None = None) -> None:
        self.settings.append(Setting(name, value, section, exact, note, expression))
        if imports and imports not in self.imports:
            self.imports.append(imports)

    def cannot(self, part: str, value: Any, reason: str) -> None:
        self.unexpressed.append(Unexpressed(part, value, reason))

    def keep(self, section: str, body: dict[str, Any]) -> None:
        self.rest[section] = body


Handler = Callable[[_Out, Any], None]

# --- sections -----------------------------------------------------------------------------------------


def _block_sections(plan: Plan) -> list[str]:
    """The plan's sections besides checkpoint that give blocks a mode: they compose with memtune's own
    checkpointing only (both are stages of one saved-tensor pipeline)."""
    out = []
    off = plan.get("offload")
    if off is not None and (off.activations or off.params):
        out.append("offload")
    if plan.get("compress") is not None:
        out.append("compress")
    return out


def _precision(o: _Out, c: Any) -> None:
    t = o.t.name
    if c.params == "bf16":
        if t == "lightning" and not c.master_weights and c.cast in (None, "all") and c.autocast in ("none", "bf16"):
            o.set("precision", "bf16-true", "precision", exact=False,
                  note="Lightning casts the whole module (buffers too) to bf16 and builds it under the bf16 default "
                       "dtype; memtune casts the floating parameters and keeps buffers as they are")
            return
        nearest = {
            "hf": "bf16=True keeps fp32 weights; loading the model in bf16 (from_pretrained(..., dtype=torch.bfloat16)) "
                  "has no fp32 masters",
            "lightning": 'precision="bf16-mixed" keeps fp32 weights; "bf16-true" has no fp32 masters',
            "accelerate": 'mixed_precision="bf16" keeps fp32 weights',
        }[t]
        what = "only the matmul weights in bf16" if c.cast == "autocast" else "bf16 parameters"
        masters = " with fp32 master weights" if c.master_weights else ""
        # the whole section stays with memtune: its autocast wraps the model's forward outside the framework's
        # (accelerate patches forward before a callback runs), and `cast: autocast` checks it is on there
        o.cannot("precision", c.to_dict(), f"{o.fw} has no setting for {what}{masters} ({nearest})")
        o.keep("precision", c.to_dict())
        return
    if c.autocast == "bf16":
        if t == "hf":
            o.set("bf16", True, "precision.autocast")
        elif t == "lightning":
            o.set("precision", "bf16-mixed", "precision.autocast", exact=False,
                  note="Lightning autocasts the whole training_step, so a loss computed there (outside the model's "
                       "forward) runs under autocast too")
        else:
            o.set("mixed_precision", "bf16", "precision.autocast")
    elif c.autocast == "fp16":
        name, value = {"hf": ("fp16", True), "lightning": ("precision", "16-mixed"),
                       "accelerate": ("mixed_precision", "fp16")}[t]
        o.set(name, value, "precision.autocast", exact=False,
              note=f"{o.fw} also scales the loss with a GradScaler; memtune's fp16 autocast does not")


def _hf_checkpointing_name() -> str:
    """TrainingArguments' checkpointing keyword in the installed transformers: 5.x renamed
    `gradient_checkpointing` to `activation_checkpointing` (5.24 takes both; the old name warns until v6). Read
    from its source, not imported (importing TrainingArguments takes seconds); the new name without transformers."""
    import importlib.metadata

    try:
        src = importlib.metadata.distribution("transformers").locate_file("transformers/training_args.py")
        text = Path(str(src)).read_text(encoding="utf-8")
    except (importlib.metadata.PackageNotFoundError, OSError, UnicodeDecodeError):
        return "activation_checkpointing"
    return "activation_checkpointing" if "activation_checkpointing:" in text else "gradient_checkpointing"


def _checkpoint(o: _Out, c: Any) -> None:
    value = {"blocks": c.to_dict()["blocks"], "mode": c.mode}
    others = _block_sections(o.plan)
    if o.t.name == "hf":
        if c.blocks == "all" and c.mode == "full" and not others:
            name = _hf_checkpointing_name()
            other = ("older transformers spell it gradient_checkpointing" if name.startswith("activation")
                     else "newer transformers spell it activation_checkpointing")
            o.set(name, True, "checkpoint",
                  note="recomputes the model's checkpointable layers (a PreTrainedModel's decoder layers: the "
                       f"repeated blocks memtune finds there); {other}")
            o.set(f"{name}_kwargs", {"use_reentrant": False}, "checkpoint", note="non-reentrant, as memtune's")
            return
        if others:
            why = (f"the plan also gives blocks to {' and '.join(others)}, which composes with memtune's own "
                   "checkpointing only")
        elif c.mode != "full":
            why = ("TrainingArguments' activation checkpointing has no selective mode (keep the matmul outputs, "
                   "recompute the rest)")
        else:
            why = ("TrainingArguments' activation checkpointing recomputes every layer; this plan recomputes chosen "
                   "blocks")
    elif o.t.name == "lightning":
        why = ("lightning.Trainer has no activation-checkpointing setting outside FSDPStrategy's "
               "activation_checkpointing_policy (for a transformers model inside the LightningModule, "
               "model.gradient_checkpointing_enable() is `blocks: all`)")
    else:
        why = ("Accelerator has no activation-checkpointing setting outside FSDP "
               "(FullyShardedDataParallelPlugin(activation_checkpointing=True)); for a transformers model, "
               "model.gradient_checkpointing_enable() is `blocks: all`")
    o.cannot("checkpoint", value, why)
    o.keep("checkpoint", c.to_dict())


def _sharding_takes_optimizer_offload(plan: Plan) -> bool:
    """Sharding stage 2/3 runs the optimizer update on the host itself (FSDP2's CPUOffloadPolicy) when the
    plan's offload section asks for only that."""
    sh, off = plan.get("sharding"), plan.get("offload")
    return (sh is not None and sh.stage >= 2 and off is not None and off.optimizer_state
            and not (off.activations or off.params or off.gradients) and off.schedule == "exact")


def _offload(o: _Out, c: Any) -> None:
    d = c.to_dict()
    fw, t = o.fw, o.t.name
    rest = dict(d)
    if c.activations:
        o.cannot("offload.activations", d["activations"], f"no {fw} setting copies saved activations to the host")
    if c.optimizer_state:
        if _sharding_takes_optimizer_offload(o.plan):
            rest.pop("optimizer_state")  # said by the sharding setting's cpu_offload
        else:
            nearest = {"hf": "DeepSpeed ZeRO-Offload through a deepspeed= config, or FSDP's cpu_offload with sharding",
                       "lightning": 'strategy="deepspeed_stage_2_offload" (DeepSpeed), or FSDP with cpu_offload',
                       "accelerate": 'DeepSpeedPlugin(offload_optimizer_device="cpu"), or FSDP with cpu_offload'}[t]
            o.cannot("offload.optimizer_state", True,
                     f"{fw} offloads optimizer state only through another engine ({nearest})")
    if c.gradients:
        o.cannot("offload.gradients", True, f"no {fw} setting streams gradients to the host as backward makes them")
    if c.params:
        o.cannot("offload.params", {"params": d["params"], "prefetch": c.prefetch},
                 f"no {fw} setting streams block weights from the host outside FSDP's or DeepSpeed's own offload")
    if c.schedule != "exact":
        o.cannot("offload.schedule", c.schedule, f"no {fw} setting delays the update by one step")
    if rest.get("activations") or rest.get("optimizer_state") or rest.get("gradients") or rest.get("params"):
        o.keep("offload", rest)


def _sharding(o: _Out, c: Any) -> None:
    """Run last: the framework's sharding is set only when memtune is left nothing to apply (memtune's other
    strategies compose with its own sharding, not with a model the framework sharded before the callback)."""
    value = c.to_dict()
    folded = _sharding_takes_optimizer_offload(o.plan)
    if c.stage == 1 or o.rest:
        if o.rest:
            why = (f"the rest of the plan ({', '.join(o.rest)}) stays with memtune, which composes with its own "
                   "sharding only")
        else:
            why = {"hf": "TrainingArguments shards only the optimizer state through DeepSpeed ZeRO-1 (a deepspeed= config)",
                   "lightning": 'the nearest is strategy="deepspeed_stage_1" (DeepSpeed, another engine)',
                   "accelerate": "the nearest is a DeepSpeedPlugin(zero_stage=1) (DeepSpeed, another engine)"}[o.t.name]
        o.cannot("sharding", value, why)
        o.keep("sharding", value)
        if folded:
            o.cannot("offload.optimizer_state", True, "with sharding, FSDP's cpu_offload would carry it; "
                     "sharding stays with memtune")
            o.keep("offload", o.plan.get("offload").to_dict())
        return
    cpu = bool(c.offload) or folded
    part = "sharding" + (" + offload.optimizer_state" if cpu and not c.offload else "")
    reshard = c.stage == 3
    if o.t.name == "hf":
        cfg: dict[str, Any] = {"version": 2, "reshard_after_forward": reshard}
        if cpu:
            cfg["cpu_offload"] = True
        o.set("fsdp", True, part)
        o.set("fsdp_config", cfg, part, exact=False,
              note="FSDP2 around the model's _no_split_modules layers (memtune: every repeated block and the root); "
                   "run under torchrun or accelerate launch; transformers 4.x spells it "
                   f'fsdp="{"full_shard" if reshard else "shard_grad_op"}{" offload" if cpu else ""}"')
    elif o.t.name == "lightning":
        note = ("Lightning's FSDPStrategy is FSDP1 and shards the whole module as one unit unless given "
                "auto_wrap_policy={YourBlock}; memtune uses FSDP2 on every repeated block")
        if reshard:
            o.set("strategy", "fsdp_cpu_offload" if cpu else "fsdp", part, exact=False, note=note)
        else:
            args = 'sharding_strategy="SHARD_GRAD_OP"' + (", cpu_offload=True" if cpu else "")
            o.set("strategy", f"FSDPStrategy({args})", part, exact=False, note=note, expression=True,
                  imports="from lightning.pytorch.strategies import FSDPStrategy")
    else:
        args = f"fsdp_version=2, reshard_after_forward={reshard}" + (", cpu_offload=True" if cpu else "")
        o.set("fsdp_plugin", f"FullyShardedDataParallelPlugin({args})", part, exact=False, expression=True,
              imports="from accelerate import FullyShardedDataParallelPlugin",
              note="add auto_wrap_policy=\"transformer_based_wrap\", transformer_cls_names_to_wrap=[your block "
                   "class] to shard per block as memtune does; run under accelerate launch or torchrun")


def _optimizer(o: _Out, c: Any) -> None:
    from memtune.optim.swap import GALORE_DEFAULTS

    value = c.to_dict()
    name = c.name
    if o.t.name != "hf":
        where = "your configure_optimizers" if o.t.name == "lightning" else "your code (before accelerator.prepare)"
        hint = "; for name adamw, torch.optim.AdamW(..., fused=True) there is the same" if name == "adamw" else ""
        o.cannot("optimizer", value, f"{o.fw} does not build the optimizer: {where} does{hint}")
        o.keep("optimizer", value)
        return
    if c.stochastic_rounding:
        o.cannot("optimizer", value, "TrainingArguments' 8-bit and 4-bit optimizers have no stochastic rounding")
        o.keep("optimizer", value)
        return
    if name == "adamw":
        o.set("optim", "adamw_torch_fused", "optimizer",
              note="torch's fused AdamW (transformers' default with torch >= 2.8); the Trainer builds AdamW")
    elif name == "adamw8bit":
        o.set("optim", "adamw_bnb_8bit", "optimizer", exact=False,
              note="bitsandbytes' block-wise 8-bit AdamW (needs bitsandbytes; \"adamw_torch_8bit\" is torchao's): "
                   "another kernel, so other numbers than memtune's adamw8bit")
    elif name == "adamw4bit":
        o.set("optim", "adamw_torch_4bit", "optimizer", exact=False,
              note="torchao's 4-bit AdamW (needs torchao): another kernel, so other numbers than memtune's adamw4bit")
    elif name == "adafactor":
        o.set("optim", "adafactor", "optimizer", exact=False,
              note="transformers' Adafactor (scale_parameter=False, relative_step=False), not torch.optim.Adafactor")
    elif name == "galore":
        g = {k: value.get(k, GALORE_DEFAULTS[k]) for k in ("rank", "update_proj_gap", "scale")}
        o.set("optim", "galore_adamw", "optimizer", exact=False,
              note="galore-torch's GaLore (needs galore-torch) on the Linear weights only; memtune projects every "
                   "2-D gradient")
        o.set("optim_target_modules", "all-linear", "optimizer", exact=False, note="GaLore needs its targets named")
        o.set("optim_args", ",".join(f"{k}={v}" for k, v in g.items()), "optimizer")
    else:  # inbackward
        o.cannot("optimizer", value, 'TrainingArguments has no AdamW update inside backward (optim="lomo" is '
                 "LOMO's SGD-like update, from the lomo-optim package)")
        o.keep("optimizer", value)


def _loss(o: _Out, c: Any) -> None:
    if not c.fused:
        return
    value = c.to_dict()
    if o.t.name == "hf" and c.head is None and c.chunk_tokens is None and not c.low_memory:
        o.set("use_liger_kernel", True, "loss", exact=False,
              note="Liger-Kernel's fused linear cross-entropy (needs liger-kernel; the model types it supports): "
                   "the same idea, another kernel")
        o.set("liger_kernel_config", {"fused_linear_cross_entropy": True, "cross_entropy": False, "rope": False,
                                      "rms_norm": False, "swiglu": False}, "loss",
              note="the loss kernel only (Liger's other kernels off)")
        return
    if o.t.name == "hf":
        why = "use_liger_kernel picks its own head and chunking: head, chunk_tokens and low_memory have no setting"
    else:
        why = f"no {o.fw} setting fuses the head with the cross-entropy"
    o.cannot("loss", value, why)
    o.keep("loss", value)


def _compress(o: _Out, c: Any) -> None:
    o.cannot("compress", c.to_dict(), f"no {o.fw} setting compresses the activations saved for backward")
    o.keep("compress", c.to_dict())


def _weights(o: _Out, c: Any) -> None:
    nearest = {
        "hf": "the nearest is loading the base with from_pretrained(..., quantization_config=BitsAndBytesConfig("
              'load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)): bitsandbytes, every '
              "Linear but the head",
        "lightning": 'the nearest is plugins=BitsandbytesPrecision(mode="nf4-dq"): bitsandbytes, every Linear',
        "accelerate": "the nearest is accelerate.utils.load_and_quantize_model with a BnbQuantizationConfig: "
                      "bitsandbytes",
    }[o.t.name]
    o.cannot("weights", c.to_dict(), f"{o.fw} does not quantize frozen weights ({nearest})")
    o.keep("weights", c.to_dict())


def _placement(o: _Out, c: Any) -> None:
    if not c.defer:
        return
    who = {"hf": "the Trainer moves the model to its device before any callback runs",
           "lightning": "the strategy moves the module to its device before on_fit_start",
           "accelerate": "accelerator.prepare moves the model before memtune.apply_plan can run"}[o.t.name]
    # not kept in the rest: applied after the move, it has nothing left to defer
    o.cannot("placement", c.to_dict(), f"{who}: deferring that move needs `memtune apply` on the script")


_HANDLERS: dict[str, Handler] = {"precision": _precision, "checkpoint": _checkpoint, "offload": _offload,
                                 "sharding": _sharding, "optimizer": _optimizer, "loss": _loss,
                                 "compress": _compress, "weights": _weights, "placement": _placement}

# --- run.knobs ------------------------------------------------------------------------------------------

_BATCH = {"batch_size", "per_device_train_batch_size", "train_batch_size", "micro_batch_size", "bs"}
_ACCUM = {"gradient_accumulation_steps", "grad_accum", "grad_accum_steps", "accum", "accum_steps",
          "accumulate_grad_batches", "gradient_accumulation"}


def _number(v: Any) -> Any:
    try:
        return int(str(v))
    except ValueError:
        return v


def _knobs(o: _Out, knobs: dict[str, Any]) -> None:
    t = o.t.name
    for flag, v in knobs.items():
        key = flag.lstrip("-").replace("-", "_").lower()
        part = f"run.knobs.{flag}"
        if key in _BATCH:
            if t == "hf":
                o.set("per_device_train_batch_size", _number(v), part)
            else:
                o.cannot(part, v, f"the batch size is your DataLoader's (or DataModule's), not a setting of "
                         f"{o.fw}: set batch_size={v} there")
        elif key in _ACCUM:
            name = {"hf": "gradient_accumulation_steps", "lightning": "accumulate_grad_batches",
                    "accelerate": "gradient_accumulation_steps"}[t]
            note = "counted inside `with accelerator.accumulate(model):`" if t == "accelerate" else ""
            o.set(name, _number(v), part, note=note)
        else:
            o.cannot(part, v, f"a flag of your script, not a setting of {o.fw}: keep passing `{flag} {v}`")


# --- the export -------------------------------------------------------------------------------------------


def export_plan(plan: Plan, target: str) -> Export:
    """`plan` as `target`'s settings (hf, lightning or accelerate), what has no equivalent, and the rest."""
    from memtune.strategies import ordered_sections, plan_from_dict

    if target not in _TARGETS:
        raise InputError(f"unknown export target {target!r}; choose one of: {', '.join(TARGETS)}")
    t = _TARGETS[target]
    o = _Out(t, plan)
    # sharding last: whether it can be the framework's depends on what else stays with memtune
    for name, cfg in sorted(ordered_sections(plan), key=lambda kv: kv[0] == "sharding"):
        handler = _HANDLERS.get(name)
        if handler is None:  # a strategy added without an export rule: say so rather than drop it
            o.cannot(name, cfg.to_dict(), f"memtune has no export rule for {name!r} to {t.obj}")
            o.keep(name, cfg.to_dict())
            continue
        handler(o, cfg)
    _knobs(o, dict(plan.run.get("knobs") or {}))
    problem = None
    if o.rest:
        try:
            plan_from_dict(o.rest, "the rest of the plan")
        except PlanError as e:
            problem = str(e)
    return Export(target=target, framework=t.framework, obj=t.obj, plan=plan.source, settings=o.settings,
                  imports=[t.imports, *o.imports], unexpressed=o.unexpressed, rest=o.rest, rest_problem=problem,
                  apply_with=t.apply_with, lossy=plan.lossy)


def export_file(plan: str | Path, target: str) -> Export:
    """`memtune export`: the target is checked before the plan is read."""
    from memtune.strategies import load_plan

    if target not in _TARGETS:
        raise InputError(f"unknown export target {target!r}; choose one of: {', '.join(TARGETS)}")
    return export_plan(load_plan(plan), target)

