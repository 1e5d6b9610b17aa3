#!/usr/bin/env bash
# Device call 38 (2026-12-03, one H200): T5 and the UNet profiled again and all their rows measured in the same
# call (T5's profile and rows came from calls 34 and 35), then the UNet tuned at three quarters of its peak
# (0.91 of the sweep's best in call 21, within its run-to-run spread) against the rows of this call.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
timeout 360 python3 benchmarks/accuracy.py --resume benchmarks/results/zoo_final.json --out $OUT/a --work /tmp/accw \
  --jobs 1 --model-jobs 1 --steps 6 --profile-steps 5 --profile-warmup 1 --timeout 80 --deadline 320 \
  --models encoder_decoder unet_diffusion --reprofile encoder_decoder unet_diffusion \
  --only baseline 'checkpoint all' 'checkpoint half' 'offload act. half' > $OUT/a.log 2>&1
echo "acc rc=$? at ${SECONDS}s" >> $L
python3 -c "
import json; z=json.load(open('$OUT/a/results.json'))
json.dump({'models': [m for m in z['models'] if m['model'] in ('encoder_decoder','unet_diffusion')]}, open('$OUT/models38.json','w'))" >> $L 2>&1
grep -h "rc=" $OUT/a.log >> $L
timeout $((580 - SECONDS)) python3 benchmarks/tune_zoo.py --results $OUT/a/results.json --out /tmp/tune --jobs 1 \
  --scripts --also unet_diffusion:0.75 > $OUT/tune.log 2>&1
echo "tune_zoo rc=$? at ${SECONDS}s" >> $L; cp /tmp/tune/tune_results.json $OUT/ 2>/dev/null
rm -rf $OUT/a
