"""Data-parallel LM training with DistributedDataParallel under torchrun (also runs as one plain process).

    python examples/zoo/ddp_torchrun.py --steps 30                                   # world size 1, CPU (gloo)
    torchrun --nproc-per-node 2 examples/zoo/ddp_torchrun.py --steps 30 --device cpu   # 2 CPU ranks, gloo
    torchrun --nproc-per-node 1 examples/zoo/ddp_torchrun.py --size gpu --steps 50     # 24 x 1024, bf16, one H200
init_process_group (nccl on CUDA, gloo on CPU), DistributedSampler over a map-style dataset with set_epoch,
nn.MultiheadAttention layers with an explicit causal mask, rank-0 printing, all-reduced loss for the log.
"""

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

SIZES = {
    "tiny": dict(vocab=256, d_model=64, n_layers=2, n_heads=4, seq_len=64, batch_size=8),
    # ~370M params (24 x 1024, 32k vocab untied), 16 x 1024 tokens per rank. Estimated, not measured, for one
    # rank on an H200: peak ~26 GiB (5.9 GiB states + 1.4 GiB DDP buckets, ~17 GiB activations, ~1.5 GiB
    # logits), ~150 ms/step.
    "gpu": dict(vocab=32000, d_model=1024, n_layers=24, n_heads=16, seq_len=1024, batch_size=16),
}


class Decoder(nn.Module):
    class Layer(nn.Module):
        def __init__(self, d_model, n_heads):
            super().__init__()
            self.norm1 = nn.LayerNorm(d_model)
            self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True, bias=False)
            self.norm2 = nn.LayerNorm(d_model)
            self.ff = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

        def forward(self, x, causal_mask):
            h = self.norm1(x)
            x = x + self.attn(h, h, h, attn_mask=causal_mask, need_weights=False)[0]
            return x + self.ff(self.norm2(x))

    def __init__(self, vocab, d_model, n_layers, n_heads, seq_len):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.stack = nn.ModuleList(self.Layer(d_model, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.register_buffer("causal_mask", torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), 1),
                             persistent=False)

    def forward(self, x):
        t = x.shape[1]
        h = self.embed(x) + self.pos.weight[:t]
        mask = self.causal_mask[:t, :t]
        for layer in self.stack:
            h = layer(h, mask)
        return self.head(self.norm(h))


class SequenceDataset(Dataset):
    """Deterministic per index: sequence i is an arithmetic progression mod vocab (learnable)."""

    def __init__(self, n, seq_len, vocab):
        self.n, self.seq_len, self.vocab = n, seq_len, vocab

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        start = torch.randint(self.vocab, (1,), generator=g)
        stride = torch.randint(1, 5, (1,), generator=g)
        seq = (start + stride * torch.arange(self.seq_len + 1)) % self.vocab
        return seq[:-1], seq[1:]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(device_arg):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; a plain `python` run becomes a world of one."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = device_arg.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, help="per rank")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg = dict(SIZES[args.size])
    batch_size = args.batch_size or cfg.pop("batch_size")
    cfg.pop("batch_size", None)

    rank, world_size, device = setup(args.device)
    master = rank == 0
    torch.manual_seed(args.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    model = Decoder(**cfg).to(device)
    model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr or (3e-3 if args.size == "tiny" else 3e-4),
                                  weight_decay=0.1, betas=(0.9, 0.95))
    dataset = SequenceDataset(max(2048, args.steps * batch_size * world_size), cfg["seq_len"], cfg["vocab"])
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                        pin_memory=device.type == "cuda")
    use_amp = device.type == "cuda"
    if master:
        n = sum(p.numel() for p in model.parameters())
        print(f"world size {world_size}, backend {dist.get_backend()}, {n / 1e6:.1f}M params, "
              f"batch {batch_size}/rank x {cfg['seq_len']}")

    step, epoch, t0 = 0, 0, time.time()
    model.train()
    while step < args.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(x)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step % 5 == 0 or step == args.steps - 1:
                avg = loss.detach().clone()
                dist.all_reduce(avg, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM)
                if dist.get_backend() != "nccl":
                    avg /= world_size
                if master:
                    print(f"epoch {epoch} step {step:4d}  loss {avg.item():.4f}  {time.time() - t0:.1f}s", flush=True)
            step += 1
            if step >= args.steps:
                break
        epoch += 1
    if master:
        print(f"done: {step} steps on {world_size} rank(s)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
