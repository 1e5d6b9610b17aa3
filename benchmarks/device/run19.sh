#!/usr/bin/env bash
# Device call 19 (2026-12-02, one H200): issue 17's tune target at the second budget, three quarters of each
# script's measured baseline peak (call 17 ran half), on the same scripts; resnet_amp at both; distill profiled
# again first (its profile now records that its logits also feed the KL term, so the fused loss buys nothing).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
timeout 120 python3 benchmarks/accuracy.py --models distill --resume benchmarks/results/zoo_final.json --reprofile distill \
  --only baseline --out $OUT/acc --work /tmp/accw --jobs 1 --model-jobs 1 --steps 6 --profile-steps 5 \
  --profile-warmup 1 --timeout 50 > $OUT/acc.log 2>&1
echo "accuracy rc=$? at ${SECONDS}s" >> $L; rm -f $OUT/acc/accuracy.md
R=$OUT/acc/results.json; [ -f $R ] || R=benchmarks/results/zoo_final.json
timeout $((${T:-570} - SECONDS)) python3 benchmarks/tune_zoo.py --results $R --out /tmp/tune --jobs 3 \
  --scripts vit lora_handwritten peft_lora fused_adamw unet_diffusion --fractions 0.75 \
  --also resnet_amp:0.5 resnet_amp:0.75 distill:0.75 distill:0.5 > $OUT/tune.log 2>&1
echo "tune_zoo rc=$? at ${SECONDS}s" >> $L
cp /tmp/tune/tune_results.json $OUT/ 2>/dev/null
