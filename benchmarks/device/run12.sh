#!/usr/bin/env bash
# Device call 12 (one H200, 2026-12-02, third session): issue 19's last check, `memtune tune --budget 12GiB
# --verify 2` on the 7B peft LoRA profile of call 7 (benchmarks/results/lora7b.profile.json) with the cost model
# as fixed after call 8; the plan's provenance keeps `model_predicted` beside `measured`. Then this host's AdamW
# update rate against its memory bandwidth (benchmarks/host_update.py: what bounds issue 20's step), and the
# frozen-weights GPU tests (the deferred-quantize bound loosened after call 8).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
nproc >> $L
timeout 340 python3 -m memtune tune benchmarks/results/lora7b.profile.json --budget 12GiB --verify 2 --verify-steps 6 \
  --timeout 30s --storage sqlite:////tmp/study7b.db -o $OUT/lora7b_12gib.yaml > $OUT/tune7b.log 2>&1
echo "tune rc=$? at ${SECONDS}s" >> $L
grep -B2 -A6 "model_predicted" $OUT/lora7b_12gib.yaml >> $L
timeout 90 python3 benchmarks/host_update.py --elements 134217728 --threads 1 4 8 16 --iters 2 --out $OUT/host_update.json \
  >> $L 2>&1
echo "host_update rc=$? at ${SECONDS}s" >> $L
timeout $((560 - SECONDS)) python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_weights.py > $OUT/pytest_gpu.log 2>&1
echo "pytest rc=$? at ${SECONDS}s" >> $L; tail -3 $OUT/pytest_gpu.log >> $L
