"""torch.distributed helpers shared by profile, apply and the sharding strategy.

- `world()`: rank, world size and local rank, from the live process group or torchrun's environment.
- `is_rank0()`, `rank0_print()`: under torchrun only rank 0 writes files and prints tables.
- `require_process_group(what)`: refuse clearly when a feature needs more than one rank.
- `gather_ints(values, device)`: every rank's few integers (apply's per-rank peaks), a collective.
- `release_group(device)`: after `memtune profile`/`apply` stopped a script before its own
  destroy_process_group(): sync the ranks, then destroy the group it left alive.
- `free_group()`: then free it (and its threads) before interpreter exit.
- `launch_prefix(n)`: how to launch `memtune apply` for a profile taken on n ranks.
- `measure_collectives()`: all-gather and reduce-scatter bus bandwidth (GB/s) on the live process group,
  for `Hardware.allgather_gbps` / `Hardware.reduce_scatter_gbps` when a profile runs with world_size > 1.

Nothing here initializes a process group: the user's script owns it (release_group ends one the stopped
script can no longer end itself).
"""

from __future__ import annotations

import contextlib
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


def _env_rank(local: int) -> int:
    if os.environ.get("RANK"):
        return int(os.environ["RANK"])
    # Lightning's launcher sets LOCAL_RANK, NODE_RANK and WORLD_SIZE but no RANK: on node 0 they agree
    if os.environ.get("WORLD_SIZE") and os.environ.get("NODE_RANK", "0") in ("", "0"):
        return local
    return 0


def world() -> World:
    """The live process group when there is one, else what the launcher put in the environment."""
    dist = _dist()
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if dist is not None and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), local, True)
    return World(_env_rank(local), int(os.environ.get("WORLD_SIZE", "1") or 1), local, False)


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


def launch_prefix(world_size: int) -> list[str]:
    """The launcher words before `-m memtune apply` for a run on `world_size` ranks (none for one)."""
    return [] if world_size <= 1 else ["torchrun", "--nproc-per-node", str(world_size)]


def _device_for(device: Any) -> Any:
    """Where a small collective's tensor goes: the rank's own GPU under NCCL (the model's device: the current
    device may be another rank's when the script never called set_device), else the CPU (gloo)."""
    import torch

    dist = _dist()
    if dist is None or str(dist.get_backend()) != "nccl":  # gloo, or a map with a CPU backend in it
        return torch.device("cpu")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return dev if dev.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


def gather_ints(values: list[int | None], device: Any = None) -> list[list[int | None]] | None:
    """Every rank's `values` (same length on each, None allowed), in rank order; None without a multi-rank
    process group. Collective: every rank must call it."""
    dist = _dist()
    if dist is None or not dist.is_initialized() or dist.get_world_size() <= 1:
        return None
    import torch

    t = torch.tensor([-1 if v is None else int(v) for v in values], dtype=torch.int64, device=_device_for(device))
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    work = dist.all_gather(out, t, async_op=True)
    work.wait()
    # Kept until free_group(): a gloo worker thread that dropped the last reference to this work would free
    # its tensors' Python objects, needing the GIL, which the main thread holds while the group's destructor
    # joins that thread (a deadlock seen here when the group was freed right after the collective).
    _KEPT.append((work, t, out))
    return [[None if x < 0 else int(x) for x in o.tolist()] for o in out]


_KEPT: list[Any] = []


def release_group(device: Any = None) -> None:
    """Sync the ranks, then destroy the default process group (no-op without one).

    For a script memtune stopped (StopRun) before its own destroy_process_group(): a gloo group left alive at
    interpreter exit can abort the process (`terminate called without an active exception`, pytorch#190489),
    and the sync keeps a rank from tearing down while another still talks to it. Call it only on a rank whose
    run succeeded: a rank that failed may have peers blocked in the script's collectives.
    """
    dist = _dist()
    if dist is None or not dist.is_initialized():
        return
    # the barrier, on the group's own device (dist.barrier guesses a GPU under NCCL); a peer that died after
    # its run is torchrun's to report, this rank's results stand
    with contextlib.suppress(RuntimeError):
        gather_ints([0], device)
    dist.destroy_process_group()


def free_group() -> None:
    """After release_group() and the run: free the destroyed group now, while Python is whole.

    The stopped script's DDP model, garbage in a reference cycle, holds the group (DDP's reducer does) and its
    threads (pt_gloo_runloop, gloo_tcp_loop); left to interpreter exit they aborted a rank in about 1 run of
    100 here (`terminate called without an active exception`). Collected here, the group's destructor joins
    them; memtune's own collectives' works go after that, when no thread can be releasing them."""
    import gc

    gc.collect()
    _KEPT.clear()
    gc.collect()


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
