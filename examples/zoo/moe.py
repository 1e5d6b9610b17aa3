"""A mixture-of-experts transformer LM: top-2 routing over experts in an nn.ModuleList, load-balancing loss.

    python examples/zoo/moe.py --steps 40                 # tiny, CPU
    python examples/zoo/moe.py --size gpu --steps 50      # 12 layers x 8 experts of width 1024, bf16 autocast, one H200
Tokens are dispatched to experts with index_select / index_add_ (data-dependent shapes each step), the router's
auxiliary loss is returned by the model next to the logits and added to the LM loss outside it.
"""

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZES = {
    "tiny": dict(vocab=256, dim=64, layers=2, heads=4, experts=4, expert_hidden=128, seq_len=64, batch_size=8),
    # ~920M params (12 layers, 8 experts x 2 x 1024 x 4096 per layer, top-2), 8 x 1024 tokens.
    # Estimated, not measured: peak ~24 GiB (13 GiB states, ~9 GiB activations incl. dispatched copies), ~200 ms/step
    # on an H200 (the per-expert loop is not fused).
    "gpu": dict(vocab=32000, dim=1024, layers=12, heads=16, experts=8, expert_hidden=4096, seq_len=1024,
                batch_size=8),
}


class Expert(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class MoELayer(nn.Module):
    def __init__(self, dim, num_experts, hidden, top_k=2):
        super().__init__()
        self.top_k, self.num_experts = top_k, num_experts
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(dim, hidden) for _ in range(num_experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x).float(), dim=-1)
        weights, idx = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token_idx, slot = (idx == e).nonzero(as_tuple=True)
            if token_idx.numel() == 0:
                continue
            y = expert(x.index_select(0, token_idx)) * weights[token_idx, slot, None]
            out = out.index_add(0, token_idx, y.to(out.dtype))
        # Switch-Transformer load balancing: fraction of tokens routed x mean router probability, per expert
        frac = F.one_hot(idx[:, 0], self.num_experts).float().mean(0)
        aux = self.num_experts * (frac * probs.mean(0)).sum()
        return out.view(shape), aux


class Block(nn.Module):
    def __init__(self, dim, heads, experts, expert_hidden):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.heads = heads
        self.ln2 = nn.LayerNorm(dim)
        self.moe = MoELayer(dim, experts, expert_hidden)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))
        h, aux = self.moe(self.ln2(x))
        return x + h, aux


class MoETransformer(nn.Module):
    def __init__(self, vocab, dim, layers, heads, experts, expert_hidden, seq_len):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Parameter(torch.randn(seq_len, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, experts, expert_hidden) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe[: idx.shape[1]]
        aux_total = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            x, aux = block(x)
            aux_total = aux_total + aux
        return self.head(self.ln_f(x)), aux_total / len(self.blocks)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--aux-weight", type=float, default=0.01)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg = dict(SIZES[args.size])
    batch_size = args.batch_size or cfg.pop("batch_size")
    cfg.pop("batch_size", None)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = MoETransformer(**cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr or (3e-3 if args.size == "tiny" else 3e-4),
                                  weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=optimizer.param_groups[0]["lr"],
                                                    total_steps=args.steps, pct_start=0.1)
    use_amp = device.type == "cuda"
    print(f"MoE: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params "
          f"({cfg['experts']} experts/layer, top-2), batch {batch_size} x {cfg['seq_len']}")

    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        start = torch.randint(cfg["vocab"], (batch_size, 1), generator=gen)
        stride = torch.randint(1, 4, (batch_size, 1), generator=gen)
        data = ((start + stride * torch.arange(cfg["seq_len"] + 1)) % cfg["vocab"]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits, aux = model(data[:, :-1])
        lm_loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), data[:, 1:].reshape(-1))
        loss = lm_loss + args.aux_weight * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {lm_loss.item():.4f}  aux {aux.item():.3f}  {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
