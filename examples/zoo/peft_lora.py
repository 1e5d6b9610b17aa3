"""LoRA fine-tuning with 🤗 peft on a Qwen2-architecture causal LM built from a config (no download), plain loop.

    python examples/zoo/peft_lora.py --steps 40                  # tiny, CPU
    python examples/zoo/peft_lora.py --size gpu --steps 50       # ~1.1B base in bf16 + fp32 adapters, one H200
    python examples/zoo/peft_lora.py --size 7b --steps 20        # a Llama-2-7B-shaped base (13.5 GB in bf16)
SFT-style data (loss only on the answer tokens: labels -100 on the prompt), the loss comes from the model's
ModelOutput, AdamW over the adapters, cosine schedule with warmup from transformers.
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    get_cosine_schedule_with_warmup,
)

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300, prompt_len=24, batch_size=16, rank=8,
                 initializer_range=0.2),  # stands in for a trained base: a frozen tied head needs wide embeddings
    # ~1.1B-param base (h=2048, 24 layers, GQA 16/2) in bf16, rank-16 adapters on all linears, 4 x 2048 tokens.
    # Estimated, not measured: peak ~20 GiB (2.2 GiB frozen bf16 weights, ~15 GiB activations, ~2.5 GiB
    # logits/loss), ~150 ms/step on an H200.
    "gpu": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
                num_key_value_heads=2, vocab_size=32000, prompt_len=1024, batch_size=4, rank=16),
    # Llama-2-7B's shape (untied head), random init: 13.5 GB of bf16 base weights, 1 x 2049 tokens.
    "7b": dict(arch="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, prompt_len=1024, batch_size=1,
               rank=16, tie_word_embeddings=False),
}


def make_batch(batch_size, prompt_len, vocab, gen, device):
    """prompt = random tokens, answer = a 'label word' (one of 8) per prompt token; labels mask out the prompt."""
    prompt = torch.randint(11, vocab, (batch_size, prompt_len), generator=gen)
    answer = 3 + prompt % 8
    sep = torch.full((batch_size, 1), 2)
    input_ids = torch.cat([prompt, sep, answer], dim=1)
    labels = input_ids.clone()
    labels[:, : prompt_len + 1] = -100
    attention_mask = torch.ones_like(input_ids)
    return {k: v.to(device) for k, v in
            dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels).items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg = dict(SIZES[args.size])
    prompt_len, rank = cfg.pop("prompt_len"), cfg.pop("rank")
    batch_size = args.batch_size or cfg.pop("batch_size")
    cfg.pop("batch_size", None)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    llama = cfg.pop("arch", "qwen2") == "llama"
    cfg.setdefault("tie_word_embeddings", True)
    config = (LlamaConfig if llama else Qwen2Config)(**cfg, max_position_embeddings=4096, use_cache=False)
    # the usual recipe: base weights in bf16 on the GPU, adapters kept in fp32 by peft, autocast for the math
    base = (LlamaForCausalLM if llama else Qwen2ForCausalLM)(config)
    base = base.to(device=device, dtype=torch.bfloat16 if on_cuda else torch.float32)
    if args.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()

    lora_config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(base, lora_config)
    model.print_trainable_parameters()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=args.lr or (5e-3 if args.size == "tiny" else 2e-4), weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, args.steps // 10), args.steps)
    gen = torch.Generator().manual_seed(args.seed)

    model.train()
    for step in range(args.steps):
        batch = make_batch(batch_size, prompt_len, cfg["vocab_size"], gen, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
            outputs = model(**batch)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {outputs.loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.2e}")
    print(f"done: {args.steps} steps")


if __name__ == "__main__":
    main()
