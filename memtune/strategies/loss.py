"""Fused linear cross-entropy: the loss of a linear head's output without the full logits
(memtune/kernels/linear_cross_entropy.py). Lossless up to fp32 rounding (see the kernel's doc).

```yaml
loss: {fused: true}                           # find the head: get_output_embeddings() or the widest Linear child
loss: {fused: true, head: lm_head, chunk_tokens: 1024}
loss: {fused: true, low_memory: true}         # a 56 MiB chunk instead of 192 MiB, one more matmul
```
How it reaches the loss without editing the script: while training (grad enabled, module.training), the
head returns `LazyLogits`, a tensor subclass that holds (hidden, weight) and no data. `view`/`reshape`,
leading-dim indexing, `.float()` and `.contiguous()` stay lazy; `F.cross_entropy` on it (what scripts call,
and what transformers' causal-LM loss calls) runs the fused op; anything else (argmax, printing, a custom
loss) materializes the logits once, as the unpatched head would, so results never change, only the
memory saved. Heads with a bias, or none found, are left alone with a note.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from memtune.errors import PlanError
from memtune.plan import SectionConfig, check_keys
from memtune.strategies.base import ApplyContext, SearchOptions, Strategy, register
from memtune.undo import Undo, noop, replace_on_instance

KEYS = {"fused": "true to fuse the head's matmul with the cross-entropy", "head": "module path of the head",
        "chunk_tokens": "tokens per chunk (default: a 192 MiB logits chunk)",
        "low_memory": "true: a 56 MiB chunk, one recompute of the logits (about Liger-Kernel's time)"}

_CE_SIG = inspect.signature(F.cross_entropy)
_META_FUNCS = {torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.is_floating_point,
               torch.Tensor.element_size, torch.Tensor.is_contiguous, torch.Tensor.__len__, torch.Tensor.stride,
               torch.Tensor.get_device, torch.Tensor.ndimension, torch.Tensor.nelement, torch.Tensor.is_complex}
_META_PROPS = {"shape", "ndim", "dtype", "device", "is_cuda", "is_cpu", "requires_grad", "layout", "is_leaf",
               "grad_fn", "is_sparse", "is_quantized", "is_meta", "is_nested", "is_mps", "is_xpu", "names",
               "_version", "output_nr", "_base", "grad", "itemsize"}


def _is_meta(func) -> bool:
    if func in _META_FUNCS:
        return True
    if getattr(func, "__name__", "") == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", None) in _META_PROPS
    return False


class LazyLogits(torch.Tensor):
    """hidden @ weight.T, not computed until something needs the values."""

    @staticmethod
    def __new__(cls, hidden, weight, compute_dtype, out_dtype, opts):
        shape = (*hidden.shape[:-1], weight.shape[0])
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=out_dtype, device=hidden.device,
                                                requires_grad=hidden.requires_grad or weight.requires_grad)
        t._hidden, t._weight, t._compute_dtype, t._out_dtype, t._opts = hidden, weight, compute_dtype, out_dtype, opts
        t._cache = None
        return t

    def _like(self, hidden=None, out_dtype=None):
        return LazyLogits(self._hidden if hidden is None else hidden, self._weight, self._compute_dtype,
                          out_dtype or self._out_dtype, self._opts)

    def _inputs(self):
        cd = self._compute_dtype
        return self._hidden.to(cd), self._weight.to(cd)

    def materialize(self) -> torch.Tensor:
        if self._cache is None:
            h, w = self._inputs()
            with torch.autocast(self._hidden.device.type, enabled=False):
                self._cache = F.linear(h, w).to(self._out_dtype)
            self._opts["materialized"] = self._opts.get("materialized", 0) + 1
        return self._cache

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # only reached by ops that bypass __torch_function__ (below autograd): give them the values
        args, kwargs = torch.utils._pytree.tree_map(
            lambda a: a.materialize().detach() if isinstance(a, LazyLogits) else a, (args, kwargs or {}))
        return func(*args, **kwargs)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self = args[0] if args and isinstance(args[0], LazyLogits) else None
        if func is F.cross_entropy:
            out = _fused_ce(args, kwargs)
            if out is not None:
                return out
        elif self is not None:
            if _is_meta(func):
                with torch._C.DisableTorchFunctionSubclass():
                    return func(*args, **kwargs)
            out = _lazy_method(func, self, args[1:], kwargs)
            if out is not None:
                return out
        args, kwargs = torch.utils._pytree.tree_map(
            lambda a: a.materialize() if isinstance(a, LazyLogits) else a, (args, kwargs))
        return func(*args, **kwargs)


def _lazy_method(func, self: LazyLogits, rest, kwargs):
    """view/reshape/indexing over leading dims, .float(), .contiguous(): a new LazyLogits, else None."""
    if func is torch.Tensor.contiguous and not rest and not kwargs:
        return self
    if func is torch.Tensor.float and not rest and not kwargs:
        return self._like(out_dtype=torch.float32)
    if func is torch.Tensor.to and not kwargs and len(rest) == 1 and rest[0] == torch.float32:
        return self._like(out_dtype=torch.float32)
    if func in (torch.Tensor.view, torch.Tensor.reshape, torch.reshape) and not kwargs and rest:
        shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)) else rest
        if not all(isinstance(s, int) for s in shape) or not shape:
            return None
        shape = list(shape)
        numel, v = self.numel(), self.shape[-1]
        if shape.count(-1) == 1:
            known = 1
            for s in shape:
                known *= s if s != -1 else 1
            if known == 0 or numel % known:
                return None
            shape[shape.index(-1)] = numel // known
        if shape[-1] != v:
            return None
        return self._like(hidden=self._hidden.reshape(*shape[:-1], self._hidden.shape[-1]))
    if func is torch.Tensor.__getitem__ and len(rest) == 1 and not kwargs:
        idx = rest[0] if isinstance(rest[0], tuple) else (rest[0],)
        if not all(isinstance(i, (int, slice)) or i is Ellipsis for i in idx):
            return None
        last_full = idx and isinstance(idx[-1], slice) and idx[-1] == slice(None)
        if last_full or (Ellipsis not in idx and len(idx) < self.dim()):
            return self._like(hidden=self._hidden[idx])
    return None


def _fused_ce(args, kwargs):
    from memtune.kernels.linear_cross_entropy import linear_cross_entropy

    try:
        b = _CE_SIG.bind(*args, **kwargs)
    except TypeError:
        return None
    a = {**{k: p.default for k, p in _CE_SIG.parameters.items()}, **b.arguments}
    x, target = a["input"], a["target"]
    if (not isinstance(x, LazyLogits) or isinstance(target, LazyLogits) or x.dim() != 2
            or a["weight"] is not None or a["size_average"] is not None or a["reduce"] is not None
            or a["reduction"] not in ("mean", "sum") or target.dim() != 1 or target.is_floating_point()):
        return None
    h, w = x._inputs()
    device_type = h.device.type
    loss_dtype = x._out_dtype
    if torch.is_autocast_enabled(device_type):  # cross_entropy autocasts to fp32
        loss_dtype = torch.float32
    with torch.autocast(device_type, enabled=False):
        loss = linear_cross_entropy(h, w, target, ignore_index=a["ignore_index"], reduction=a["reduction"],
                                    label_smoothing=a["label_smoothing"], chunk_tokens=x._opts.get("chunk_tokens"),
                                    low_memory=x._opts.get("low_memory", False))
    x._opts["fused"] = x._opts.get("fused", 0) + 1
    return loss.to(loss_dtype)


# autograd nodes the lazy logits go through without being computed (views, leading-dim indexing, .float(),
# .contiguous()); F.cross_entropy is log_softmax, then nll_loss
_LAZY_NODES = {"ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward", "ToCopyBackward", "SliceBackward",
               "SelectBackward", "CloneBackward", "IndexBackward", "AliasBackward", "SqueezeBackward",
               "UnsqueezeBackward"}
_CE_NODES = {"NllLossBackward", "NllLoss2DBackward"}
# what the profile records instead of autograd node names when there is no head to fuse
NO_HEAD, NO_BIAS, NOT_REACHED = "(no linear head)", "(the head has a bias)", "(not reached from the loss)"


def _node_name(n) -> str:
    return n.name().rstrip("0123456789")


def head_output_uses(roots: list[torch.Tensor], head_node) -> list[str]:
    """What the head's output feeds in the autograd graph that `roots` (the loss backward starts from) ends:
    [] when only F.cross_entropy takes it (through views and casts), else the other autograd nodes' names. For
    those the fused loss materializes the logits as the unpatched head would (a distillation's KL term, a
    z-loss), so it saves nothing."""
    consumers: dict[int, list] = {}
    alive, seen = [], set()
    stack = [r.grad_fn for r in roots if isinstance(r, torch.Tensor) and r.grad_fn is not None]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        alive.append(n)  # keeps each node's Python object (and so its id) for the walk
        for nxt, _ in n.next_functions:
            if nxt is not None:
                consumers.setdefault(id(nxt), []).append(n)
                stack.append(nxt)
    if id(head_node) not in seen:
        return [NOT_REACHED]
    uses: list[str] = []
    todo, done = [head_node], set()
    while todo:
        n = todo.pop()
        if id(n) in done:
            continue
        done.add(id(n))
        for c in consumers.get(id(n), []):
            name = _node_name(c)
            if name in _LAZY_NODES:
                todo.append(c)
            elif name == "LogSoftmaxBackward" and any(_node_name(x) in _CE_NODES for x in consumers.get(id(c), [])):
                continue  # F.cross_entropy (label smoothing adds a sum of the log-probabilities beside it)
            else:
                uses.append(name)
    return sorted(set(uses))


def find_head(model: nn.Module, path: str | None = None) -> tuple[str | None, nn.Module | None]:
    if path:
        try:
            return path, model.get_submodule(path)
        except AttributeError:
            raise PlanError(f"loss.head: no module {path!r} in the model") from None
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        m = get()
        if isinstance(m, nn.Linear):
            for name, mod in model.named_modules():
                if mod is m:
                    return name, m
    best = None
    for name, m in model.named_children():
        if isinstance(m, nn.Linear) and m.out_features >= 2 * m.in_features and (
                best is None or m.out_features >= best[1].out_features):
            best = (name, m)
    return best if best else (None, None)


def patch_head(head: nn.Linear, opts: dict[str, Any]) -> Undo:
    inner = head.forward

    def forward(input, *args, **kwargs):
        if args or kwargs or not (torch.is_grad_enabled() and head.training) or input.dim() < 2:
            return inner(input, *args, **kwargs)
        dt = input.device.type
        if torch.is_autocast_enabled(dt):
            cd = torch.get_autocast_dtype(dt)
        else:
            cd = torch.promote_types(input.dtype, head.weight.dtype)
        return LazyLogits(input, head.weight, cd, cd, opts)

    return replace_on_instance(head, "forward", forward)


@dataclass(frozen=True)
class LossConfig(SectionConfig):
    fused: bool = True
    head: str | None = None
    chunk_tokens: int | None = None
    low_memory: bool | None = None  # True, or absent

    def describe(self) -> str:
        if not self.fused:
            return "loss as the script computes it"
        return "fused linear cross-entropy" + (" (low memory)" if self.low_memory else "")


@register
class Loss(Strategy):
    name = "loss"
    order = 40
    summary = "fused linear cross-entropy: never materialize the full logits (lossless)"

    def validate(self, section: Any) -> LossConfig:
        if section is True:
            section = {"fused": True}
        if not isinstance(section, dict):
            raise PlanError("loss: give a mapping, e.g. {fused: true}")
        check_keys(section, KEYS, "loss")
        fused = section.get("fused", True)
        if not isinstance(fused, bool):
            raise PlanError("loss.fused: true or false")
        head = chunk = low = None
        if section.get("head") is not None:
            if not isinstance(section["head"], str):
                raise PlanError("loss.head: a module path such as lm_head")
            head = section["head"]
        if section.get("chunk_tokens") is not None:
            c = section["chunk_tokens"]
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise PlanError("loss.chunk_tokens: a positive integer, e.g. 1024")
            chunk = c
        if section.get("low_memory") is not None:
            if not isinstance(section["low_memory"], bool):
                raise PlanError("loss.low_memory: true or false")
            low = True if section["low_memory"] else None
        return LossConfig(fused=fused, head=head, chunk_tokens=chunk, low_memory=low)

    def space(self, trial: Any, profile, layout: Any, opts: SearchOptions) -> dict[str, Any] | None:
        if _other_uses(profile):  # the logits are needed anyway: nothing to buy
            return None
        return {"fused": True} if trial.suggest_categorical("loss.fused", [False, True]) else None

    def memory_seed(self, profile: Any, opts: Any) -> dict[str, Any]:
        return {"loss.fused": True}

    def effect(self, profile, config: LossConfig, sim) -> None:
        from memtune.kernels.linear_cross_entropy import CHUNK_BYTES, LOW_CHUNK_BYTES

        if not config.fused:
            return
        other = _other_uses(profile)
        if other:
            why = (", ".join(other) if other[0].startswith("(") else
                   f"the head's output also feeds {', '.join(other)}, so the logits are computed in full")
            sim.notes.append(f"loss: fused saves nothing here: {why} (seen in the profiled run)")
            sim.source(self.name, f"measured: nothing saved ({why})")
            return
        budget = LOW_CHUNK_BYTES if config.low_memory else CHUNK_BYTES
        head = _head_profile(profile, config.head)
        tokens = profiled = (profile.tokens_per_step or 0) // max(1, profile.micro_batches_per_step)
        if profile.batch_size and sim.batch_size:  # the simulated batch's tokens, not the profiled one's: at
            # the profile's it left 9 of 10 logits on the 7B at batch 10 (+2.4 GiB, H200 2026-12-04)
            tokens = round(tokens * sim.batch_size / profile.batch_size)
        if head is None or not tokens or not sum(head.param_bytes.values()) or not head.n_params:
            # (a head tied to the embedding has its weight counted there: its width is not known here)
            sim.loss_transient_bytes = min(sim.loss_transient_bytes, budget)
            sim.notes.append("loss: fused; no head/token count in the profile, only the loss transient is capped")
            return
        params = sum(head.param_bytes.values())
        n_params = max(1, head.n_params)
        elem = params / n_params
        # the head's input was seen at the profiled batch: its width from the profiled tokens (the simulated
        # batch's read the 7B's vocab as 447344 at batch 14)
        hidden = max(1, round((head.input_bytes / elem) / profiled)) if head.input_bytes else 0
        vocab = n_params // hidden if hidden else 0
        # eager keeps the fp32 log-softmax of the logits for backward (N x V x 4 bytes, counted outside
        # blocks); the fused op keeps dx and dW from its forward instead
        eager_saved = tokens * vocab * 4
        fused_saved = (tokens * hidden + vocab * hidden) * elem
        sim.other_act_bytes = max(0.0, sim.other_act_bytes - eager_saved) + fused_saved
        chunk = min(tokens * vocab * elem, budget)
        sim.loss_transient_bytes = min(sim.loss_transient_bytes, chunk)
        # the head returns lazy logits: none are live into the loss, and the forward's logit-sized working
        # memory the profile saw beyond the loss event (its fp32 upcast) goes with them; both left in made
        # the 7B at batch 10 read 19.6 GiB for 16.7 measured (H200, 2026-12-04)
        sim.output_bytes = 0.0
        if sim.loss_fwd_gap_bytes is not None:
            sim.loss_fwd_gap_bytes = max(sim.loss_fwd_gap_bytes, -chunk)
        sim.source(self.name, "formula: the logits' bytes, the head's output seen feeding only F.cross_entropy"
                   if "head_output_uses" in profile.extra else "formula: the logits' bytes")
        sim.notes.append(f"loss: fused cross-entropy over vocab {vocab}, {tokens} tokens; time taken as unchanged "
                         "(H100, vocab 128256, docs/benchmarks.md: the fused op 0.61x eager time, low_memory 0.98x)")

    def apply(self, ctx: ApplyContext, config: LossConfig) -> Undo:
        if not config.fused:
            return noop
        name, head = find_head(ctx.model, config.head)
        if head is None:
            ctx.note("loss", "no linear head found (give loss.head): loss left alone")
            return noop
        if not isinstance(head, nn.Linear):
            ctx.note("loss", f"{name} is {type(head).__name__}, not nn.Linear: loss left alone")
            return noop
        if head.bias is not None:
            ctx.note("loss", f"{name} has a bias, which the fused loss does not take: loss left alone")
            return noop
        opts: dict[str, Any] = {"chunk_tokens": config.chunk_tokens, "low_memory": bool(config.low_memory)}
        ctx.loss_stats = opts  # counts of fused calls and materializations, for reports
        ctx.note("loss", f"{name} returns lazy logits; F.cross_entropy on them runs fused, any other use "
                 "computes the logits as before")
        return patch_head(head, opts)


def _other_uses(profile) -> list[str]:
    """The head output's uses other than F.cross_entropy, as the profile saw them ([]: none, or not seen)."""
    return list((getattr(profile, "extra", None) or {}).get("head_output_uses") or [])


def _head_profile(profile, path):
    for b in reversed(profile.blocks):
        if (path and b.name == path) or (not path and b.kind == "other" and b.cls == "Linear"):
            return b
    return None
