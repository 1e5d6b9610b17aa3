#!/usr/bin/env bash
# Device call 40 (one H200, 2026-12-03): the one-pass host AdamW in C (memtune/kernels/host_adamw.py) on this
# host, its GPU tests, then the 7B full fine-tune's 24 GiB plan with it (issue 20) at batch 12 and 14.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import torch; print(torch.__version__)";
 lscpu | grep -E "Model name|^CPU\(s\)|NUMA node\(s\)"; gcc --version | head -1) >> $L 2>&1
timeout 90 python3 -m pytest -q -m gpu tests/kernels/test_host_adamw.py tests/test_offload_stream.py -p no:cacheprovider \
  > $OUT/pytest.log 2>&1
echo "pytest rc=$? at ${SECONDS}s: $(tail -1 $OUT/pytest.log)" >> $L
timeout 100 python3 benchmarks/host_update.py --elements 134217728 --threads 16 --iters 2 --one-pass \
  --out $OUT/host_update.json > $OUT/host_update.log 2>&1
echo "host_update rc=$? at ${SECONDS}s" >> $L
timeout $((560 - SECONDS)) python3 benchmarks/offload7b.py --only memtune_b12 --steps 8 --warmup 2 \
  --timeout 200 --budget-s $((540 - SECONDS)) --out $OUT/offload7b_b12.json > $OUT/offload7b_b12.log 2>&1
echo "offload7b b12 rc=$? at ${SECONDS}s" >> $L
timeout $((590 - SECONDS)) python3 benchmarks/offload7b.py --batch-size 14 --steps 8 --warmup 2 \
  --timeout $((580 - SECONDS)) --budget-s 60 --out $OUT/offload7b_b14.json > $OUT/offload7b_b14.log 2>&1
echo "offload7b b14 rc=$? at ${SECONDS}s" >> $L
