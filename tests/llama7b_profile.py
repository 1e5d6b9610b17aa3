"""A hand-built profile of the usual Llama-2-7B full fine-tune (fp32 weights, bf16 autocast, AdamW, clip 1.0,
batch 1 x 2048) on an H200 host (16 cores, 128 GiB), for searching plans on the cost model without a GPU.

Not a measurement: bytes from the model's shapes (fp32 weights 4 B/param, autocast's bf16 weight copies,
~230 KB of saved activations per token per layer, fp32 residual stream), times from the issue's measured
8.84k tok/s (unconstrained, checkpointed) and the H100 host's measured update rate (3.8G params/s, fp32
AdamW). The issue measured the real profile at 128 GiB; this one sums to about that.
"""

from __future__ import annotations

from memtune.profile import BlockProfile, Hardware, OptimizerProfile, Peak, Profile

GB = 1e9
SEQ = 2048
HIDDEN, INTER, VOCAB, LAYERS = 4096, 11008, 32000, 32


def llama7b_profile(batch: int = 1, clip: float | None = 1.0, host_ram_gib: float = 128.0,
                    host_rate: float = 3.8e9) -> Profile:
    block_params = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN
    emb = VOCAB * HIDDEN
    tokens = batch * SEQ
    act_tok = 230e3  # saved bytes per token per layer under bf16 autocast, fp32 residual
    copies = (block_params - 2 * HIDDEN) * 2  # autocast's bf16 copies of the fp32 matmul weights
    fwd_s = 1.8e-3 * batch  # per layer per micro-batch
    blocks = [BlockProfile(name="model.embed_tokens", cls="Embedding", kind="other", index=0,
                           param_bytes={"float32": emb * 4}, trainable_param_bytes=emb * 4, n_params=emb,
                           activation_bytes=0, output_bytes=tokens * HIDDEN * 4, fwd_s=1e-4, bwd_s=2e-4)]
    for i in range(LAYERS):
        blocks.append(BlockProfile(
            name=f"model.layers.{i}", cls="LlamaDecoderLayer", index=i + 1,
            param_bytes={"float32": block_params * 4}, trainable_param_bytes=block_params * 4, n_params=block_params,
            activation_bytes=int(tokens * act_tok + copies), input_bytes=tokens * HIDDEN * 4,
            output_bytes=tokens * HIDDEN * 4, transient_bytes=int(tokens * INTER * 4),
            bwd_transient_bytes=int(tokens * INTER * 6), fwd_s=fwd_s, bwd_s=2 * fwd_s))
    blocks.append(BlockProfile(name="model.norm", cls="LlamaRMSNorm", kind="other", index=LAYERS + 1,
                               param_bytes={"float32": HIDDEN * 4}, trainable_param_bytes=HIDDEN * 4,
                               n_params=HIDDEN, activation_bytes=tokens * HIDDEN * 4, fwd_s=1e-4, bwd_s=2e-4))
    blocks.append(BlockProfile(name="lm_head", cls="Linear", kind="other", index=LAYERS + 2,
                               param_bytes={"float32": emb * 4}, trainable_param_bytes=emb * 4, n_params=emb,
                               activation_bytes=int(tokens * HIDDEN * 2 + emb * 2), input_bytes=tokens * HIDDEN * 4,
                               output_bytes=tokens * VOCAB * 2, fwd_s=2.5e-3 * batch, bwd_s=5e-3 * batch))
    n = LAYERS * block_params + 2 * emb + HIDDEN
    params = n * 4
    step = LAYERS * 3 * fwd_s + 0.02 * batch + 0.06
    prof = Profile(
        script="examples/zoo/llama7b_full.py", argv=["--size", "7b"], device="cuda",
        hardware=Hardware(device="cuda", gpu_name="NVIDIA H200 (hand-built profile)", gpu_total_bytes=int(141 * GB),
                          host_ram_bytes=int(host_ram_gib * 2**30), cpu_cores=16, h2d_gbps=55.0, d2h_gbps=55.0,
                          d2d_gbps=4000.0, matmul_tflops={"bf16": 700.0, "fp32": 50.0},
                          host_update_params_per_s=host_rate),
        model_cls="LlamaForCausalLM", blocks=blocks,
        optimizers=[OptimizerProfile(cls="torch.optim.adamw.AdamW", kind="adamw", n_params=n, param_bytes=params,
                                     state_bytes=2 * params, hyperparams={"lr": 2e-5, "weight_decay": 0.0},
                                     step_s=0.05)],
        param_bytes=params, trainable_param_bytes=params, grad_bytes=params, optimizer_state_bytes=2 * params,
        other_activation_bytes=tokens * VOCAB * 4, loss_transient_bytes=tokens * VOCAB * 8,
        step_start_bytes=3 * params + tokens * 16, peak=Peak(allocated_bytes=0, measured=False, phase="backward"),
        step_s=step, fwd_s=LAYERS * fwd_s + 3e-3 * batch, bwd_s=2 * LAYERS * fwd_s + 6e-3 * batch, optimizer_s=0.05,
        batch_size=batch, seq_len=SEQ, tokens_per_step=tokens, autocast="bfloat16",
    )
    if clip is not None:
        prof.extra["clip_grad_norm"] = clip
    return prof
