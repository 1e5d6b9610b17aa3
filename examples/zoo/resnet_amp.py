"""ImageNet-style ResNet training (torchvision-style Bottleneck ResNet, written out), fp16 AMP + GradScaler.

    python examples/zoo/resnet_amp.py --steps 30                       # tiny ResNet on 32x32, CPU
    python examples/zoo/resnet_amp.py --size gpu --steps 50             # ResNet-50, 224x224, batch 256, one H200
SGD + nesterov, cosine LR per iteration, channels_last, DataLoader over a synthetic image dataset.
"""

import argparse
import os
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

SIZES = {
    "tiny": dict(layers=[1, 1, 1, 1], width=8, image_size=32, num_classes=10, batch_size=32),
    # ResNet-50 (25.6M params), 256 x 3 x 224 x 224, fp16 autocast, channels_last.
    # Estimated, not measured: peak ~14 GiB (almost all activations; weights/grads/momentum ~0.3 GiB),
    # ~110 ms/step on an H200 (8 DataLoader workers feed it).
    "gpu": dict(layers=[3, 4, 6, 3], width=64, image_size=224, num_classes=1000, batch_size=256),
}


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, layers, width=64, num_classes=1000, zero_init_residual=True):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * Bottleneck.expansion, stride),
                                       nn.BatchNorm2d(planes * Bottleneck.expansion))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class SyntheticImageNet(Dataset):
    """Each class is a fixed random low-frequency 'texture'; a sample is its texture plus noise, normalised."""

    def __init__(self, n, num_classes, image_size, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.low = torch.randn(num_classes, 3, 8, 8, generator=g)
        self.labels = torch.randint(num_classes, (n,), generator=g)
        self.image_size, self.seed = image_size, seed

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        y = int(self.labels[i])
        proto = nn.functional.interpolate(self.low[y : y + 1], size=self.image_size, mode="bilinear")[0]
        x = proto + 0.8 * torch.randn(proto.shape, generator=g)
        if torch.rand(1, generator=g) < 0.5:  # random horizontal flip
            x = x.flip(-1)
        return x, y


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="training iterations")
    p.add_argument("-b", "--batch-size", type=int)
    p.add_argument("--lr", type=float, default=None, help="peak LR (default 0.1 x batch/256)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", "--weight-decay", type=float, default=5e-5)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("-j", "--workers", type=int, default=min(8, os.cpu_count() or 1) if torch.cuda.is_available() else 0)
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--print-freq", type=int, default=5)
    args = p.parse_args()
    cfg = SIZES[args.size]
    batch_size = args.batch_size or cfg["batch_size"]

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    use_amp = device.type == "cuda" and not args.no_amp
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    model = ResNet(cfg["layers"], cfg["width"], cfg["num_classes"]).to(device, memory_format=torch.channels_last)
    criterion = nn.CrossEntropyLoss().to(device)
    lr = args.lr or 0.1 * batch_size / 256 * (4 if args.size == "tiny" else 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, nesterov=True,
                                weight_decay=args.wd)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    dataset = SyntheticImageNet(max(1024, args.steps * batch_size), cfg["num_classes"], cfg["image_size"], args.seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=args.workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=args.workers > 0)
    print(f"ResNet{cfg['layers']} width {cfg['width']}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"params, batch {batch_size} x {cfg['image_size']}px, amp={use_amp}")

    model.train()
    it, end = 0, time.time()
    while it < args.steps:
        for images, target in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            target = target.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                output = model(images)
                loss = criterion(output, target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if it % args.print_freq == 0 or it == args.steps - 1:
                acc1 = (output.argmax(1) == target).float().mean().item() * 100
                print(f"[{it}/{args.steps}] loss {loss.item():.4f}  acc@1 {acc1:.1f}  "
                      f"lr {scheduler.get_last_lr()[0]:.4f}  time {time.time() - end:.3f}s")
            end = time.time()
            it += 1
            if it >= args.steps:
                break


if __name__ == "__main__":
    main()
