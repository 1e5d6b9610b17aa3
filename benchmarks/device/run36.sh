#!/usr/bin/env bash
# Device call 36 (2026-12-03, one H200): the GPU tests of the profiler and offload (the host-timing probe test had
# not run), then MoE profiled again and all its rows measured in the same call (call 34's profile and call 35's
# baseline disagreed by 37% across calls).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> $L
timeout 150 python3 -m pytest -q -m gpu tests/test_profile.py tests/test_offload.py -x -p no:cacheprovider > $OUT/gpu_tests.log 2>&1
echo "gpu tests rc=$? at ${SECONDS}s" >> $L
tail -3 $OUT/gpu_tests.log >> $L
timeout 420 python3 benchmarks/accuracy.py --resume benchmarks/results/zoo_final.json --out $OUT/a --work /tmp/accw \
  --jobs 1 --model-jobs 1 --steps 6 --profile-steps 5 --profile-warmup 1 --timeout 90 --deadline 380 \
  --models moe --reprofile moe \
  --only baseline 'checkpoint all' 'checkpoint half' 'offload act. half' 'offload opt. state' > $OUT/a.log 2>&1
echo "acc rc=$? at ${SECONDS}s" >> $L
python3 -c "
import json; z=json.load(open('$OUT/a/results.json'))
json.dump({'models': [m for m in z['models'] if m['model']=='moe']}, open('$OUT/models36.json','w'))" >> $L 2>&1
grep -h "rc=" $OUT/a.log >> $L
rm -rf $OUT/a
