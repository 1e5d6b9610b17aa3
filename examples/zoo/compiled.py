"""A small transformer LM trained through `model = torch.compile(model)` (inductor by default).

    python examples/zoo/compiled.py --steps 20                  # tiny, CPU (first run compiles: ~30-60 s on 2 cores)
    python examples/zoo/compiled.py --size gpu --steps 50       # 16 x 1536, 8 x 2048 tokens, bf16 autocast, one H200
The loss is computed outside the compiled module; --no-compile runs eagerly, --backend/--mode pass through.
"""

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZES = {
    "tiny": dict(vocab=256, dim=64, n_layers=2, n_heads=4, seq_len=32, batch_size=8),
    # ~530M params (16 x 1536 + 32k vocab), 8 x 2048 tokens. Estimated, not measured: peak ~22 GiB eager
    # (8.5 GiB states, ~11 GiB activations, ~2.5 GiB logits), somewhat less compiled; ~150 ms/step on an H200.
    "gpu": dict(vocab=32000, dim=1536, n_layers=16, n_heads=12, seq_len=2048, batch_size=8),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class TransformerBlock(nn.Module):
    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.attention_norm = RMSNorm(dim)
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.ffn_norm = RMSNorm(dim)
        hidden = 4 * dim
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.wqkv(self.attention_norm(x)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.wo(y.transpose(1, 2).reshape(b, t, d))
        return x + self.w2(F.relu(self.w1(self.ffn_norm(x))).square())  # squared ReLU


class Transformer(nn.Module):
    def __init__(self, vocab, dim, n_layers, n_heads, seq_len):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.pos_embeddings = nn.Embedding(seq_len, dim)
        self.layers = nn.ModuleList(TransformerBlock(dim, n_heads) for _ in range(n_layers))
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens) + self.pos_embeddings.weight[: tokens.shape[1]]
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg = dict(SIZES[args.size])
    batch_size = args.batch_size or cfg.pop("batch_size")
    cfg.pop("batch_size", None)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = Transformer(**cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr or (3e-3 if args.size == "tiny" else 3e-4),
                                  weight_decay=0.0)
    if not args.no_compile:
        model = torch.compile(model, backend=args.backend, mode=args.mode)
    use_amp = device.type == "cuda"

    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(args.steps):
        start = torch.randint(cfg["vocab"], (batch_size, 1), generator=gen)
        data = ((start + 3 * torch.arange(cfg["seq_len"] + 1)) % cfg["vocab"]).to(device)
        x, y = data[:, :-1], data[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            print(f"step 0 (includes compilation): loss {loss.item():.4f}, {time.time() - t0:.1f}s", flush=True)
        elif step % 5 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    print(f"done in {time.time() - t0:.1f}s (compiled={not args.no_compile})")


if __name__ == "__main__":
    main()
