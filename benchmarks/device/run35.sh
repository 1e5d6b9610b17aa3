#!/usr/bin/env bash
# Device call 35 (2026-12-03, one H200): MoE's and T5's other rows measured again beside their new profiles
# (call 34's MoE profile predicts its baseline 26% under the row stored from an earlier day).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
timeout 230 python3 benchmarks/accuracy.py --resume benchmarks/results/zoo_final.json --out $OUT/a --work /tmp/accw \
  --jobs 1 --model-jobs 1 --steps 6 --timeout 60 --deadline 200 --models moe encoder_decoder \
  --only baseline 'checkpoint all' 'checkpoint half' 'offload act. half' > $OUT/a.log 2>&1
echo "acc rc=$? at ${SECONDS}s" >> $L
python3 -c "
import json; z=json.load(open('$OUT/a/results.json'))
json.dump({'models': [m for m in z['models'] if m['model'] in ('moe','encoder_decoder')]}, open('$OUT/models35.json','w'))"
grep -h "rc=" $OUT/a.log >> $L
rm -rf $OUT/a
