#!/usr/bin/env bash
# Device call 24 (2026-12-02, one H200): the profile now tells what is saved before the first repeated block (a
# ResNet stem's max-pool, 0.77 GiB at batch 256, live to the end of backward: call 23's diag_peak found it at
# resnet_amp's offload peak, -12% predicted). resnet_amp profiled again with its rows; GPU tests of the profiler
# and offload; fused_adamw tuned again at half its baseline (the step correction now passes over placement).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
timeout 90 python3 -m pytest -q -m gpu tests/test_offload.py tests/test_profile.py tests/test_costmodel.py > $OUT/pytest_gpu.log 2>&1
echo "pytest rc=$? at ${SECONDS}s" >> $L
timeout 200 python3 benchmarks/accuracy.py --resume benchmarks/results/zoo_final.json --out $OUT/acc \
  --work /tmp/accw --jobs 1 --model-jobs 1 --steps 6 --profile-steps 5 --profile-warmup 1 --timeout 50 \
  --deadline 150 --models resnet_amp --reprofile resnet_amp \
  --only baseline 'checkpoint all' 'checkpoint half' 'offload act. half' 'batch 384' > $OUT/acc.log 2>&1
echo "accuracy rc=$? at ${SECONDS}s" >> $L; rm -f $OUT/acc/accuracy.md
timeout $((${T:-330} - SECONDS)) python3 benchmarks/tune_zoo.py --results benchmarks/results/zoo_final.json \
  --out /tmp/tune --jobs 1 --scripts --also fused_adamw:0.5 > $OUT/tune.log 2>&1
echo "tune_zoo rc=$? at ${SECONDS}s" >> $L
cp /tmp/tune/tune_results.json $OUT/ 2>/dev/null
