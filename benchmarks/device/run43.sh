#!/usr/bin/env bash
# Device call 43 (one H200, 2026-12-04): why the 7B run's host update ran at 2.6G params/s against the probe's
# 5.3G: the one-pass kernel under contention for the cores (static against dynamic OpenMP schedule), the 7B
# plan at batch 14 with the dynamic schedule; then the 1B and 3B Llamas profiled and tuned at 24 GiB.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore COLUMNS=200
L=$OUT/log.txt W=/tmp/w43; mkdir -p $W
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $L
timeout 100 python3 benchmarks/host_update.py --elements 134217728 --threads 16 --iters 3 --contention \
  --out $W/host_contention.json > $W/host_contention.log 2>&1
echo "host_update rc=$? at ${SECONDS}s" >> $L
timeout 220 python3 benchmarks/offload7b.py --plan benchmarks/results/run42/llama7b_24gib.yaml --only memtune_b14 \
  --steps 6 --warmup 2 --timeout 200 --budget-s 200 --out $W/offload7b_b14.json > $W/offload7b_b14.log 2>&1
echo "offload7b b14 rc=$? at ${SECONDS}s" >> $L
for size in 1b 3b; do
  left=$((570 - SECONDS)); [ $left -lt 60 ] && break
  timeout $left bash -c "python3 -m memtune profile examples/zoo/llama7b_full.py -o $W/llama$size.profile.json \
    -- --size $size --batch-size 1 --steps 12 > $W/profile_$size.log 2>&1 && \
    python3 -m memtune tune $W/llama$size.profile.json --budget 24GiB --verify 2 --verify-steps 7 \
    --batch-knob=--batch-size=1,2,4,8,12,16,24,32 --timeout 60s -o $W/llama${size}_24gib.yaml > $W/tune_$size.log 2>&1"
  echo "$size rc=$? at ${SECONDS}s" >> $L
done
rm -f $W/*.db; tar -czf $OUT/run43.tgz -C $W . ; echo "done at ${SECONDS}s" >> $L
