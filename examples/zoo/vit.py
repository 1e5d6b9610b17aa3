"""Vision Transformer classification (timm-style ViT written out: conv patch embed, cls token, pre-norm blocks).

    python examples/zoo/vit.py --steps 40                  # tiny ViT on 32x32, CPU
    python examples/zoo/vit.py --size gpu --steps 50       # ViT-B/16 at 224x224, batch 256, bf16 autocast, one H200
AdamW with no decay on norms/biases/tokens, label smoothing, linear warmup then cosine (SequentialLR),
stochastic depth, images generated on the device each step (no DataLoader).
"""

import argparse
import time
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZES = {
    "tiny": dict(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=4, num_classes=10, batch_size=32),
    # ViT-B/16 (86M params), 197 tokens, batch 256. Estimated, not measured: peak ~19 GiB (1.4 GiB
    # params+grads+AdamW, ~17 GiB activations), ~140 ms/step on an H200.
    "gpu": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=1000,
                batch_size=256),
}


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans=3, embed_dim=768):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # B, N, C


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, num_classes=1000, embed_dim=768, depth=12, num_heads=12,
                 drop_path_rate=0.1):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, embed_dim) * 0.02)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, drop_path=dpr[i], norm_layer=norm_layer)
                                      for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward_features(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x):
        return self.head(self.forward_features(x)[:, 0])


def param_groups_weight_decay(model, weight_decay):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg = dict(SIZES[args.size])
    batch_size = args.batch_size or cfg.pop("batch_size")
    cfg.pop("batch_size", None)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    model = VisionTransformer(**cfg).to(device)
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, args.weight_decay),
                                  lr=args.lr or (2e-3 if args.size == "tiny" else 1e-3), betas=(0.9, 0.999))
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 8)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, args.steps - warmup), eta_min=1e-6),
    ], milestones=[warmup])
    criterion = nn.CrossEntropyLoss(label_smoothing=args.smoothing)

    # synthetic "dataset": one fixed smooth template per class, samples = template + noise
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    templates = F.interpolate(torch.randn(cfg["num_classes"], 3, 4, 4, generator=g), size=cfg["img_size"],
                              mode="bicubic", align_corners=False).to(device)
    print(f"ViT: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{model.patch_embed.num_patches + 1} tokens, batch {batch_size}, amp={amp_dtype}")

    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        target = torch.randint(cfg["num_classes"], (batch_size,), device=device)
        images = templates[target] + torch.randn(batch_size, 3, cfg["img_size"], cfg["img_size"], device=device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            loss = criterion(model(images), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step}/{args.steps}  loss {loss.item():.4f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                  f"{(time.perf_counter() - t0) / (step + 1) * 1000:.0f} ms/step")


if __name__ == "__main__":
    main()
