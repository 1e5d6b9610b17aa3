#!/usr/bin/env bash
# Device call 46 (one H200, 2026-12-04): issue 20's path again after call 45 split the 7B step (GPU backward
# 2467 ms against 1794 predicted; host update 1543 ms against 1287): `memtune profile` now probes a batch of one
# at twice the batch (how its time scales) and the one-pass host AdamW on 128M elements; then `memtune tune
# --budget 24GiB --verify 2` over batch sizes; then the new GPU tests.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore COLUMNS=200
L=$OUT/log.txt
timeout 200 python3 -m memtune profile examples/zoo/llama7b_full.py -o $OUT/llama7b.profile.json \
  -- --size 7b --batch-size 1 --steps 40 > $OUT/profile.log 2>&1
echo "profile rc=$? at ${SECONDS}s" >> $L
timeout $((540 - SECONDS)) python3 -m memtune tune $OUT/llama7b.profile.json --budget 24GiB --verify 2 \
  --verify-steps 7 --batch-knob=--batch-size=1,2,4,8,10,12,14,16 --timeout 45s -o $OUT/llama7b_24gib.yaml \
  > $OUT/tune.log 2>&1
echo "tune rc=$? at ${SECONDS}s" >> $L
timeout $((588 - SECONDS)) python3 -m pytest -q -m gpu -p no:cacheprovider -k "twice_the_batch or gpu_phases" \
  tests/test_profile.py tests/test_offload_stream.py > $OUT/pytest.log 2>&1
echo "pytest rc=$? at ${SECONDS}s: $(tail -1 $OUT/pytest.log)" >> $L
