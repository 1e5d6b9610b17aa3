"""A character-level causal LM as a LightningModule (nn.TransformerEncoder + causal mask), trained by lightning.Trainer.

    python examples/zoo/lightning_module.py --steps 40                 # tiny, CPU
    python examples/zoo/lightning_module.py --size gpu --steps 50      # 24 x 1024 encoder layers, bf16-mixed, one H200
    python examples/zoo/lightning_module.py --devices 2 --device cpu   # 2 CPU ranks, DDP over gloo (Lightning starts rank 1)
"""

import argparse
import math

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

SIZES = {
    "tiny": dict(d_model=64, nhead=4, num_layers=2, dim_feedforward=256, vocab=128, seq_len=64, batch_size=16),
    # ~310M params, 8 x 1024 tokens. Estimated, not measured: peak ~15 GiB (4.8 GiB params+grads+AdamW,
    # ~9 GiB activations incl. dropout masks), ~100 ms/step on an H200 with precision="bf16-mixed".
    "gpu": dict(d_model=1024, nhead=16, num_layers=24, dim_feedforward=4096, vocab=8192, seq_len=1024, batch_size=8),
}


class MarkovText(IterableDataset):
    """An endless stream from a fixed random Markov chain (each symbol has 2 likely successors): learnable."""

    def __init__(self, vocab, seq_len, seed):
        self.vocab, self.seq_len, self.seed = vocab, seq_len, seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        succ = torch.randint(self.vocab, (self.vocab, 2), generator=g)  # the "language"
        while True:  # 256 sequences at a time, vectorised over the sequences
            seq = torch.empty(256, self.seq_len + 1, dtype=torch.long)
            seq[:, 0] = torch.randint(self.vocab, (256,), generator=g)
            choice = torch.randint(2, (256, self.seq_len), generator=g)
            noise = torch.rand(256, self.seq_len, generator=g) < 0.05
            rand_tok = torch.randint(self.vocab, (256, self.seq_len), generator=g)
            for i in range(self.seq_len):
                nxt = succ[seq[:, i], choice[:, i]]
                seq[:, i + 1] = torch.where(noise[:, i], rand_tok[:, i], nxt)
            for row in seq:
                yield row[:-1], row[1:]


class CharLM(L.LightningModule):
    def __init__(self, vocab, d_model, nhead, num_layers, dim_feedforward, seq_len, lr=1e-3, warmup=10,
                 total_steps=1000):
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(1, seq_len, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=0.1, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(d_model),
                                             enable_nested_tensor=False)
        self.lm_head = nn.Linear(d_model, vocab)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, tokens):
        t = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        h = self.embed(tokens) + self.pos[:, :t]
        h = self.encoder(h, mask=mask, is_causal=True)
        return self.lm_head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        self.log("train_loss", loss, prog_bar=False)
        if self.global_step % 10 == 0:
            self.print(f"step {self.global_step:4d}  loss {loss.item():.4f}")
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, betas=(0.9, 0.98), weight_decay=0.01)

        def lr_lambda(step):
            if step < hp.warmup:
                return (step + 1) / hp.warmup
            progress = (step - hp.warmup) / max(1, hp.total_steps - hp.warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", "--max-steps", dest="steps", type=int, default=40)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--devices", type=int, default=1, help="2+: strategy='ddp', Lightning launches the other ranks")
    args = p.parse_args()
    cfg = dict(SIZES[args.size])
    batch_size = args.batch_size or cfg.pop("batch_size")
    cfg.pop("batch_size", None)

    L.seed_everything(args.seed, verbose=False)
    model = CharLM(**cfg, lr=args.lr or (2e-3 if args.size == "tiny" else 3e-4), warmup=max(1, args.steps // 10),
                   total_steps=args.steps)
    loader = DataLoader(MarkovText(cfg["vocab"], cfg["seq_len"], args.seed), batch_size=batch_size)
    on_cuda = args.device.startswith("cuda")
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="auto" if on_cuda else "cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        precision="bf16-mixed" if on_cuda else "32-true",
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    trainer.fit(model, train_dataloaders=loader)
    print(f"done: {trainer.global_step} steps, last loss {trainer.callback_metrics['train_loss'].item():.4f}")


if __name__ == "__main__":
    main()
