"""torch.distributed helpers shared by profile, apply and the sharding strategy.

- `world()`: rank, world size and local rank, from the live process group or torchrun's environment.
- `is_rank0()`, `rank0_print()`: under torchrun only rank 0 writes files and prints tables.
- `require_process_group(what)`: refuse clearly when a feature needs more than one rank.
- `measure_collectives()`: all-gather and reduce-scatter bus bandwidth (GB/s) on the live process group,
  for `Hardware.allgather_gbps` / `Hardware.reduce_scatter_gbps` when a profile runs with world_size > 1.

Nothing here initializes a process group: the user's script owns it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from memtune.errors import EnvironmentNotSupported


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized: bool = False  # a torch.distributed default process group exists

    @property
    def distributed(self) -> bool:
        return self.initialized and self.world_size > 1


def _dist():
    try:
        import torch.distributed as dist
    except Exception:  # pragma: no cover - torch built without distributed
        return None
    return dist if dist.is_available() else None


def world() -> World:
    """The live process group when there is one, else what torchrun put in the environment."""
    dist = _dist()
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if dist is not None and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), local, True)
    return World(int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1), local, False)


def is_rank0() -> bool:
    return world().rank == 0


def rank0_print(*args: Any, **kwargs: Any) -> None:
    if is_rank0():
        print(*args, **kwargs)


def require_process_group(what: str) -> World:
    """The live world, or an error saying how to launch when `what` needs several ranks."""
    w = world()
    if not w.distributed:
        why = (f"the process group has {w.world_size} rank" if w.initialized
               else f"no process group is initialized, WORLD_SIZE={w.world_size}")
        raise EnvironmentNotSupported(
            f"{what} needs a torch.distributed process group with more than one rank ({why}): launch with "
            "`torchrun --nproc-per-node N -m memtune apply PLAN` on a script that calls "
            "torch.distributed.init_process_group(), or remove the sharding section from the plan"
        )
    return w


def measure_collectives(nbytes: int | None = None, group: Any = None, iters: int = 5) -> dict[str, float]:
    """Bus bandwidth (GB/s) of all_gather_into_tensor and reduce_scatter_tensor on `group` (default WORLD).

    Bus bandwidth as nccl-tests defines it (NVIDIA nccl-tests doc/PERFORMANCE.md): for both collectives
    busbw = S * (n - 1) / n / t, with S the size of the full (gathered) tensor; the cost model times a
    collective of S bytes as S * (n - 1) / n / busbw. Empty dict without a multi-rank process group. Every
    rank must call it (it is collective); all ranks get rank 0's numbers (broadcast) so their plans agree.
    """
    dist = _dist()
    if dist is None or not dist.is_initialized():
        return {}
    import torch

    n = dist.get_world_size(group)
    if n <= 1:
        return {}
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    if nbytes is None:
        nbytes = 256 * 2**20 if device.type == "cuda" else 4 * 2**20  # large enough for the link's plateau
    per_rank = max(1, nbytes // (4 * n))
    full = torch.empty(per_rank * n, dtype=torch.float32, device=device)
    shard = torch.ones(per_rank, dtype=torch.float32, device=device)
    size = full.numel() * full.element_size()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def bench(fn) -> float:
        fn()  # warm-up: connection setup
        sync()
        times = []
        for _ in range(iters):
            dist.barrier(group)
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    # torch 2.13 renamed these (*_single); older torch has only the *_tensor names
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    t_ag = bench(lambda: all_gather(full, shard, group=group))
    t_rs = bench(lambda: reduce_scatter(shard, full, group=group))
    rates = torch.tensor([size * (n - 1) / n / t / 1e9 for t in (t_ag, t_rs)], dtype=torch.float64, device=device)
    dist.broadcast(rates, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return {"allgather_gbps": float(rates[0]), "reduce_scatter_gbps": float(rates[1])}
