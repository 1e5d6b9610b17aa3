"""torchrun worker for tests/test_sharding.py: every ZeRO stage on CPU/gloo against a single-process run.

    torchrun --nproc-per-node 2 tests/dist/sharding_worker.py OUT_DIR

For each stage the "script part" is written the way a user writes DDP training (it calls DDP(model) itself,
builds AdamW and an LR scheduler after); memtune's part is `install` before it and `apply` (through an
ApplyContext, as the patcher does) once the optimizer exists. Rank 0 writes OUT_DIR/results.json; the test
asserts on it.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from memtune.costmodel import BlockSim, SimStep
from memtune.distributed import measure_collectives, world
from memtune.profile import Hardware, Profile
from memtune.blocks import BlockRef
from memtune.strategies import get_strategy, make_context, plan_from_dict

V, T, W, B, STEPS = 64, 16, 32, 8, 4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(W)
        self.fc = nn.Linear(W, 4 * W)
        self.proj = nn.Linear(4 * W, W)

    def forward(self, x):
        return x + self.proj(F.gelu(self.fc(self.ln(x))))


class Tiny(nn.Module):
    # every dim 0 is even (FSDP2 shards dim 0 without padding) and the sizes pair up (ZeRO-1's greedy
    # partition is balanced): per-rank bytes are then exactly a half
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, W)
        self.pos = nn.Embedding(T, W)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.ln_f = nn.LayerNorm(W)
        self.head = nn.Linear(W, V, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def nbytes(t):
    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(V, (B, T + 1), generator=g) for _ in range(STEPS)]


def make_optimizer(params):
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))


def reference():
    """The unsharded single-process run on the global batch."""
    torch.manual_seed(0)
    model = Tiny()
    opt, sched = make_optimizer(model.parameters())
    losses = []
    for data in batches():
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), data[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    state = sum(nbytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return model, losses, state, sched.get_last_lr()[0]


def predicted(model, stage, opt_state_bytes, ws):
    """SimStep model-state fields as the profile of the unsharded run fills them, then sharding's effect()."""
    named = [("tok", model.tok), ("pos", model.pos), ("blocks.0", model.blocks[0]), ("blocks.1", model.blocks[1]),
             ("ln_f", model.ln_f), ("head", model.head)]
    blocks = []
    for name, m in named:
        pb = sum(nbytes(p) for p in m.parameters())
        blocks.append(BlockSim(name=name, kind="repeated" if name.startswith("blocks") else "other",
                               param_bytes=pb, grad_bytes=pb, fwd_s=1e-3, bwd_s=2e-3))
    total = sum(nbytes(p) for p in model.parameters())
    sim = SimStep(blocks=blocks, param_bytes=total, grad_bytes=total, opt_state_bytes=opt_state_bytes)
    profile = Profile(world_size=ws, hardware=Hardware(world_size=ws, allgather_gbps=1.0, reduce_scatter_gbps=1.0))
    get_strategy("sharding").effect(profile, get_strategy("sharding").validate({"stage": stage}), sim)
    return {"param_bytes": sim.param_bytes, "grad_bytes": sim.grad_bytes, "opt_state_bytes": sim.opt_state_bytes,
            "gather_bytes": [b.gather_bytes for b in blocks], "comm_s": sim.comm_s}


def run_stage(stage, out: Path):

    rank, ws = dist.get_rank(), dist.get_world_size()
    strategy = get_strategy("sharding")
    section = strategy.validate({"stage": stage})
    undo = strategy.install(section, None)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # ---- the user's script ----
        torch.manual_seed(0)
        raw = Tiny()
        model = DDP(raw)
        opt, sched = make_optimizer(model.parameters())
        # ---- memtune: what the patcher does once the optimizer exists ----
        prefix = "" if model is raw else "module."
        blocks = [BlockRef(f"{prefix}blocks.{i}", b, "repeated", i + 2) for i, b in enumerate(raw.blocks)]
        ctx = make_context(model, [opt], blocks, torch.device("cpu"), plan_from_dict({"sharding": section.to_dict()}))
        strategy.apply(ctx, section)
    finally:
        undo()
    counted = [0]
    hook = register_optimizer_step_post_hook(lambda *a: counted.__setitem__(0, counted[0] + 1))
    gathered_in_block = []

    def in_block(mod, args):  # inside a block's forward: gathered (non-DTensor) parameters of the blocks
        gathered_in_block.append(sum(nbytes(p) for p in raw.blocks.parameters() if not isinstance(p, DTensor)))

    handles = [b.fc.register_forward_pre_hook(in_block) for b in raw.blocks]
    losses, mem = [], {}
    half = B // ws
    for step, data in enumerate(batches()):
        data = data[rank * half:(rank + 1) * half]
        logits = model(data[:, :-1])
        if step == 0:  # forward end: sharded storage (counted after the step) + what is gathered now
            mem["unsharded_at_fwd_end"] = sum(nbytes(p) for p in raw.parameters() if not isinstance(p, DTensor))
        loss = F.cross_entropy(logits.reshape(-1, V), data[:, 1:].reshape(-1))
        loss.backward()
        if step == 0:
            mem["grad_bytes"] = sum(nbytes(p.grad) for p in raw.parameters() if p.grad is not None)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step == 0:
            local_state = opt.optim.state if stage == 1 else opt.state
            mem["opt_state_bytes"] = sum(nbytes(v) for s in local_state.values() for v in s.values()
                                         if torch.is_tensor(v))
            mem["sharded_param_bytes"] = sum(nbytes(p) for p in raw.parameters())
        opt.zero_grad(set_to_none=True)
        avg = loss.detach().clone()
        dist.all_reduce(avg)
        losses.append(avg.item() / ws)
    hook.remove()
    for h in handles:
        h.remove()
    mem["param_bytes_at_fwd_end"] = mem["sharded_param_bytes"] + (mem["unsharded_at_fwd_end"] if stage > 1 else 0)
    mem["max_gathered_in_block"] = max(gathered_in_block)

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in full.items()}
    ckpt = out / f"stage{stage}"
    dcp.save(get_model_state_dict(model), checkpoint_id=str(ckpt))  # each rank writes its shards
    dist.barrier()
    loaded_ok = None
    if rank == 0:  # load the sharded checkpoint into a plain, unsharded model in this one process
        plain = Tiny()
        sd = plain.state_dict()
        dcp.load(sd, checkpoint_id=str(ckpt), no_dist=True)
        plain.load_state_dict(sd)
        loaded_ok = all(torch.equal(plain.state_dict()[k], full[k]) for k in sd)
    dist.barrier()
    return {
        "stage": stage,
        "losses": losses,
        "ddp_replaced": model is raw,
        "model_is_ddp": type(model).__name__,
        "optimizer_class": type(opt).__name__,
        "steps_counted": counted[0],
        "lr": sched.get_last_lr()[0],
        "full_state": {k: v.tolist() for k, v in full.items()},
        "sharded_checkpoint_loads_unsharded": loaded_ok,
        "mem": mem,
        "predicted": None,
        "notes": ctx.notes,
    }


def main():
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")  # the script's own process group
    w = world()
    ref_model, ref_losses, ref_state, ref_lr = reference()
    results = {"world": [w.rank, w.world_size], "reference": {
        "losses": ref_losses, "full_state": {k: v.tolist() for k, v in ref_model.state_dict().items()},
        "lr": ref_lr}, "stages": {}}
    results["collectives"] = measure_collectives(nbytes=2**16, iters=2)
    for stage in (1, 2, 3):
        r = run_stage(stage, out)
        r["predicted"] = predicted(ref_model, stage, ref_state, w.world_size)
        per_rank = [None] * w.world_size
        dist.all_gather_object(per_rank, r["mem"])
        r["mem"] = per_rank
        results["stages"][stage] = r
    if w.rank == 0:
        (out / "results.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
