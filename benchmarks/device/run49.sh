#!/usr/bin/env bash
# Device call 49 (one H200, 2026-12-04): issue 20's 3B row: `memtune profile` of the usual fp32-weights script at
# the 3B size (batch 1), then `memtune tune --budget 24GiB --verify 2` over batch sizes, as the 7B's path (calls
# 46). D is the call's own deadline in seconds (what the device time left allows).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore COLUMNS=200
D=${D:-560}
L=$OUT/log.txt
timeout 150 python3 -m memtune profile examples/zoo/llama7b_full.py -o $OUT/llama3b.profile.json \
  -- --size 3b --batch-size 1 --steps 24 > $OUT/profile.log 2>&1
echo "profile rc=$? at ${SECONDS}s" >> $L
timeout $((D - SECONDS)) python3 -m memtune tune $OUT/llama3b.profile.json --budget 24GiB --verify 2 \
  --verify-steps 6 --batch-knob=--batch-size=1,2,4,8,12,16,20,24,32 --timeout 30s -o $OUT/llama3b_24gib.yaml \
  > $OUT/tune.log 2>&1
echo "tune rc=$? at ${SECONDS}s" >> $L
