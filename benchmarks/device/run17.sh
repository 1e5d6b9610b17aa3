#!/usr/bin/env bash
# Device call 17 (2026-12-02, one H200). (1) Activation offload of strided saved views (timm/nanoGPT q, k, v):
# the GPU tests of tests/test_offload.py, the new no-pageable-copy one included, then the offload rows of the
# zoo scripts whose offload steps were 3-5x over (vit, distill) and the rest, alone. (2) Issue 17's tune target
# at half the baseline peak: benchmarks/tune_zoo.py on six zoo scripts. About 9.5 minutes.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >> $L 2>&1
timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_offload.py > $OUT/pytest_gpu.log 2>&1
echo "pytest rc=$? at ${SECONDS}s" >> $L; tail -3 $OUT/pytest_gpu.log >> $L
timeout 170 python3 benchmarks/accuracy.py --models vit distill resnet_amp unet_diffusion \
  --resume benchmarks/results/zoo_final.json --only 'offload act. half' \
  --out $OUT/acc --work /tmp/accw --jobs 1 --model-jobs 1 --steps 6 --timeout 50 --deadline 150 > $OUT/acc.log 2>&1
echo "accuracy rc=$? at ${SECONDS}s" >> $L
left=$((585 - SECONDS))
timeout $left python3 benchmarks/tune_zoo.py --results benchmarks/results/zoo_final.json --out /tmp/tune --jobs 3 \
  --scripts vit distill lora_handwritten peft_lora fused_adamw unet_diffusion --fractions 0.5 > $OUT/tune.log 2>&1
echo "tune_zoo rc=$? at ${SECONDS}s" >> $L
cp /tmp/tune/tune_results.json $OUT/ 2>/dev/null
