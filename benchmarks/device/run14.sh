#!/usr/bin/env bash
# Device call 14 (one H200, 2026-12-02, third session): issue 17, the zoo scripts whose plans were measured three
# models side by side (runs 1-2), measured again one process at a time against the profiles call 13 made alone
# (benchmarks/results/run13/acc/results.json; call 13's --resume kept the old rows, so it measured only one).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
timeout 585 python3 benchmarks/accuracy.py --models resnet_amp grad_accum lightning_module unet_diffusion encoder_decoder \
  --resume benchmarks/results/run13/acc/results.json \
  --only baseline 'checkpoint all' 'checkpoint half' 'offload act. half' 'offload opt. state' 'batch 384' 'batch 16' \
  --out $OUT/acc --work /tmp/accw --jobs 1 --model-jobs 1 --steps 6 --timeout 60 --deadline 545 > $OUT/acc.log 2>&1
echo "accuracy rc=$? at ${SECONDS}s" >> $L
