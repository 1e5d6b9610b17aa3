#!/usr/bin/env bash
# Device call 33 (2026-12-03, one H200): T5 and MoE profiled again (the mode probes now time the host, which
# activation offload's hooks load: the model charges what the host's lead cannot absorb), and the
# optimizer-state offload rows of clipping scripts measured again with the clipped gradients' copies batched.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
timeout 540 python3 benchmarks/accuracy.py --resume benchmarks/results/zoo_final.json --out $OUT/a --work /tmp/accw \
  --jobs 1 --model-jobs 1 --steps 6 --profile-steps 3 --profile-warmup 2 --timeout 120 --deadline 480 \
  --models encoder_decoder moe hf_trainer accelerate_loop --reprofile encoder_decoder moe \
  --only 'offload opt. state' 'ckpt all + offload opt. state' > $OUT/a.log 2>&1
echo "acc rc=$? at ${SECONDS}s" >> $L
python3 -c "
import json; z=json.load(open('$OUT/a/results.json'))
keep=[m for m in z['models'] if m['model'] in ('encoder_decoder','moe','hf_trainer','accelerate_loop')]
json.dump({'models': keep}, open('$OUT/models33.json','w'))
for m in keep:
  for r in m['rows']:
    if r['plan'] in ('offload opt. state','ckpt all + offload opt. state'): print(m['model'], r['plan'], r.get('measured_peak'), r.get('measured_step_s'))" >> $L 2>&1
rm -rf $OUT/a
tail -5 $OUT/a.log >> $L
