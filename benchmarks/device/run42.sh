#!/usr/bin/env bash
# Device call 42 (one H200, 2026-12-04): `memtune tune --budget 24GiB --verify 2` again on call 41's profile of
# the 7B full fine-tune, after the fused loss's batch scaling and lazy logits and the verified plan's batch
# neighbours (call 41's tune chose batch 10: its model read 20.1 GiB for 16.7 measured).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore COLUMNS=200
L=$OUT/log.txt
timeout 560 python3 -m memtune tune benchmarks/results/run41/llama7b.profile.json --budget 24GiB --verify 2 \
  --verify-steps 7 --batch-knob=--batch-size=1,2,4,8,10,12,14,16 --timeout 60s -o $OUT/llama7b_24gib.yaml \
  > $OUT/tune.log 2>&1
echo "tune rc=$? at ${SECONDS}s" >> $L
