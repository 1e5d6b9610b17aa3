#!/usr/bin/env bash
# Device call 9 (one H200, 2026-12-02): the 7B peft LoRA with an NF4 base + checkpointing (a second point for the
# prediction of issue 19), then the 7B full fine-tune's tuned 24 GiB plan beside torchao (issue 20).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
timeout 150 python3 -m memtune apply benchmarks/plans/lora7b_nf4_ckpt.yaml --steps 8 --report $OUT/lora7b_nf4_ckpt.json \
  > $OUT/apply_lora.log 2>&1
echo "apply rc=$? at ${SECONDS}s" >> $L
timeout $((480 - SECONDS)) python3 benchmarks/offload7b.py --only memtune_b12,torchao_b8 --steps 5 --warmup 2 \
  --timeout 210 --budget-s $((470 - SECONDS)) --out $OUT/offload7b.json > $OUT/offload7b.log 2>&1
echo "offload7b rc=$? at ${SECONDS}s" >> $L
