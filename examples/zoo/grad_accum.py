"""BERT-style masked-LM pre-training in plain PyTorch with gradient accumulation over --accum micro-batches.

    python examples/zoo/grad_accum.py --steps 30 --accum 2             # tiny, CPU
    python examples/zoo/grad_accum.py --size gpu --steps 20 --accum 4  # BERT-large shape, 16 x 512 per micro-batch, one H200
Post-LN encoder, the model computes the MLM loss itself and returns (loss, logits); loss / accum per micro-batch,
clip, step, zero_grad(set_to_none=True) after the step; bf16 autocast on CUDA.
"""

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZES = {
    "tiny": dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, max_len=64, batch_size=16),
    # BERT-large shape (335M params), micro-batch 16 x 512, --accum 4 => 64 sequences per step.
    # Estimated, not measured: peak ~17 GiB (5.4 GiB states, gradients kept across micro-batches, ~9.5 GiB
    # activations of one micro-batch, ~2 GiB MLM logits), ~300 ms/step (4 micro-batches) on an H200.
    "gpu": dict(vocab_size=30522, hidden_size=1024, num_layers=24, num_heads=16, max_len=512, batch_size=16),
}
PAD, CLS, SEP, MASK = 0, 1, 2, 3
N_SPECIAL = 4


class BertLayer(nn.Module):
    def __init__(self, hidden, heads, dropout=0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.intermediate = nn.Linear(hidden, 4 * hidden)
        self.output = nn.Linear(4 * hidden, hidden)
        self.out_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, key_padding_mask=None):
        a, _ = self.self_attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)
        x = self.attn_norm(x + self.dropout(a))
        h = self.output(F.gelu(self.intermediate(x)))
        return self.out_norm(x + self.dropout(h))


class BertForMLM(nn.Module):
    def __init__(self, vocab_size, hidden_size, num_layers, num_heads, max_len):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size, padding_idx=PAD)
        self.position_embeddings = nn.Embedding(max_len, hidden_size)
        self.token_type_embeddings = nn.Embedding(2, hidden_size)
        self.emb_norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.emb_drop = nn.Dropout(0.1)
        self.layers = nn.ModuleList(BertLayer(hidden_size, num_heads) for _ in range(num_layers))
        self.transform = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(),
                                       nn.LayerNorm(hidden_size, eps=1e-12))
        self.decoder_bias = nn.Parameter(torch.zeros(vocab_size))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):  # BERT's: N(0, 0.02) weights, zero biases
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None):
        pos = torch.arange(input_ids.size(1), device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings(token_type_ids)
        x = self.emb_drop(self.emb_norm(x))
        pad_mask = None if attention_mask is None else attention_mask == 0
        for layer in self.layers:
            x = layer(x, key_padding_mask=pad_mask)
        # tied decoder: logits against the word embeddings
        logits = F.linear(self.transform(x), self.word_embeddings.weight, self.decoder_bias)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), labels.view(-1), ignore_index=-100)
        return loss, logits


def mask_tokens(input_ids, vocab_size, gen, mlm_probability=0.15):
    """BERT's 80/10/10 dynamic masking; labels -100 where no prediction is asked for."""
    labels = input_ids.clone()
    special = input_ids < N_SPECIAL
    prob = torch.full(labels.shape, mlm_probability)
    prob.masked_fill_(special, 0.0)
    masked = torch.bernoulli(prob, generator=gen).bool()
    labels[~masked] = -100
    replace = torch.bernoulli(torch.full(labels.shape, 0.8), generator=gen).bool() & masked
    input_ids = input_ids.clone()
    input_ids[replace] = MASK
    rand = torch.bernoulli(torch.full(labels.shape, 0.5), generator=gen).bool() & masked & ~replace
    input_ids[rand] = torch.randint(N_SPECIAL, vocab_size, labels.shape, generator=gen)[rand]
    return input_ids, labels


def make_sentences(batch, max_len, vocab_size, gen):
    """[CLS] a [SEP] b [SEP] with padding; Zipf-distributed 'words' in fixed pairs (w, w+1), as text has structure."""
    zipf = 1.0 / torch.arange(1, vocab_size - N_SPECIAL)
    ids = torch.full((batch, max_len), PAD)
    types = torch.zeros(batch, max_len, dtype=torch.long)
    mask = torch.zeros(batch, max_len, dtype=torch.long)
    for i in range(batch):
        n = int(torch.randint(max_len // 2, max_len - 3, (1,), generator=gen)) // 2 * 2
        first = N_SPECIAL + torch.multinomial(zipf, n // 2, replacement=True, generator=gen)
        words = torch.stack([first, first + 1], 1).flatten()
        cut = n // 2
        seq = torch.cat([torch.tensor([CLS]), words[:cut], torch.tensor([SEP]), words[cut:], torch.tensor([SEP])])
        ids[i, : len(seq)] = seq
        types[i, cut + 2 : len(seq)] = 1
        mask[i, : len(seq)] = 1
    return ids, types, mask


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps")
    p.add_argument("--accum", "--gradient-accumulation-steps", dest="accum", type=int, default=2)
    p.add_argument("--batch-size", type=int, help="micro-batch size")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg = dict(SIZES[args.size])
    micro_bs = args.batch_size or cfg.pop("batch_size")
    cfg.pop("batch_size", None)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = BertForMLM(**cfg).to(device)
    no_decay = ("bias", "norm")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)], "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.lr or (2e-3 if args.size == "tiny" else 1e-4), eps=1e-6)
    warmup = max(1, args.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / max(1, args.steps - warmup))))
    use_amp = device.type == "cuda"
    print(f"BertForMLM: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, micro-batch {micro_bs} x "
          f"{cfg['max_len']}, accum {args.accum} (effective batch {micro_bs * args.accum})")

    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        running = 0.0
        for _ in range(args.accum):
            ids, types, mask = make_sentences(micro_bs, cfg["max_len"], cfg["vocab_size"], gen)
            ids, labels = mask_tokens(ids, cfg["vocab_size"], gen)
            ids, types, mask, labels = (t.to(device, non_blocking=True) for t in (ids, types, mask, labels))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss, _ = model(ids, token_type_ids=types, attention_mask=mask, labels=labels)
            loss = loss / args.accum
            loss.backward()
            running += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == args.steps - 1:
            ppl = math.exp(min(running, 20))
            print(f"step {step:4d} | loss {running:.4f} | ppl {ppl:8.2f} | grad norm {grad_norm:.3f} | "
                  f"{time.time() - t0:.1f}s")
    print(f"done: {args.steps} optimizer steps x {args.accum} micro-batches")


if __name__ == "__main__":
    main()
