"""Seq2seq with a T5 encoder-decoder from 🤗 transformers, built from a T5Config (random init, no download).

    python examples/zoo/encoder_decoder.py --steps 40                # tiny T5, CPU
    python examples/zoo/encoder_decoder.py --size gpu --steps 50     # T5-base shape, 8 x 512 -> 512, bf16, one H200
Teacher forcing: `labels` go in, the model shifts them right into decoder_input_ids and returns the loss.
Task: a fixed token-by-token 'translation' of the source (needs cross-attention). Plain AdamW.
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import T5Config, T5ForConditionalGeneration, get_linear_schedule_with_warmup

SIZES = {
    "tiny": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=40,
                 src_len=12, tgt_len=16, batch_size=32),
    # T5-base shape (~220M params), batch 8, 512 source / 512 target tokens. T5 materialises attention scores
    # (with the relative position bias). Estimated, not measured: peak ~17 GiB (3.6 GiB states, ~12 GiB
    # attention + layer activations, ~1.3 GiB logits), ~200 ms/step on an H200.
    "gpu": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12,
                vocab_size=32128, src_len=512, tgt_len=512, batch_size=8),
}

PAD, EOS = 0, 1


def reverse_task(batch_size, src_len, vocab, gen):
    lengths = torch.randint(src_len // 2, src_len, (batch_size,), generator=gen)
    src = torch.full((batch_size, src_len), PAD)
    tgt = torch.full((batch_size, src_len), -100)  # -100: ignored by the loss
    for i, n in enumerate(lengths.tolist()):
        toks = torch.randint(2, vocab, (n,), generator=gen)
        src[i, :n] = toks
        src[i, n] = EOS
        tgt[i, :n] = (toks * 7 + 3) % (vocab - 2) + 2  # a fixed "translation" of each token, same order
        tgt[i, n] = EOS
    return src, (src != PAD).long(), tgt


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg = dict(SIZES[args.size])
    src_len = cfg.pop("src_len")
    cfg.pop("tgt_len")
    batch_size = args.batch_size or cfg.pop("batch_size")
    cfg.pop("batch_size", None)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    config = T5Config(**cfg, dropout_rate=0.1, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD,
                      feed_forward_proj="relu", tie_word_embeddings=True, use_cache=False)
    model = T5ForConditionalGeneration(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr or (3e-3 if args.size == "tiny" else 3e-4))
    scheduler = get_linear_schedule_with_warmup(optimizer, max(1, args.steps // 10), args.steps)
    use_bf16 = device.type == "cuda"
    print(f"T5: {model.num_parameters() / 1e6:.1f}M params, batch {batch_size}, src/tgt {src_len} tokens")

    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(args.steps):
        input_ids, attention_mask, labels = (t.to(device) for t in reverse_task(batch_size, src_len,
                                                                                 cfg["vocab_size"], gen))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {out.loss.item():.4f}")
    print("done")


if __name__ == "__main__":
    main()
