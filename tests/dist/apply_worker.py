"""torchrun worker: run the user's DDP script (tests/dist/ddp_train.py) through memtune's patcher with each
sharding stage, as `torchrun --nproc-per-node 2 -m memtune apply plan.yaml` does.

    torchrun --nproc-per-node 2 tests/dist/apply_worker.py OUT_DIR      # rank 0 writes OUT_DIR/apply.json
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from memtune.patcher import run_apply
from memtune.strategies import plan_from_dict


def main():
    out = Path(sys.argv[1])
    script = Path(__file__).with_name("ddp_train.py")
    results = {}
    for stage in (1, 2, 3):
        losses = out / f"apply{stage}.json"
        res = run_apply(plan_from_dict({"sharding": {"stage": stage}}), str(script), ["--out", str(losses)])
        dist.barrier()  # the script (which created the process group) has finished on every rank
        results[stage] = {"failure": res.failure, "notes": [list(n) for n in res.notes], "steps": res.steps,
                          "script": json.loads(losses.read_text()) if dist.get_rank() == 0 else None}
    if dist.get_rank() == 0:
        (out / "apply.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
