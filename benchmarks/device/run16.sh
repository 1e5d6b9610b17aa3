#!/usr/bin/env bash
# Device call 16 (prepared 2026-12-02 for the next session; one H200). (1) The one-pass host AdamW again, now built
# on the training thread and run on a worker whose OpenMP team is set (call 15: 14.55 s steps with it, the update
# at about one thread's rate): host_update.py, then the 7B plan with MEMTUNE_HOST_COMPILE=1 beside it off.
# (2) Issue 17: the zoo rows still measured side by side in runs 1-2, measured again alone. About 9.5 minutes.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
timeout 120 python3 benchmarks/host_update.py --elements 134217728 --threads 16 --iters 2 --compiled \
  --out $OUT/host_update.json >> $L 2>&1
echo "host_update rc=$? at ${SECONDS}s" >> $L
MEMTUNE_HOST_COMPILE=1 timeout 260 python3 benchmarks/offload7b.py --only memtune_b12 --steps 5 --warmup 2 --timeout 250 \
  --budget-s 250 --out $OUT/offload7b_onepass.json > $OUT/offload7b.log 2>&1
echo "offload7b rc=$? at ${SECONDS}s" >> $L
python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results']; [print(k, v.get('tokens_per_s'), v.get('step_times'), v.get('peak_bytes'), v.get('error'), [n for n in v.get('notes', []) if 'host updates' in n]) for k, v in r.items()]" $OUT/offload7b_onepass.json >> $L 2>&1
left=$((585 - SECONDS))
[ $left -gt 60 ] && timeout $left python3 benchmarks/accuracy.py --models unet_diffusion encoder_decoder lightning_module \
  --resume benchmarks/results/zoo_final.json --reprofile unet_diffusion encoder_decoder \
  --only baseline 'checkpoint all' 'checkpoint half' 'offload act. half' 'offload opt. state' 'batch 16' \
  --out $OUT/acc --work /tmp/accw --jobs 1 --model-jobs 1 --steps 6 --profile-steps 4 --profile-warmup 1 --timeout 60 \
  --deadline $((left - 45)) > $OUT/acc.log 2>&1
echo "accuracy rc=$? at ${SECONDS}s" >> $L
