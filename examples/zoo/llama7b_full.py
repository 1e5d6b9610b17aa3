"""Full fine-tune of a Llama-2-7B-shaped model (transformers `LlamaConfig`, random init): the usual script.

    python examples/zoo/llama7b_full.py --steps 5                        # tiny (the default), CPU, seconds
    python examples/zoo/llama7b_full.py --size 7b --steps 20             # one GPU: ~128 GiB as written
    memtune profile examples/zoo/llama7b_full.py -- --size 7b --steps 8  # then `memtune tune ... --budget 24GiB`

What a user writes: fp32 weights built on the host, `model.to(device)`, bf16 autocast, AdamW, global-norm
clipping (--clip, 0 = none), a linear-warmup cosine schedule, gradient accumulation (--grad-accum), batch 1 x
2048 tokens of synthetic data. --size 1b / 3b are smaller Llamas of the same recipe. --json FILE writes the
losses, step times (after --warmup steps) and the peak, for benchmarks/offload7b.py.
"""

import argparse
import json
import math
import sys
import time

import torch

try:
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:
    sys.exit("examples/zoo/llama7b_full.py needs transformers: pip install transformers")

SIZES = {  # Llama-2-7B (Touvron et al. 2023), and Llama-shaped 3B / 1B (TinyLlama's 1.1B shape)
    "tiny": dict(layers=2, hidden=128, intermediate=344, heads=4, kv_heads=4, vocab=1000, seq_len=64),
    "1b": dict(layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000, seq_len=2048),
    "3b": dict(layers=26, hidden=3200, intermediate=8640, heads=32, kv_heads=32, vocab=32000, seq_len=2048),
    "7b": dict(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000, seq_len=2048),
}


def build(size: str, seq_len: int | None = None) -> tuple[LlamaForCausalLM, dict]:
    cfg = dict(SIZES[size])
    if seq_len:
        cfg["seq_len"] = seq_len
    config = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                         num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["kv_heads"], max_position_embeddings=cfg["seq_len"],
                         attn_implementation="sdpa", use_cache=False)
    model = LlamaForCausalLM(config)  # fp32 weights, on the host
    return model, cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="tiny (CPU) | 1b | 3b | 7b")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--clip", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="transformers' own checkpointing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write losses, step times and the peak here")
    args = p.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    model, cfg = build(args.size, args.seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    model.to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    print(f"Llama {args.size}: {n_params / 1e9:.2f}B parameters, batch {args.batch_size} x {cfg['seq_len']} "
          f"x {args.grad_accum} micro-batches on {device}", flush=True)

    gen = torch.Generator().manual_seed(1234)
    tokens = args.batch_size * cfg["seq_len"] * args.grad_accum
    losses, times = [], []
    model.train()
    for step in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(args.grad_accum):
            ids = torch.randint(cfg["vocab"], (args.batch_size, cfg["seq_len"]), generator=gen).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            (loss / args.grad_accum).backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # (synchronizes: the step's time is all of it)
        times.append(time.perf_counter() - t0)
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}  {times[-1] * 1e3:.0f} ms", flush=True)
    timed = times[args.warmup:] or times
    med = sorted(timed)[len(timed) // 2]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    print(f"median step {med * 1e3:.0f} ms, {tokens / med:.0f} tokens/s"
          + (f", peak {peak / 2**30:.2f} GiB" if peak else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"losses": losses, "step_times": times, "median_step_s": med, "tokens_per_step": tokens,
                       "tokens_per_s": tokens / med, "peak_bytes": peak, "n_params": n_params}, f)


if __name__ == "__main__":
    main()
