"""Train a small GPT on synthetic tokens: plain PyTorch, the way people write it.

    python examples/gpt.py                       # a few seconds on a 2-core CPU
    python examples/gpt.py --preset 350m         # GPU sizes: 125m, 350m, 1.3b

AdamW, cosine LR schedule with warm-up, gradient clipping, bf16 autocast on CUDA. Runs without memtune.
"""

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {  # GPT-2/GPT-3 shapes (Radford et al. 2019; Brown et al. 2020, table 2.1)
    "125m": dict(layers=12, width=768, heads=12, seq_len=1024, vocab=50304, batch_size=8),
    "350m": dict(layers=24, width=1024, heads=16, seq_len=1024, vocab=50304, batch_size=8),
    "1.3b": dict(layers=24, width=2048, heads=16, seq_len=1024, vocab=50304, batch_size=4),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, 4 * width, bias=False)
        self.proj = nn.Linear(4 * width, width, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = MLP(width)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, layers, width, heads, seq_len, vocab):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def synthetic_batch(batch, length, vocab, gen):
    """Learnable synthetic tokens: arithmetic sequences with a random start and stride, so loss falls."""
    start = torch.randint(vocab, (batch, 1), generator=gen)
    stride = torch.randint(1, 4, (batch, 1), generator=gen)
    return (start + stride * torch.arange(length)) % vocab


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="GPU-sized model; flags given explicitly still win")
    p.add_argument("--layers", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg = dict(layers=4, width=128, heads=4, seq_len=64, vocab=512, batch_size=8)
    if args.preset:
        cfg.update(PRESETS[args.preset])
    for k in cfg:
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = GPT(cfg["layers"], cfg["width"], cfg["heads"], cfg["seq_len"], cfg["vocab"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 10)
    schedule = lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, args.steps - warmup)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    use_amp = device.type == "cuda"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"GPT {cfg}: {n_params / 1e6:.1f}M parameters on {device}")

    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        for _ in range(args.grad_accum):
            data = synthetic_batch(cfg["batch_size"], cfg["seq_len"] + 1, cfg["vocab"], gen).to(device)
            x, y = data[:, :-1], data[:, 1:]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(x)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
            (loss / args.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.2e}")
    print(f"done: {args.steps} steps in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
