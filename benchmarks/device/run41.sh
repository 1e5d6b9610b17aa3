#!/usr/bin/env bash
# Device call 41 (one H200, 2026-12-03): issue 20's path as a user takes it: `memtune profile` of the usual
# 7B full fine-tune (fp32 weights, bf16 autocast, AdamW, clip 1.0, batch 1), then `memtune tune --budget 24GiB
# --verify 2` over batch sizes, with the one-pass host AdamW of call 40.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore COLUMNS=200
L=$OUT/log.txt
timeout 300 python3 -m memtune profile examples/zoo/llama7b_full.py -o $OUT/llama7b.profile.json \
  -- --size 7b --batch-size 1 --steps 40 > $OUT/profile.log 2>&1
echo "profile rc=$? at ${SECONDS}s" >> $L
timeout $((585 - SECONDS)) python3 -m memtune tune $OUT/llama7b.profile.json --budget 24GiB --verify 2 \
  --verify-steps 7 --batch-knob=--batch-size=1,2,4,8,10,12,14,16 --timeout 60s -o $OUT/llama7b_24gib.yaml \
  > $OUT/tune.log 2>&1
echo "tune rc=$? at ${SECONDS}s" >> $L
