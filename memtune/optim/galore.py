"""GaLore: Adam on a rank-r projection of each 2-D gradient (Zhao et al. 2024), projection refreshed every
`update_proj_gap` steps from a randomized range finder with its own generator (the script's RNG stream is
untouched); other params get plain AdamW."""

from __future__ import annotations

import torch

from memtune.optim.base import _hyper, _Swapped
from memtune.optim.stepping import run_closure


class GaLoreAdamW(_Swapped):
    """Adam on a low-rank projection of each 2-D gradient; plain AdamW for the other params."""

    _memtune_name = "galore"

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        cfg = self._memtune_galore
        for group in self.param_groups:
            h = _hyper(self, group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                g = p.grad.float()
                if h["maximize"]:
                    g = -g
                if not h["decoupled"] and h["weight_decay"]:
                    g = g + h["weight_decay"] * p.float()  # Adam's L2 term, before projecting
                low = p.dim() == 2 and min(p.shape) > cfg["rank"]
                if "step" not in st:
                    st["step"] = torch.tensor(0.0)
                st["step"] += 1
                t = int(st["step"].item())
                if low:
                    left = p.shape[0] < p.shape[1]  # project the smaller side: state is rank x larger side
                    if "proj" not in st or (t - 1) % cfg["update_proj_gap"] == 0:
                        st["proj"] = _top_subspace(g if left else g.T, cfg["rank"], self._memtune_gen(p.device))
                    P = st["proj"]
                    r = P.T @ g if left else g @ P
                else:
                    r = g
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(r)
                    st["exp_avg_sq"] = torch.zeros_like(r)
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.lerp_(r, 1 - h["beta1"])
                v.mul_(h["beta2"]).addcmul_(r, r, value=1 - h["beta2"])
                bc1, bc2 = 1 - h["beta1"] ** t, 1 - h["beta2"] ** t
                n = (m / bc1) / ((v / bc2).sqrt_().add_(h["eps"]))
                if low:
                    n = (P @ n if left else n @ P.T) * cfg["scale"]
                if h["decoupled"] and h["weight_decay"]:
                    p.mul_(1 - h["lr"] * h["weight_decay"])
                p.add_(n.to(p.dtype), alpha=-h["lr"])
        return loss

    def _memtune_gen(self, device) -> torch.Generator:
        gens = self.__dict__.setdefault("_memtune_gens", {})
        if str(device) not in gens:
            gens[str(device)] = torch.Generator(device=device).manual_seed(0x6A1)
        return gens[str(device)]


def _top_subspace(a: torch.Tensor, rank: int, gen: torch.Generator, power_iters: int = 2) -> torch.Tensor:
    """Orthonormal basis (rows x rank) of `a`'s top left singular vectors: randomized range finder
    (Halko et al. 2011, alg. 4.4) with a private generator, a few matmuls instead of a full SVD."""
    k = min(rank + 8, min(a.shape))
    omega = torch.randn(a.shape[1], k, device=a.device, dtype=a.dtype, generator=gen)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(power_iters):
        q, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ q)
    u, _, _ = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ u[:, :rank]).contiguous()


# id(param) -> weakref, for params whose grads are consumed in backward (tensors can't sit in a WeakSet: their
