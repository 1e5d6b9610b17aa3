#!/usr/bin/env bash
# Device call 15 (one H200, 2026-12-02, third session; call 14 got no machine). (1) The one-pass host AdamW
# (memtune/kernels/host_adamw.py, torch.compile's C++ backend) against the three-pass sliced update and the
# fused kernel on this host (benchmarks/host_update.py). (2) Issue 20's 7B plan with it (it is on by default
# where it builds): the host update per step in the run's notes, tokens/s. (3) Issue 17: zoo rows measured
# again one process at a time against the profiles call 13 made alone, in the time left.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
(which gcc g++ c++ cc; gcc --version | head -1) >> $L 2>&1
timeout 90 python3 benchmarks/host_update.py --elements 134217728 --threads 16 --iters 2 --slices 1048576 4194304 \
  --compiled --out $OUT/host_update.json >> $L 2>&1
echo "host_update rc=$? at ${SECONDS}s" >> $L
timeout 260 python3 benchmarks/offload7b.py --only memtune_b12 --steps 5 --warmup 2 --timeout 250 --budget-s 250 \
  --out $OUT/offload7b.json > $OUT/offload7b.log 2>&1
echo "offload7b rc=$? at ${SECONDS}s" >> $L
python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results']; [print(k, v.get('tokens_per_s'), v.get('median_step_s'), v.get('peak_bytes'), v.get('error'), [n for n in v.get('notes', []) if 'host updates' in n]) for k, v in r.items()]" $OUT/offload7b.json >> $L 2>&1
left=$((580 - SECONDS))
[ $left -gt 60 ] && timeout $left python3 benchmarks/accuracy.py --models resnet_amp grad_accum lightning_module unet_diffusion \
  --resume benchmarks/results/run13/acc/results.json \
  --only baseline 'checkpoint all' 'checkpoint half' 'offload act. half' 'offload opt. state' 'batch 384' 'batch 16' \
  --out $OUT/acc --work /tmp/accw --jobs 1 --model-jobs 1 --steps 6 --timeout 60 --deadline $((left - 45)) > $OUT/acc.log 2>&1
echo "accuracy rc=$? at ${SECONDS}s" >> $L
