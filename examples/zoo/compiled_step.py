"""A regression MLP trained through a compiled *train step*: `train_step = torch.compile(train_step)` holds the
forward, backward, GradScaler's unscale + clip and the optimizer step, the model itself is not compiled.

    python examples/zoo/compiled_step.py --steps 20                         # tiny, CPU (inductor compiles: ~20 s)
    python examples/zoo/compiled_step.py --backend eager --steps 20         # Dynamo only (fast on a CPU)
    python examples/zoo/compiled_step.py --size gpu --steps 50              # 16 x 2048 blocks, fp16 autocast, one H200

Each block's activation is a custom `torch.autograd.Function` (squared ReLU with its own backward); Adam with a
separate LR for the norms, a warm-up then cosine `SequentialLR` stepped outside the compiled step.
"""

import argparse
import time

import torch
import torch.nn as nn

SIZES = {
    "tiny": dict(dim=64, n_layers=3, tokens=16, batch_size=64),
    # 537M params (16 x 2 x 2048 x 8192), 256 x 64 tokens. Estimated, not measured: ~8.6 GB of fp32 weights,
    # gradients and Adam state, ~1 GB of fp16 activations per block eager.
    "gpu": dict(dim=2048, n_layers=16, tokens=64, batch_size=256),
}


class SquaredReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.relu(x) ** 2

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 2 * torch.relu(x)


class MLPBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.down(SquaredReLU.apply(self.up(self.norm(x))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    cfg = SIZES[a.size]
    bs = a.batch_size or cfg["batch_size"]
    torch.manual_seed(a.seed)
    cuda = a.device.startswith("cuda")
    d = cfg["dim"]
    model = nn.Sequential(*[MLPBlock(d) for _ in range(cfg["n_layers"])], nn.Linear(d, 1)).to(a.device)
    norms = [p for n, p in model.named_parameters() if ".norm." in n]
    rest = [p for n, p in model.named_parameters() if ".norm." not in n]
    opt = torch.optim.Adam([{"params": rest}, {"params": norms, "lr": a.lr / 3}], lr=a.lr)
    warm = torch.optim.lr_scheduler.LinearLR(opt, 0.1, 1.0, total_iters=5)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, a.steps - 5))
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[5])
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    target = torch.randn(d, 1, device=a.device) / d**0.5  # a fixed linear teacher: the loss can fall

    def train_step(x, y):
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            loss = nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step = train_step if a.no_compile else torch.compile(train_step, backend=a.backend)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, batch {bs} x {cfg['tokens']}, "
          f"{'eager' if a.no_compile else a.backend}", flush=True)
    for i in range(a.steps):
        x = torch.randn(bs, cfg["tokens"], d, device=a.device)
        y = x @ target
        t0 = time.perf_counter()
        loss = step(x, y)
        sched.step()
        if i % 5 == 0 or i == a.steps - 1:
            print(f"step {i:3d}  loss {loss.item():.5f}  {(time.perf_counter() - t0) * 1e3:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
