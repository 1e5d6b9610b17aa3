"""Knowledge distillation of a language model: a larger frozen teacher (eval, no_grad) and a small student.

    python examples/zoo/distill.py --steps 40                 # tiny, CPU
    python examples/zoo/distill.py --size gpu --steps 50      # 1.2B bf16 teacher -> 200M student, bf16 autocast, one H200
loss = alpha * T^2 * KL(student/T || teacher/T) + (1 - alpha) * CE(student, labels); one AdamW on the student.
Models are nanoGPT-style (nn.ModuleDict `transformer` with `h` = nn.ModuleList). --teacher-ckpt loads a teacher.
"""

import argparse
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 512
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0


SIZES = {
    "tiny": dict(teacher=GPTConfig(64, 128, 3, 4, 96), student=GPTConfig(64, 128, 2, 2, 48), batch_size=16),
    # teacher 24 x 2048 (1.25B, held in bf16, no grad), student 12 x 1024 (~170M), vocab 16384, 16 x 1024 tokens.
    # Estimated, not measured: peak ~22 GiB (2.3 GiB teacher, 2.7 GiB student states, ~9 GiB student
    # activations, ~6 GiB teacher+student logits and the KL/CE working set), ~170 ms/step on an H200.
    "gpu": dict(teacher=GPTConfig(1024, 16384, 24, 16, 2048), student=GPTConfig(1024, 16384, 12, 16, 1024),
                batch_size=16),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=False)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=False)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(config.n_embd, 4 * config.n_embd, bias=False),
                                      c_proj=nn.Linear(4 * config.n_embd, config.n_embd, bias=False)))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        m = self.mlp
        return x + m.c_proj(F.gelu(m.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=False),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def distillation_loss(student_logits, teacher_logits, targets, temperature, alpha):
    s = student_logits.float().reshape(-1, student_logits.size(-1))
    t = teacher_logits.float().reshape(-1, teacher_logits.size(-1))
    kd = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="batchmean") * temperature**2
    ce = F.cross_entropy(s, targets.reshape(-1))
    return alpha * kd + (1 - alpha) * ce, kd, ce


def get_batch(batch_size, block_size, vocab, gen, device):
    """Arithmetic token sequences (random start and stride) -- a pattern both models can pick up."""
    start = torch.randint(vocab, (batch_size, 1), generator=gen)
    stride = torch.randint(1, 4, (batch_size, 1), generator=gen)
    data = (start + stride * torch.arange(block_size + 1)) % vocab
    return data[:, :-1].to(device), data[:, 1:].to(device)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", "--max-iters", dest="steps", type=int, default=40)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--teacher-ckpt")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()
    cfg = SIZES[args.size]
    batch_size = args.batch_size or cfg["batch_size"]
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    ptdtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    teacher = GPT(cfg["teacher"])
    if args.teacher_ckpt:
        teacher.load_state_dict(torch.load(args.teacher_ckpt, map_location="cpu"))
    teacher = teacher.to(device=device, dtype=ptdtype).eval()
    for p_ in teacher.parameters():
        p_.requires_grad = False
    student = GPT(cfg["student"]).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr or (3e-3 if args.size == "tiny" else 6e-4),
                                  betas=(0.9, 0.95), weight_decay=0.1)
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    print(f"teacher {n_t / 1e6:.1f}M ({ptdtype}), student {n_s / 1e6:.1f}M params on {device}")

    gen = torch.Generator().manual_seed(args.seed)
    sc = cfg["student"]
    student.train()
    for it in range(args.steps):
        x, y = get_batch(batch_size, sc.block_size, sc.vocab_size, gen, device)
        with torch.no_grad():
            teacher_logits = teacher(x)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            student_logits = student(x)
        loss, kd, ce = distillation_loss(student_logits, teacher_logits, y, args.temperature, args.alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        if it % 5 == 0 or it == args.steps - 1:
            print(f"iter {it}: loss {loss.item():.4f} (kd {kd.item():.4f}, ce {ce.item():.4f})")


if __name__ == "__main__":
    main()
