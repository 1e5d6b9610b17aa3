#!/usr/bin/env bash
# Device call 21 (2026-12-02, one H200). (1) hf_trainer profiled again: step durations now leave out the
# profiler's own callbacks between steps (its profile step was 28% over the run's); its baseline and checkpoint
# rows measured again. (2) tune_zoo one tune at a time (--jobs 1): call 19's unet_diffusion plan measured 207 ms
# while three tunes shared the host, 113 ms alone in call 20; fused_adamw at half its baseline, whose verified
# plans ran beside other tunes in call 17; vit at 0.75 (0.954 in call 19).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
timeout 200 python3 benchmarks/accuracy.py --resume benchmarks/results/zoo_final.json --out $OUT/acc \
  --work /tmp/accw --jobs 1 --model-jobs 1 --steps 6 --profile-steps 5 --profile-warmup 1 --timeout 50 \
  --deadline 150 --models hf_trainer --reprofile hf_trainer --only baseline 'checkpoint all' 'checkpoint half' \
  > $OUT/acc.log 2>&1
echo "accuracy rc=$? at ${SECONDS}s" >> $L; rm -f $OUT/acc/accuracy.md
timeout $((${T:-570} - SECONDS)) python3 benchmarks/tune_zoo.py --results benchmarks/results/zoo_final.json \
  --out /tmp/tune --jobs 1 --scripts --also unet_diffusion:0.75 fused_adamw:0.5 vit:0.75 > $OUT/tune.log 2>&1
echo "tune_zoo rc=$? at ${SECONDS}s" >> $L
cp /tmp/tune/tune_results.json $OUT/ 2>/dev/null
