#!/usr/bin/env bash
# Device call 1 (one H200): GPU tests, then the zoo profiled and its plans measured (benchmarks/accuracy.py).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee $OUT/env.txt
python3 -c "import torch, triton, transformers; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__)" | tee -a $OUT/env.txt
nproc | tee -a $OUT/env.txt
timeout 130 python3 -m pytest -m gpu -q -p no:cacheprovider --timeout 60 tests > $OUT/pytest_gpu.log 2>&1
tail -15 $OUT/pytest_gpu.log
timeout 440 python3 benchmarks/accuracy.py --models zoo --out $OUT/acc --work /tmp/accw --model-jobs 3 --steps 6 \
  --profile-steps 4 --profile-warmup 1 --timeout 140 --deadline 280 > $OUT/acc.log 2>&1
tail -5 $OUT/acc.log
grep -E "profile rc|rc=" $OUT/acc.log | awk '{print $1,$2,$3,$4,$5,$6,$7,$8}' | head -90
