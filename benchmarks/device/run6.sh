#!/usr/bin/env bash
# Device call 6 (one H200, 2026-12-02; docs/accuracy-zoo.md run 4): offloaded activations fetched into compute-stream memory (an experiment, not kept; freed when
# their backward is), GPU offload tests, then the zoo's offload rows again with clean profiles (one process
# at a time: the earlier profiles' host-update rates were measured beside two other models' processes).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
L=$OUT/log.txt
timeout 90 python3 -m pytest -m gpu -q -p no:cacheprovider --timeout 60 tests/test_offload.py tests/test_compress.py \
  tests/test_offload_stream.py > $OUT/pytest_gpu.log 2>&1
tail -8 $OUT/pytest_gpu.log >> $L
timeout 440 python3 benchmarks/accuracy.py --models resnet_amp vit peft_lora lora_handwritten fused_adamw \
  --resume benchmarks/results/zoo_run5.json --reprofile vit peft_lora lora_handwritten fused_adamw \
  --only 'offload act. half' 'offload opt. state' 'ckpt all + offload opt. state' \
  --out $OUT/acc --work /tmp/accw --jobs 1 --model-jobs 1 --steps 6 --profile-steps 4 --profile-warmup 1 \
  --timeout 80 --deadline 380 > $OUT/acc.log 2>&1
grep -E " rc=|profile rc" $OUT/acc.log | cut -c1-160 >> $L
