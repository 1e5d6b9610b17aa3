"""Full fine-tune of a Llama-architecture model from `transformers`, built from a config (no download).

    python examples/hf_llama.py                   # tiny, CPU-friendly
    python examples/hf_llama.py --preset 1b       # TinyLlama-1.1B shape: 22 layers, width 2048

Synthetic tokens, AdamW, bf16 autocast on CUDA. Needs `pip install transformers`.
"""

import argparse
import sys
import time

import torch

try:
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:
    sys.exit("examples/hf_llama.py needs transformers: pip install transformers  (or pip install 'memtune[hf]')")

PRESETS = {  # TinyLlama-1.1B (Zhang et al. 2024) and a Llama-2-7B-shaped model
    "1b": dict(layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000, seq_len=2048, batch_size=4),
    "7b": dict(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000, seq_len=2048, batch_size=1),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS))
    for k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "seq_len", "batch_size"):
        p.add_argument("--" + k.replace("_", "-"), type=int)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--gradient-checkpointing", action="store_true", help="transformers' own checkpointing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    cfg = dict(layers=2, hidden=128, intermediate=344, heads=4, kv_heads=2, vocab=1000, seq_len=64, batch_size=4)
    if args.preset:
        cfg.update(PRESETS[args.preset])
    for k in cfg:
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)

    torch.manual_seed(0)
    device = torch.device(args.device)
    config = LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
        max_position_embeddings=cfg["seq_len"], attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    use_amp = device.type == "cuda"
    print(f"Llama {cfg}: {model.num_parameters() / 1e6:.1f}M parameters on {device}")

    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        ids = torch.randint(cfg["vocab"], (cfg["batch_size"], cfg["seq_len"]), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    print(f"done: {args.steps} steps in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
