"""A user's DDP training script, written without memtune in mind: tests/dist/apply_worker.py runs it through
memtune's patcher (`run_apply`, what `memtune apply` does) with a sharding plan.

    torchrun --nproc-per-node 2 tests/dist/ddp_train.py --out losses.json
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sharding_worker import B, Tiny, V, batches, make_optimizer  # noqa: E402  (same model, data, optimizer)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DDP(Tiny())
    optimizer, scheduler = make_optimizer(model.parameters())
    losses = []
    half = B // ws
    for data in batches():
        data = data[rank * half:(rank + 1) * half]
        loss = F.cross_entropy(model(data[:, :-1]).reshape(-1, V), data[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        avg = loss.detach().clone()
        dist.all_reduce(avg)
        losses.append(avg.item() / ws)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"losses": losses, "model": type(model).__name__,
                                              "optimizer": type(optimizer).__name__}))


if __name__ == "__main__":
    main()
