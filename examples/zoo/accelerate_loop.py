"""Sequence classification with a hand-written transformer encoder, driven by 🤗 Accelerate (a plain loop).

    python examples/zoo/accelerate_loop.py --steps 40                 # tiny, CPU
    python examples/zoo/accelerate_loop.py --size gpu --steps 50      # 24 x 1024 encoder, bf16, one H200
Padded variable-length batches with an attention mask, Accelerator(mixed_precision=...), prepare(), backward(),
clip_grad_norm_(), a linear-warmup scheduler stepped by the prepared scheduler.
"""

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset

SIZES = {
    "tiny": dict(vocab=200, dim=64, depth=2, heads=4, max_len=48, num_classes=4, batch_size=16),
    # ~300M params, 32 x <=512 tokens (padded). Estimated, not measured: peak ~22 GiB (4.8 GiB states,
    # ~17 GiB activations), ~130 ms/step on an H200 with mixed_precision="bf16".
    "gpu": dict(vocab=30000, dim=1024, depth=24, heads=16, max_len=512, num_classes=4, batch_size=32),
}


class KeywordDataset(Dataset):
    """Random token sequences of random length; class c sequences contain keyword token c+1 many times."""

    def __init__(self, n, vocab, max_len, num_classes, seed):
        self.n, self.vocab, self.max_len, self.num_classes, self.seed = n, vocab, max_len, num_classes, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        length = int(torch.randint(self.max_len // 2, self.max_len + 1, (1,), generator=g))
        label = int(torch.randint(self.num_classes, (1,), generator=g))
        ids = torch.randint(self.num_classes + 2, self.vocab, (length,), generator=g)
        where = torch.rand(length, generator=g) < 0.2
        ids[where] = label + 1
        return {"input_ids": ids, "label": label}


def collate(batch, pad_id=0):
    longest = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), longest, dtype=torch.bool)
    for row, b in enumerate(batch):
        ids[row, : len(b["input_ids"])] = b["input_ids"]
        mask[row, : len(b["input_ids"])] = True
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([b["label"] for b in batch])}


class SelfAttention(nn.Module):
    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, hidden_states, attention_mask=None):
        b, t, d = hidden_states.shape
        q, k, v = (proj(hidden_states).view(b, t, self.heads, -1).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        attn_mask = attention_mask[:, None, None, :] if attention_mask is not None else None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    def __init__(self, dim, heads, dropout=0.1):
        super().__init__()
        self.attention = SelfAttention(dim, heads, dropout)
        self.attention_norm = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout),
                                          nn.Linear(4 * dim, dim))
        self.ffn_norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, hidden_states, attention_mask=None):
        hidden_states = hidden_states + self.drop(self.attention(self.attention_norm(hidden_states),
                                                                 attention_mask=attention_mask))
        return hidden_states + self.drop(self.feed_forward(self.ffn_norm(hidden_states)))


class Encoder(nn.Module):
    def __init__(self, dim, depth, heads):
        super().__init__()
        self.layer = nn.ModuleList([EncoderLayer(dim, heads) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, hidden_states, attention_mask=None):
        for layer in self.layer:
            hidden_states = layer(hidden_states, attention_mask=attention_mask)
        return self.final_norm(hidden_states)


class TextClassifier(nn.Module):
    def __init__(self, vocab, dim, depth, heads, max_len, num_classes):
        super().__init__()
        self.embeddings = nn.ModuleDict({"tokens": nn.Embedding(vocab, dim, padding_idx=0),
                                         "positions": nn.Embedding(max_len, dim)})
        self.encoder = Encoder(dim, depth, heads)
        self.classifier = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, num_classes))

    def forward(self, input_ids, attention_mask):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.embeddings["tokens"](input_ids) + self.embeddings["positions"](pos)
        h = self.encoder(h, attention_mask=attention_mask)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)  # masked mean pooling
        return self.classifier(pooled)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: bf16 on CUDA, no on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0)
    args = p.parse_args()
    cfg = dict(SIZES[args.size])
    batch_size = args.batch_size or cfg.pop("batch_size")
    cfg.pop("batch_size", None)

    on_cuda = args.device.startswith("cuda")
    accelerator = Accelerator(mixed_precision=args.mixed_precision or ("bf16" if on_cuda else "no"),
                              cpu=not on_cuda)
    set_seed(args.seed)

    model = TextClassifier(**cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr or (1e-3 if args.size == "tiny" else 1e-4),
                                  weight_decay=0.01)
    ds = KeywordDataset(100_000, cfg["vocab"], cfg["max_len"], cfg["num_classes"], args.seed)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, collate_fn=collate, num_workers=args.num_workers,
                        drop_last=True)
    warmup = max(1, args.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (args.steps - s) / max(1, args.steps - warmup)))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    accelerator.print(f"TextClassifier: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
                      f"mixed_precision={accelerator.mixed_precision}, device={accelerator.device}")

    model.train()
    step = 0
    epochs = math.ceil(args.steps / len(loader))
    for _ in range(epochs):
        for batch in loader:
            logits = model(batch["input_ids"], batch["attention_mask"])
            loss = F.cross_entropy(logits, batch["labels"])
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            if step % 10 == 0 or step == args.steps - 1:
                acc = (logits.argmax(-1) == batch["labels"]).float().mean()
                accelerator.print(f"step {step:4d}  loss {loss.item():.4f}  acc {acc.item():.2f}")
            step += 1
            if step >= args.steps:
                break
    accelerator.print(f"done: {step} steps")


if __name__ == "__main__":
    main()
