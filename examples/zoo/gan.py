"""DCGAN in the shape of the PyTorch DCGAN tutorial: netG/netD as nn.Sequential `main`, two Adam optimizers.

    python examples/zoo/gan.py --steps 40                  # 16x16 images, CPU
    python examples/zoo/gan.py --size gpu --steps 50       # 128x128, ngf=ndf=128, batch 1024, bf16 autocast, one H200
Each iteration: (1) update D on real + fake.detach(), (2) update G through D(fake). BCEWithLogits, labels 1/0.
"""

import argparse
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZES = {
    "tiny": dict(image_size=16, nz=16, ngf=8, ndf=8, batch_size=32),
    # 128x128 RGB, ngf=ndf=128, nz=128 (G 49M, D 45M params), batch 1024. Estimated, not measured: peak
    # ~13 GiB (G's forward graph kept through D's update, plus a D graph), ~200 ms/iteration on an H200.
    "gpu": dict(image_size=128, nz=128, ngf=128, ndf=128, batch_size=1024),
}


def weights_init(m):
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        nn.init.normal_(m.weight.data, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        nn.init.normal_(m.weight.data, 1.0, 0.02)
        nn.init.constant_(m.bias.data, 0)


class Generator(nn.Module):
    def __init__(self, nz, ngf, image_size, nc=3):
        super().__init__()
        n_up = image_size.bit_length() - 3  # doublings from 4x4 up to image_size
        mult = 2 ** (n_up - 1)
        layers = [nn.ConvTranspose2d(nz, ngf * mult, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * mult), nn.ReLU(True)]
        for _ in range(n_up - 1):
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(ngf * mult // 2), nn.ReLU(True)]
            mult //= 2
        layers += [nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, input):
        return self.main(input)


class Discriminator(nn.Module):
    def __init__(self, ndf, image_size, nc=3):
        super().__init__()
        n_down = image_size.bit_length() - 3
        layers = [nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        mult = 1
        for _ in range(n_down - 1):
            layers += [nn.Conv2d(ndf * mult, ndf * mult * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * mult * 2),
                       nn.LeakyReLU(0.2, inplace=True)]
            mult *= 2
        layers += [nn.Conv2d(ndf * mult, 1, 4, 1, 0, bias=False)]
        self.main = nn.Sequential(*layers)

    def forward(self, input):
        return self.main(input).view(-1)


def real_batch(batch, size, device):
    """'Real' data: soft horizontal colour stripes with a random phase, in [-1, 1]."""
    yy = torch.linspace(0, 6.2832, size, device=device).view(1, 1, size, 1)
    phase = torch.rand(batch, 3, 1, 1, device=device) * 6.2832
    img = torch.sin(yy * 2 + phase).expand(batch, 3, size, size)
    return (img + 0.05 * torch.randn(batch, 3, size, size, device=device)).clamp(-1, 1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", "--niter", dest="steps", type=int, default=40, help="G/D iterations")
    p.add_argument("--batch-size", "--batchSize", dest="batch_size", type=int)
    p.add_argument("--lr", type=float, default=0.0002)
    p.add_argument("--beta1", type=float, default=0.5)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", "--manualSeed", dest="seed", type=int, default=999)
    args = p.parse_args()
    cfg = SIZES[args.size]
    batch_size = args.batch_size or cfg["batch_size"]
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    use_amp = device.type == "cuda"

    netG = Generator(cfg["nz"], cfg["ngf"], cfg["image_size"]).to(device)
    netG.apply(weights_init)
    netD = Discriminator(cfg["ndf"], cfg["image_size"]).to(device)
    netD.apply(weights_init)
    print(f"G {sum(p.numel() for p in netG.parameters()) / 1e6:.2f}M, D {sum(p.numel() for p in netD.parameters()) / 1e6:.2f}M params")

    criterion = nn.BCEWithLogitsLoss()
    fixed_noise = torch.randn(64, cfg["nz"], 1, 1, device=device)
    real_label, fake_label = 1.0, 0.0
    optimizerD = torch.optim.Adam(netD.parameters(), lr=args.lr, betas=(args.beta1, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=args.lr, betas=(args.beta1, 0.999))

    for i in range(args.steps):
        ############################
        # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
        ###########################
        netD.zero_grad()
        real = real_batch(batch_size, cfg["image_size"], device)
        label = torch.full((batch_size,), real_label, dtype=torch.float, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            output = netD(real)
            errD_real = criterion(output.float(), label)
        errD_real.backward()
        D_x = torch.sigmoid(output.float()).mean().item()

        noise = torch.randn(batch_size, cfg["nz"], 1, 1, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            fake = netG(noise)
            output = netD(fake.detach())
            errD_fake = criterion(output.float(), label.fill_(fake_label))
        errD_fake.backward()
        D_G_z1 = torch.sigmoid(output.float()).mean().item()
        errD = errD_real + errD_fake
        optimizerD.step()

        ############################
        # (2) Update G network: maximize log(D(G(z)))
        ###########################
        netG.zero_grad()
        label.fill_(real_label)  # fake labels are real for generator cost
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            output = netD(fake)
            errG = criterion(output.float(), label)
        errG.backward()
        D_G_z2 = torch.sigmoid(output.float()).mean().item()
        optimizerG.step()

        if i % 5 == 0 or i == args.steps - 1:
            print(f"[{i}/{args.steps}] Loss_D: {errD.item():.4f} Loss_G: {errG.item():.4f} "
                  f"D(x): {D_x:.4f} D(G(z)): {D_G_z1:.4f} / {D_G_z2:.4f}")

    with torch.no_grad():
        sample = netG(fixed_noise)
    print(f"done: sample batch {tuple(sample.shape)}, mean |x| {sample.abs().mean():.3f}, "
          f"distance to real {F.mse_loss(sample, real_batch(64, cfg['image_size'], device)).item():.3f}")


if __name__ == "__main__":
    main()
