"""A tiny training script for memtune's tests: every odd thing a real script may do, behind a flag."""

import argparse
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLPBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Net(nn.Module):
    def __init__(self, width, depth, classes):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList(MLPBlock(width) for _ in range(depth))
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return self.out(x)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--fail-at", type=int, default=-1, help="raise ValueError at this step")
    p.add_argument("--no-optimizer", action="store_true")
    p.add_argument("--no-step", action="store_true", help="build an optimizer, never step it")
    p.add_argument("--scaler", action="store_true", help="GradScaler path (enabled on CPU)")
    p.add_argument("--opt-first", action="store_true", help="optimizer over parameters before the module holds them")
    p.add_argument("--catch-all", action="store_true", help="wrap the loop in `except Exception`")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cpu")
    if "--echo" in sys.argv:  # print the arguments as received, untouched
        print("ARGV", sys.argv[1:])
        return
    args = p.parse_args()
    torch.manual_seed(0)
    if args.opt_first:
        net = Net.__new__(Net)
        nn.Module.__init__(net)
        tmp = Net(args.width, args.depth, 3)
        params = list(tmp.parameters())
        opt = torch.optim.SGD(params, lr=0.01)
        net.inp, net.blocks, net.out = tmp.inp, tmp.blocks, tmp.out
        del tmp
        model = net
    else:
        model = Net(args.width, args.depth, 3).to(args.device)
        opt = None if args.no_optimizer else torch.optim.AdamW(model.parameters(), lr=1e-3)
    if args.compile:
        model = torch.compile(model)
    scaler = torch.amp.GradScaler("cpu", enabled=args.scaler)
    try:
        for step in range(args.steps):
            if step == args.fail_at:
                raise ValueError(f"boom at step {step}")
            for _ in range(args.accum):
                x = torch.randn(args.batch_size, 8, device=args.device)
                y = torch.randint(3, (args.batch_size,), device=args.device)
                loss = F.cross_entropy(model(x), y) / args.accum
                scaler.scale(loss).backward()
            if opt is not None and not args.no_step:
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
    except Exception:
        if not args.catch_all:
            raise
        print("caught")
    print(f"done {args.steps}")


if __name__ == "__main__":
    main()
