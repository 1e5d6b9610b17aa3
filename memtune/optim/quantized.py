"""AdamW with block-wise quantized moments (8 or 4 bits), one fused Triton launch per step
(memtune/kernels/quantized_adamw.py; the torch reference runs where Triton can't). state_dict() holds the
codes and absmax tensors plus a `memtune_quantized` descriptor; load_state_dict() also takes a plain AdamW
state dict (it quantizes it) and `dequantized_state_dict()` gives one back."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from memtune.errors import ScriptError
from memtune.optim.base import _hyper, _Swapped
from memtune.optim.stepping import run_closure


class QuantizedAdamW(_Swapped):
    """AdamW with block-wise quantized moments (8 or 4 bits); mixed into the script's Adam/AdamW class."""

    _memtune_bits: ClassVar[int] = 8
    _memtune_name = "adamw8bit"

    @torch.no_grad()
    def step(self, closure=None):
        from memtune.kernels import quantized_adamw as Q

        loss = run_closure(closure)
        bits = self._memtune_bits
        self._memtune_seed = getattr(self, "_memtune_seed", 0) + 1
        for gi, group in enumerate(self.param_groups):
            buckets: dict[int, tuple[list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ScriptError("quantized AdamW does not take sparse gradients: drop the optimizer section")
                st = self.state[p]
                if "exp_avg_q" not in st:
                    st.update(Q.new_state(p, bits))
                    st["step"] = 0.0  # a Python number: no tensor op per param per step (torch loads it too)
                st["step"] += 1
                b = buckets.setdefault(int(st["step"]), ([], [], []))
                b[0].append(p)
                b[1].append(p.grad if p.grad.is_contiguous() else p.grad.contiguous())
                b[2].append(st)
            h = _hyper(self, group)
            for step, (ps, gs, ss) in buckets.items():
                fresh = [q for q in ps if not q.is_contiguous()]
                if fresh:
                    raise ScriptError("quantized AdamW needs contiguous parameters: drop the optimizer section")
                # the Triton interpreter is a test tool: on CPU run the torch reference unless asked otherwise
                use = getattr(self, "_memtune_use_triton", None)
                Q.fused_step(ps, gs, ss, bits=bits, step=step, stochastic_rounding=bool(group.get(
                    "stochastic_rounding", False)), seed=self._memtune_seed * 1000 + gi, cache_key=id(self),
                    use_triton=use if use is not None or ps[0].is_cuda else False, **h)
        return loss

    # -- portable state ---------------------------------------------------------------------------------
    def state_dict(self):
        from memtune.kernels import quantized_adamw as Q

        sd = super().state_dict()
        sd["memtune_quantized"] = {"bits": self._memtune_bits, "block": Q.QBLOCK[self._memtune_bits],
                                   "exp_avg": "signed square map: m = absmax * c*|c| / L^2",
                                   "exp_avg_sq": "codes of sqrt(v): sqrt(v) = absmax * ((c+1)/S)^2, no zero",
                                   "layout": "8-bit: one code per element; 4-bit: per 128-block, element k low "
                                             "nibble, k+64 high nibble"}
        return sd

    def dequantized_state_dict(self) -> dict:
        """The same state as a plain torch AdamW state dict (fp32 exp_avg / exp_avg_sq), loadable anywhere."""
        from memtune.kernels import quantized_adamw as Q

        sd = torch.optim.Optimizer.state_dict(self)
        params = [p for g in self.param_groups for p in g["params"]]
        out = {}
        for k, st in sd["state"].items():
            p = params[k]
            st = dict(st)
            if "exp_avg_q" in st:
                m, v = Q.moments_from_state(st, p.numel(), self._memtune_bits)
                for key in ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax"):
                    st.pop(key)
                st["exp_avg"], st["exp_avg_sq"] = m.view_as(p).clone(), v.view_as(p).clone()
                st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)
            out[k] = st
        return {"state": out, "param_groups": sd["param_groups"]}

    def load_state_dict(self, state_dict):
        from memtune.kernels import quantized_adamw as Q

        bits = self._memtune_bits
        saved_bits = (state_dict.get("memtune_quantized") or {}).get("bits", bits)
        id_map = _saved_id_map(self, state_dict)
        conv: dict[Any, dict] = {}
        for k, st in state_dict["state"].items():
            st = dict(st)
            p = id_map.get(k)
            if p is not None and "exp_avg" in st:  # a plain AdamW state dict
                st.update(Q.state_from_moments(st.pop("exp_avg").float().reshape(-1).cpu(),
                                               st.pop("exp_avg_sq").float().reshape(-1).cpu(), bits))
                st.pop("max_exp_avg_sq", None)
            elif p is not None and "exp_avg_q" in st and saved_bits != bits:
                m, v = Q.moments_from_state({a: b.cpu() for a, b in st.items() if a != "step"}, p.numel(), saved_bits)
                st.update(Q.state_from_moments(m, v, bits))
            conv[k] = st
            if "step" in st:
                st["step"] = float(st["step"])
        sd = {"state": conv, "param_groups": state_dict["param_groups"]}
        torch.optim.Optimizer.load_state_dict(self, sd)
        # the base class casts floating state to the param dtype: keep absmax in fp32
        for k, st in conv.items():
            p = id_map.get(k)
            if p is None:
                continue
            for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                if key in st:
                    self.state[p][key] = st[key].to(device=p.device, dtype=torch.float32)


class QuantizedAdamW4bit(QuantizedAdamW):
    _memtune_bits = 4
    _memtune_name = "adamw4bit"


def _saved_id_map(opt, state_dict) -> dict[Any, torch.Tensor]:
    saved = state_dict["param_groups"]
    if len(saved) != len(opt.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(saved, opt.param_groups, strict=True)):
        raise ScriptError("the optimizer state dict does not match this optimizer's param groups")
    return {k: p for a, b in zip(saved, opt.param_groups, strict=True) for k, p in zip(a["params"], b["params"],
                                                                                       strict=True)}
