#!/usr/bin/env bash
# Device call 45 (one H200, 2026-12-04): issue 20's comparison in one call, torchao now installed: the plan
# `memtune tune --budget 24GiB --verify 2` chose (call 42, batch 14) beside torchao's CPUOffloadOptimizer and
# FSDP2's CPUOffloadPolicy at batch 8 on the same 7B script; the offload summary now splits the step on the GPU
# (step() to the first gradient, the backward) and the host update (waiting for gradients, the kernel); then
# pytest -m gpu.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore COLUMNS=200
L=$OUT/log.txt
python3 -c "import torchao, torch; print('torchao', torchao.__version__, 'torch', torch.__version__)" >> $L 2>&1
timeout 500 python3 benchmarks/offload7b.py --plan benchmarks/results/run42/llama7b_24gib.yaml \
  --only plan_b14,torchao_b8,fsdp2_b8 --steps 6 --warmup 2 --timeout 190 --budget-s 440 \
  --out $OUT/offload7b.json > $OUT/offload7b.log 2>&1
echo "offload7b rc=$? at ${SECONDS}s" >> $L
timeout $((585 - SECONDS)) python3 -m pytest -q -m gpu -p no:cacheprovider > $OUT/pytest.log 2>&1
echo "pytest rc=$? at ${SECONDS}s: $(tail -1 $OUT/pytest.log)" >> $L
