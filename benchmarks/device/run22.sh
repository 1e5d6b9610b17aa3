#!/usr/bin/env bash
# Device call 22 (2026-12-02, one H200; call 16 trimmed to its issue-20 part). (1) The one-pass host AdamW again, now built
# on the training thread and run on a worker whose OpenMP team is set (call 15: 14.55 s steps with it, the update
# at about one thread's rate): host_update.py, then the 7B plan with MEMTUNE_HOST_COMPILE=1 beside it off.
# About 6.5 minutes.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
timeout 120 python3 benchmarks/host_update.py --elements 134217728 --threads 16 --iters 2 --compiled \
  --out $OUT/host_update.json >> $L 2>&1
echo "host_update rc=$? at ${SECONDS}s" >> $L
MEMTUNE_HOST_COMPILE=1 timeout 230 python3 benchmarks/offload7b.py --only memtune_b12 --steps 5 --warmup 2 --timeout 220 \
  --budget-s 220 --out $OUT/offload7b_onepass.json > $OUT/offload7b.log 2>&1
echo "offload7b rc=$? at ${SECONDS}s" >> $L
python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results']; [print(k, v.get('tokens_per_s'), v.get('step_times'), v.get('peak_bytes'), v.get('error'), [n for n in v.get('notes', []) if 'host updates' in n]) for k, v in r.items()]" $OUT/offload7b_onepass.json >> $L 2>&1
