#!/usr/bin/env bash
# Device call 13 (one H200, 2026-12-02, third session). (1) Why optimizer-state offload's host update runs
# 2-7x slower in a run than on the profile's probe (issue 20's 7B: 1.56G params/s; the zoo's fused_adamw:
# 1.4-2.0 s per step against 0.47 s predicted): host_update.py in pageable against pinned memory, then
# fused_adamw with its state on the host (the original and the streamed-gradient path) through memtune apply,
# whose notes give the host's update time per step. (2) Issue 17: zoo scripts whose step times were measured
# three models side by side (runs 1-2), profiled and measured again one process at a time.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
timeout 60 python3 benchmarks/host_update.py --elements 134217728 --threads 8 16 --iters 2 --out $OUT/host_update.json >> $L 2>&1
echo "host_update rc=$? at ${SECONDS}s" >> $L
for v in state stream; do
  timeout 60 python3 -m memtune apply benchmarks/plans/diag_fused_$v.yaml --steps 6 --report /tmp/diag_$v.json \
    > /tmp/diag_$v.log 2>&1
  echo "apply $v rc=$? at ${SECONDS}s" >> $L
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(json.dumps({k: r.get(k) for k in ('peak_allocated_bytes','step_s','step_times','notes','failure')}, default=str)[:3000])" /tmp/diag_$v.json >> $L 2>&1 || tail -5 /tmp/diag_$v.log >> $L
done
Z="resnet_amp grad_accum encoder_decoder unet_diffusion lightning_module"
timeout $((585 - SECONDS)) python3 benchmarks/accuracy.py --models $Z --resume benchmarks/results/zoo_final.json --reprofile $Z \
  --out $OUT/acc --work /tmp/accw --jobs 1 --model-jobs 1 --steps 6 --profile-steps 4 --profile-warmup 1 --timeout 80 \
  --deadline $((560 - SECONDS)) > $OUT/acc.log 2>&1
echo "accuracy rc=$? at ${SECONDS}s" >> $L
