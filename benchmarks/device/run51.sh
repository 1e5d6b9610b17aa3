#!/usr/bin/env bash
# Device call 51 (one H200): issue 17. The profile's GPU tests (the compiled-step change of 2026-12-04), then the
# new zoo script compiled_step.py (a compiled train step, not a compiled model) profiled and its rows measured, and
# lstm_lm profiled again with its rows (its checkpoint row, -5.3%, is the worst under-prediction left and was not
# reproduced in diag_peak.py), each row in its own process, in the same call as its profile.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
timeout 120 python3 -m pytest -q -m gpu tests/test_profile.py > $OUT/pytest_gpu.log 2>&1
echo "pytest -m gpu tests/test_profile.py rc=$? at ${SECONDS}s: $(tail -1 $OUT/pytest_gpu.log)" >> $L
timeout $((575 - SECONDS)) python3 benchmarks/accuracy.py --resume benchmarks/results/zoo_final.json --out $OUT/a \
  --work /tmp/accw --jobs 1 --model-jobs 1 --steps 6 --profile-steps 5 --profile-warmup 1 --timeout 90 \
  --deadline $((560 - SECONDS)) --models compiled_step lstm_lm --reprofile compiled_step lstm_lm \
  --only baseline 'checkpoint all' 'checkpoint half' 'offload act. half' 'offload opt. state' > $OUT/a.log 2>&1
echo "acc rc=$? at ${SECONDS}s" >> $L
python3 -c "
import json; z=json.load(open('$OUT/a/results.json'))
json.dump({'models': [m for m in z['models'] if m['model'] in ('compiled_step','lstm_lm')]}, open('$OUT/models51.json','w'))" >> $L 2>&1
tail -30 $OUT/a.log >> $L
rm -rf $OUT/a
