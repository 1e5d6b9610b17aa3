"""DDPM-style diffusion training: a UNet (time embedding, res blocks, skips, low-res attention) predicts the noise.

    python examples/zoo/unet_diffusion.py --steps 30                 # tiny UNet on 16x16, CPU
    python examples/zoo/unet_diffusion.py --size gpu --steps 50      # ~110M-param UNet, 64x64, batch 64, bf16, one H200
Linear beta schedule, MSE on the noise, AdamW, an EMA copy of the weights updated after every step.
"""

import argparse
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZES = {
    "tiny": dict(image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                 batch_size=8),
    # ~110M params (128 base channels, mult 1-2-3-4, 2 res blocks per level, attention at 16x16 and 8x8),
    # 64 x 3 x 64 x 64. Estimated, not measured: peak ~12 GiB (1.8 GiB params+grads+AdamW, 0.4 GiB EMA,
    # ~9 GiB activations, mostly GroupNorm/SiLU/conv inputs at 64x64 and 32x32), ~150 ms/step on an H200.
    "gpu": dict(image_size=64, base_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                attn_resolutions=(16, 8), batch_size=64),
}


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def norm(ch):
    return nn.GroupNorm(min(32, ch // 4), ch)


class ResBlock(nn.Module):
    def __init__(self, in_ch, out_ch, temb_ch, dropout=0.1):
        super().__init__()
        self.in_layers = nn.Sequential(norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(temb_ch, out_ch))
        self.out_layers = nn.Sequential(norm(out_ch), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class AttnBlock(nn.Module):
    def __init__(self, ch, num_heads=4):
        super().__init__()
        self.num_heads = num_heads
        self.norm = norm(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj = nn.Conv1d(ch, ch, 1)

    def forward(self, x, emb=None):
        b, c, hh, ww = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, -1))  # b, 3c, n
        q, k, v = qkv.reshape(b, 3, self.num_heads, c // self.num_heads, -1).permute(1, 0, 2, 4, 3).unbind(0)
        h = F.scaled_dot_product_attention(q, k, v)  # b, heads, n, d
        h = h.permute(0, 1, 3, 2).reshape(b, c, -1)
        return x + self.proj(h).reshape(b, c, hh, ww)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepSequential(nn.ModuleList):
    """Runs its layers in order, passing the time embedding to each."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb)
        return x


class UNet(nn.Module):
    def __init__(self, image_size, base_channels, channel_mult, num_res_blocks, attn_resolutions, in_ch=3):
        super().__init__()
        ch = base_channels
        temb = 4 * ch
        self.base_channels = ch
        self.time_embed = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.input_blocks = nn.ModuleList([TimestepSequential([_Conv(in_ch, ch)])])
        skip_chs, res = [ch], image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, mult * base_channels, temb)]
                ch = mult * base_channels
                if res in attn_resolutions:
                    layers.append(AttnBlock(ch))
                self.input_blocks.append(TimestepSequential(layers))
                skip_chs.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepSequential([Downsample(ch)]))
                skip_chs.append(ch)
                res //= 2
        self.middle_block = TimestepSequential([ResBlock(ch, ch, temb), AttnBlock(ch), ResBlock(ch, ch, temb)])
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chs.pop(), mult * base_channels, temb)]
                ch = mult * base_channels
                if res in attn_resolutions:
                    layers.append(AttnBlock(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    res *= 2
                self.output_blocks.append(TimestepSequential(layers))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, in_ch, 3, padding=1))

    def forward(self, x, timesteps):
        emb = self.time_embed(timestep_embedding(timesteps, self.base_channels))
        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


class _Conv(nn.Conv2d):
    def __init__(self, in_ch, out_ch):
        super().__init__(in_ch, out_ch, 3, padding=1)

    def forward(self, x, emb=None):
        return super().forward(x)


def synthetic_images(batch, size, gen, device):
    """Smooth random colour fields with a bright disc: a distribution with structure, in [-1, 1]."""
    low = torch.rand(batch, 3, 4, 4, generator=gen) * 2 - 1
    img = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    cx, cy = (torch.rand(2, batch, 1, 1, generator=gen) - 0.5)
    disc = (((xx - cx) ** 2 + (yy - cy) ** 2) < 0.15).float()[:, None]
    return (img * (1 - disc) + disc).clamp(-1, 1).to(device, non_blocking=True)


@torch.no_grad()
def update_ema(ema_model, model, decay):
    for ema_p, p in zip(ema_model.parameters(), model.parameters(), strict=True):
        ema_p.lerp_(p.detach(), 1 - decay)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg = dict(SIZES[args.size])
    batch_size = args.batch_size or cfg.pop("batch_size")
    cfg.pop("batch_size", None)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = UNet(**cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr or (1e-3 if args.size == "tiny" else 1e-4),
                                  weight_decay=0.0)
    betas = torch.linspace(1e-4, 0.02, args.timesteps, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0).float().to(device)
    use_amp = device.type == "cuda"
    print(f"UNet: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{cfg['image_size']}x{cfg['image_size']}, batch {batch_size}")

    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(args.steps):
        x0 = synthetic_images(batch_size, cfg["image_size"], gen, device)
        t = torch.randint(0, args.timesteps, (batch_size,), device=device)
        noise = torch.randn_like(x0)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            pred = model(x_t, t)
        loss = F.mse_loss(pred.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        update_ema(ema, model, args.ema_decay)
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:5d} | loss {loss.item():.5f}")
    print("done")


if __name__ == "__main__":
    main()
