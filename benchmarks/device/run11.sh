#!/usr/bin/env bash
# Device call 11 (prepared 2026-12-02 for the next session; one H200): issue 19's last check with the cost model
# as fixed after call 8 (probe shares for offload/compress, the one-ahead fetch timeline): the 7B peft LoRA
# profiled again and tuned at 12 GiB with --verify 2; the plan's provenance keeps `model_predicted` (before
# the closed loop corrected it) beside `measured`. About 6 minutes.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
timeout 220 python3 -m memtune profile examples/zoo/peft_lora.py -o $OUT/lora7b.profile.json --steps 4 --warmup 1 \
  -- --size 7b --steps 30 > $OUT/profile7b.log 2>&1
echo "profile rc=$? at ${SECONDS}s" >> $L
[ -f $OUT/lora7b.profile.json ] || exit 0
timeout $((580 - SECONDS)) python3 -m memtune tune $OUT/lora7b.profile.json --budget 12GiB --verify 2 --verify-steps 6 \
  --timeout 30s --storage sqlite:////tmp/study7b.db -o $OUT/lora7b_12gib.yaml > $OUT/tune7b.log 2>&1
echo "tune rc=$? at ${SECONDS}s" >> $L
grep -A3 "model_predicted\|measured:" $OUT/lora7b_12gib.yaml >> $L
