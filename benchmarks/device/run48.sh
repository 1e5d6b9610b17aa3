#!/usr/bin/env bash
# Device call 48 (one H200, 2026-12-04): issue 20's comparison in one call, again: call 47's FSDP2 run (4 steps)
# did not end in 240 s, so the tuned plan (call 46, batch 14) and torchao's CPUOffloadOptimizer (batch 8) run
# first, then FSDP2's CPUOffloadPolicy (batch 8, 3 steps of which 1 warm-up) with the rest of the call; each
# child now prints its progress, which a timeout reports.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore COLUMNS=200
L=$OUT/log.txt
P=benchmarks/results/run46/llama7b_24gib.yaml
timeout 300 python3 benchmarks/offload7b.py --plan $P --only plan_b14,torchao_b8 --steps 6 --warmup 2 \
  --timeout 150 --budget-s 295 --out $OUT/offload7b.json > $OUT/offload7b.log 2>&1
echo "offload7b rc=$? at ${SECONDS}s" >> $L
timeout $((588 - SECONDS)) python3 benchmarks/offload7b.py --plan $P --only fsdp2_b8 --steps 3 --warmup 1 \
  --timeout $((575 - SECONDS)) --budget-s $((578 - SECONDS)) --out $OUT/fsdp2.json > $OUT/fsdp2.log 2>&1
echo "fsdp2 rc=$? at ${SECONDS}s" >> $L
free -g >> $L
