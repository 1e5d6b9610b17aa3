#!/usr/bin/env bash
# Device call 2 (one H200): the rest of the zoo's plans, four scripts profiled again with the fixes of run 1.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
timeout 560 python3 benchmarks/accuracy.py --models zoo --resume benchmarks/results/zoo_run1.json \
  --reprofile hf_trainer peft_lora accelerate_loop lightning_module --out $OUT/acc --work /tmp/accw \
  --model-jobs 3 --steps 5 --profile-steps 3 --profile-warmup 1 --timeout 120 --deadline 450 > $OUT/acc.log 2>&1
tail -8 $OUT/acc.log
grep -cE " rc=0 oom=False peak=[0-9]" $OUT/acc.log
grep -E "rc=[1-9]|Error" $OUT/acc.log | cut -c1-200 | head -20
