#!/usr/bin/env bash
# Device call 3 (one H200): memtune tune --verify 2 on four zoo scripts at half their baseline peak.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
timeout 280 python3 benchmarks/tune_zoo.py --results benchmarks/results/zoo_run2.json --out $OUT/tune --jobs 4 \
  --scripts fused_adamw lora_handwritten peft_lora distill --search-s 8s --trials 200 --verify 2 > $OUT/tune.log 2>&1
tail -12 $OUT/tune.log
