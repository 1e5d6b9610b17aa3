"""Pre-train a small Llama-style causal LM with the Hugging Face `Trainer` (random init from a config, no download).

    python examples/zoo/hf_trainer.py --max-steps 30                 # tiny, CPU, a few seconds
    python examples/zoo/hf_trainer.py --size gpu --max-steps 50      # ~270M-param Llama, bf16 on one H200
"""

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch.utils.data import Dataset
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    set_seed,
)

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, seq_len=64, batch_size=8),
    # ~271M params (h=1024, 16 layers), 8 x 1024 tokens, bf16 autocast over fp32 weights.
    # Estimated, not measured: peak ~14 GiB (4.3 GiB weights+grads+AdamW, ~7 GiB layer activations,
    # ~2.5 GiB logits/loss), ~90 ms/step on an H200.
    "gpu": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=8, vocab_size=32000, seq_len=1024, batch_size=8),
}


class PatternDataset(Dataset):
    """Token sequences that follow an arithmetic pattern (random start and stride): learnable, no files."""

    def __init__(self, n, seq_len, vocab_size, seed):
        g = torch.Generator().manual_seed(seed)
        self.start = torch.randint(vocab_size, (n, 1), generator=g)
        self.stride = torch.randint(1, 5, (n, 1), generator=g)
        self.seq_len, self.vocab_size = seq_len, vocab_size

    def __len__(self):
        return len(self.start)

    def __getitem__(self, i):
        ids = (self.start[i] + self.stride[i] * torch.arange(self.seq_len)) % self.vocab_size
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def parse_args():
    p = argparse.ArgumentParser(description="HF Trainer causal-LM pre-training on synthetic tokens")
    p.add_argument("--max-steps", "--steps", dest="max_steps", type=int, default=30)
    p.add_argument("--per-device-train-batch-size", "--batch-size", dest="batch_size", type=int, default=None)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--learning-rate", "--lr", dest="lr", type=float, default=None)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output-dir", default=None, help="default: a temporary directory")
    p.add_argument("--logging-steps", type=int, default=5)
    return p.parse_args()


def main():
    args = parse_args()
    set_seed(args.seed)
    cfg = dict(SIZES[args.size])
    seq_len = args.seq_len or cfg.pop("seq_len")
    cfg.pop("seq_len", None)
    batch_size = args.batch_size or cfg.pop("batch_size")
    cfg.pop("batch_size", None)
    on_cuda = args.device.startswith("cuda")

    config = LlamaConfig(**cfg, max_position_embeddings=max(seq_len, 128), tie_word_embeddings=False,
                         attn_implementation="sdpa", use_cache=False)
    model = LlamaForCausalLM(config)
    print(f"LlamaForCausalLM: {model.num_parameters() / 1e6:.1f}M parameters, batch {batch_size} x {seq_len}")

    n_examples = max(256, args.max_steps * batch_size * args.gradient_accumulation_steps)
    train_ds = PatternDataset(n_examples, seq_len, cfg["vocab_size"], args.seed)

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="hf_trainer_")
    training_args = TrainingArguments(
        output_dir=output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.lr or (3e-3 if args.size == "tiny" else 3e-4),
        weight_decay=0.1,
        adam_beta2=0.95,
        warmup_steps=max(1, args.max_steps // 10),
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        bf16=on_cuda,
        use_cpu=not on_cuda,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,  # plain {'loss': ...} lines instead of a progress bar
        dataloader_num_workers=0,
        seed=args.seed,
    )
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = Trainer(model=model, args=training_args, train_dataset=train_ds)
    result = trainer.train()
    print(f"done: {result.global_step} steps, train loss {result.training_loss:.4f}")


if __name__ == "__main__":
    main()
