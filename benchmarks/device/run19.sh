#!/usr/bin/env bash
# Device call 19 (2026-12-02, one H200): issue 17's tune target at the second budget, three quarters of each
# script's measured baseline peak (call 17 ran half): benchmarks/tune_zoo.py on the same six zoo scripts.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
timeout ${T:-570} python3 benchmarks/tune_zoo.py --results benchmarks/results/zoo_final.json --out /tmp/tune --jobs 3 \
  --scripts ${SCRIPTS:-vit distill lora_handwritten peft_lora fused_adamw unet_diffusion} --fractions ${F:-0.75} \
  > $OUT/tune.log 2>&1
echo "tune_zoo rc=$? at ${SECONDS}s" >> $L
cp /tmp/tune/tune_results.json $OUT/ 2>/dev/null
