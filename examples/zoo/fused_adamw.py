"""Llama-style LM pre-training loop with AdamW(fused=True) on CUDA (foreach=True elsewhere) and two param groups.

    python examples/zoo/fused_adamw.py --steps 40                 # tiny, CPU
    python examples/zoo/fused_adamw.py --size gpu --steps 50      # ~950M params, 4 x 2048 tokens, bf16 autocast, one H200
RMSNorm, rotary embeddings, SwiGLU; weight decay on matrices only (norms/biases/embeddings in a no-decay group),
clip_grad_norm_, LambdaLR warmup + cosine; fp32 master weights; model(idx, targets) returns (logits, loss).
"""

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZES = {
    "tiny": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=64,
                 batch_size=8),
    # ~950M params (16 x 2048, ffn 5632, 32k vocab, untied), 4 x 2048 tokens. Estimated, not measured:
    # peak ~31 GiB (14 GiB weights+grads+AdamW, ~14 GiB activations, ~2.5 GiB logits), ~130 ms/step on an H200.
    "gpu": dict(vocab_size=32000, dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, ffn_dim=5632, max_seq_len=2048,
                batch_size=4),
}


def precompute_freqs(head_dim, seq_len, theta=10000.0):
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(seq_len).float(), freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rotary(x, cos, sin):  # x: b, h, t, d
    x1, x2 = x[..., ::2], x[..., 1::2]
    cos, sin = cos[: x.shape[2]], sin[: x.shape[2]]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, ffn_dim):
        super().__init__()
        self.attention_norm = RMSNorm(dim)
        self.attention = Attention(dim, n_heads, n_kv_heads)
        self.ffn_norm = RMSNorm(dim)
        self.feed_forward = FeedForward(dim, ffn_dim)

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self, vocab_size, dim, n_layers, n_heads, n_kv_heads, ffn_dim, max_seq_len):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(TransformerBlock(dim, n_heads, n_kv_heads, ffn_dim) for _ in range(n_layers))
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        cos, sin = precompute_freqs(dim // n_heads, max_seq_len)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens, targets=None):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, self.freqs_cos, self.freqs_sin)
        logits = self.output(self.norm(h))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss


def configure_optimizer(model, weight_decay, lr, betas, device_type):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    decay = [p for n, p in params.items() if p.dim() >= 2 and "embeddings" not in n]
    no_decay = [p for n, p in params.items() if p.dim() < 2 or "embeddings" in n]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    print(f"decayed tensors: {len(decay)} ({sum(p.numel() for p in decay):,} params), "
          f"non-decayed: {len(no_decay)} ({sum(p.numel() for p in no_decay):,} params)")
    extra = {"fused": True} if device_type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, **extra)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg = dict(SIZES[args.size])
    batch_size = args.batch_size or cfg.pop("batch_size")
    cfg.pop("batch_size", None)
    seq_len = args.seq_len or cfg["max_seq_len"]

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = Llama(**cfg).to(device)
    max_lr = args.lr or (3e-3 if args.size == "tiny" else 3e-4)
    optimizer = configure_optimizer(model, args.weight_decay, max_lr, (0.9, 0.95), device.type)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)

    def lr_lambda(it):
        if it < warmup:
            return (it + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    tokens_per_step = batch_size * seq_len
    t0 = time.time()
    for it in range(args.steps):
        start = torch.randint(cfg["vocab_size"], (batch_size, 1), generator=gen)
        stride = torch.randint(1, 6, (batch_size, 1), generator=gen)
        data = (start + stride * torch.arange(seq_len + 1)) % cfg["vocab_size"]
        x, y = data[:, :-1].pin_memory() if device.type == "cuda" else data[:, :-1], data[:, 1:]
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with ctx:
            _, loss = model(x, targets=y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if it % 5 == 0 or it == args.steps - 1:
            dt = time.time() - t0
            t0 = time.time()
            print(f"it {it:5d} | loss {loss.item():.4f} | norm {norm:.3f} | lr {scheduler.get_last_lr()[0]:.2e} | "
                  f"{tokens_per_step * (5 if it else 1) / dt:,.0f} tok/s")


if __name__ == "__main__":
    main()
