#!/usr/bin/env bash
# Device call 10 (prepared 2026-12-02 for the next session; one H200): issue 20's "plan chosen by `memtune tune
# --budget 24GiB --verify 2` alone": a real profile of the usual 7B script (its host update rate measured on
# this host, not the hand-built profile's H100 number), the tune with the batch searched, then the chosen plan
# beside FSDP2's CPU offload. About 9 minutes; the deferred-quantize GPU test first.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
timeout 60 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_weights.py > $OUT/pytest_gpu.log 2>&1
echo "pytest rc=$? at ${SECONDS}s" >> $L; tail -3 $OUT/pytest_gpu.log >> $L
timeout 200 python3 -m memtune profile examples/zoo/llama7b_full.py -o $OUT/llama7b.profile.json --steps 3 --warmup 1 \
  -- --size 7b --steps 10 > $OUT/profile.log 2>&1
echo "profile rc=$? at ${SECONDS}s" >> $L
[ -f $OUT/llama7b.profile.json ] || exit 0
timeout 280 python3 -m memtune tune $OUT/llama7b.profile.json --budget 24GiB --verify 2 --verify-steps 4 \
  --batch-knob --batch-size=4,8,12,16 --timeout 30s --storage sqlite:////tmp/s7.db -o $OUT/llama7b_24gib.yaml \
  > $OUT/tune.log 2>&1
echo "tune rc=$? at ${SECONDS}s" >> $L
left=$((585 - SECONDS))
[ -f $OUT/llama7b_24gib.yaml ] && [ $left -gt 100 ] && timeout $left python3 benchmarks/offload7b.py --only fsdp2_b8 \
  --steps 4 --warmup 2 --timeout $((left - 10)) --budget-s $left --out $OUT/fsdp2.json > $OUT/fsdp2.log 2>&1
echo "fsdp2 rc=$? at ${SECONDS}s" >> $L
