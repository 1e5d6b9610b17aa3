"""Hand-written LoRA: a plain-PyTorch decoder whose fp32 base weights are frozen, low-rank adapters trained.

    python examples/zoo/lora_handwritten.py --steps 40               # tiny, CPU
    python examples/zoo/lora_handwritten.py --size gpu --steps 30    # ~1.3B frozen fp32 base, bf16 autocast, one H200
Attention is written out (q @ k^T, masked softmax, dropout), adapters wrap every attention/MLP nn.Linear in place,
Adam over the trainable parameters only; the base would come from a checkpoint (--base-ckpt), random otherwise.
"""

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZES = {
    "tiny": dict(vocab=256, d_model=64, n_layer=2, n_head=4, block_size=64, batch_size=16, rank=8),
    # ~1.3B frozen fp32 params (h=2048, 24 layers), rank-16 adapters, 4 x 1024 tokens, explicit attention.
    # Estimated, not measured: peak ~22 GiB (5 GiB frozen weights, ~15 GiB activations of which ~2/3 are
    # the materialised attention probabilities), ~150 ms/step on an H200.
    "gpu": dict(vocab=32000, d_model=2048, n_layer=24, n_head=16, block_size=1024, batch_size=4, rank=16),
}


class LoRALinear(nn.Module):
    """y = base(x) + (dropout(x) @ A^T @ B^T) * alpha / r, with base frozen and B initialised to zero."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.05):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling


class Attention(nn.Module):
    def __init__(self, d_model, n_head, block_size, dropout=0.1):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)
        self.attn_drop = nn.Dropout(dropout)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size),
                             persistent=False)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_drop(att)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.c_fc = nn.Linear(d_model, 4 * d_model)
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class DecoderLayer(nn.Module):
    def __init__(self, d_model, n_head, block_size):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_head, block_size)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class DecoderLM(nn.Module):
    def __init__(self, vocab, d_model, n_layer, n_head, block_size):
        super().__init__()
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(block_size, d_model)
        self.layers = nn.ModuleList([DecoderLayer(d_model, n_head, block_size) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Embedding):  # nn.Linear keeps PyTorch's default init
            nn.init.normal_(module.weight, std=0.25)

    def forward(self, idx):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_f(x))


def add_lora(model: nn.Module, r: int, alpha: float, targets=("c_attn", "c_proj", "c_fc")):
    """Freeze everything, then replace the targeted nn.Linear children with LoRA-wrapped ones."""
    model.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name in targets:
                setattr(module, name, LoRALinear(child, r, alpha))
    return model


def markov_batch(succ, batch, length, gen):
    """Token sequences from a fixed Markov chain over a small 'domain' sub-vocabulary (2 successors each)."""
    vocab = succ.shape[0]
    seq = torch.empty(batch, length, dtype=torch.long)
    seq[:, 0] = torch.randint(vocab, (batch,), generator=gen)
    pick = torch.randint(2, (batch, length), generator=gen)
    for i in range(1, length):
        seq[:, i] = succ[seq[:, i - 1], pick[:, i]]
    return seq


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--rank", type=int)
    p.add_argument("--base-ckpt", help="state_dict of the base model (default: random init)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()
    cfg = dict(SIZES[args.size])
    batch_size = args.batch_size or cfg.pop("batch_size")
    cfg.pop("batch_size", None)
    rank = args.rank or cfg.pop("rank")
    cfg.pop("rank", None)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = DecoderLM(**cfg)
    if args.base_ckpt:
        model.load_state_dict(torch.load(args.base_ckpt, map_location="cpu"))
    model = add_lora(model, r=rank, alpha=2 * rank).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in trainable)
    print(f"base {n_all / 1e6:.1f}M params (fp32, frozen), adapters {n_train / 1e6:.2f}M trainable on {device}")
    optimizer = torch.optim.Adam(trainable, lr=args.lr or (1e-2 if args.size == "tiny" else 3e-4))
    use_amp = device.type == "cuda"

    gen = torch.Generator().manual_seed(args.seed)
    domain = min(cfg["vocab"], 48 if args.size == "tiny" else 4096)  # the fine-tuning data uses few tokens
    succ = torch.randint(domain, (domain, 2), generator=gen)
    model.train()
    t0 = time.time()
    for it in range(args.steps):
        data = markov_batch(succ, batch_size, cfg["block_size"] + 1, gen).to(device, non_blocking=True)
        x, y = data[:, :-1], data[:, 1:]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if it % 5 == 0 or it == args.steps - 1:
            print(f"iter {it}: loss {loss.item():.4f}, time {(time.time() - t0) * 1000:.0f}ms")
            t0 = time.time()


if __name__ == "__main__":
    main()
