#!/usr/bin/env bash
# Device call 7 (one H200, 2026-12-02): the GPU tests changed since run 6, the frozen-weights benchmark beside
# bitsandbytes and torchao (issue 19), then a peft LoRA on a Llama-2-7B-shaped base: profile, and
# `memtune tune --budget 12GiB --verify 2` if the call has time left (600 s per call).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
L=$OUT/log.txt
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $L
python3 -c "import torch,triton,transformers,peft,bitsandbytes,torchao;print(torch.__version__,triton.__version__,transformers.__version__,peft.__version__,bitsandbytes.__version__,torchao.__version__)" >> $L 2>&1
timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider --timeout 90 tests/test_weights.py tests/test_offload_stream.py \
  tests/test_offload.py::test_offload_gpu_saves_memory > $OUT/pytest_gpu.log 2>&1
echo "pytest rc=$? at ${SECONDS}s" >> $L; tail -12 $OUT/pytest_gpu.log >> $L
timeout 130 python3 benchmarks/weights.py --json benchmarks/weights_results.json > $OUT/weights.log 2>&1
echo "weights rc=$? at ${SECONDS}s" >> $L; cp benchmarks/weights_results.json $OUT/ 2>/dev/null
timeout 220 python3 -m memtune profile examples/zoo/peft_lora.py -o $OUT/lora7b.profile.json --steps 4 --warmup 1 \
  -- --size 7b --steps 30 > $OUT/profile7b.log 2>&1
echo "profile rc=$? at ${SECONDS}s" >> $L
left=$((585 - SECONDS))
if [ -f $OUT/lora7b.profile.json ] && [ $left -gt 150 ]; then
  timeout $left python3 -m memtune tune $OUT/lora7b.profile.json --budget 12GiB --verify 2 --verify-steps 5 \
    --timeout 30s --storage sqlite:////tmp/study7b.db -o $OUT/lora7b_12gib.yaml > $OUT/tune7b.log 2>&1
  echo "tune rc=$? at ${SECONDS}s" >> $L
fi
