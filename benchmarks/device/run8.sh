#!/usr/bin/env bash
# Device call 8 (one H200, 2026-12-02): `memtune tune --budget 12GiB --verify 2` on the 7B peft LoRA profiled
# in call 7 (issue 19), then the tuned 24 GiB plan of the 7B full fine-tune (issue 20) through memtune apply.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
timeout 330 python3 -m memtune tune benchmarks/results/lora7b.profile.json --budget 12GiB --verify 2 --verify-steps 6 \
  --timeout 30s --storage sqlite:////tmp/study7b.db -o $OUT/lora7b_12gib.yaml > $OUT/tune7b.log 2>&1
echo "tune rc=$? at ${SECONDS}s" >> $L
timeout $((570 - SECONDS)) python3 benchmarks/offload7b.py --only memtune_b12 --steps 5 --warmup 2 --timeout 220 \
  --budget-s 60 --out $OUT/offload7b_memtune.json > $OUT/offload7b.log 2>&1
echo "offload7b rc=$? at ${SECONDS}s" >> $L
