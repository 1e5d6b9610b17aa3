#!/usr/bin/env bash
# Device call 34 (2026-12-03, one H200): T5 and MoE profiled again with the probe's offload group freed with its
# graph (call 33's probe allocated new pinned buffers every rep), five profile steps; the optimizer-state offload
# rows of the other clipping scripts measured again with the clipped gradients' copies batched.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
timeout 500 python3 benchmarks/accuracy.py --resume benchmarks/results/zoo_final.json --out $OUT/a --work /tmp/accw \
  --jobs 1 --model-jobs 1 --steps 6 --profile-steps 5 --profile-warmup 1 --timeout 100 --deadline 420 \
  --models encoder_decoder moe lightning_module peft_lora fused_adamw grad_accum ddp_torchrun \
  --reprofile encoder_decoder moe --only 'offload opt. state' 'ckpt all + offload opt. state' > $OUT/a.log 2>&1
echo "acc rc=$? at ${SECONDS}s" >> $L
python3 -c "
import json; z=json.load(open('$OUT/a/results.json'))
names=('encoder_decoder','moe','lightning_module','peft_lora','fused_adamw','grad_accum','ddp_torchrun')
keep=[m for m in z['models'] if m['model'] in names]
json.dump({'models': keep}, open('$OUT/models34.json','w'))
for m in keep:
  b=[x for x in m['profile']['blocks'] if x.get('what_ifs')][:1]
  if b: print(m['model'], {k:(round(v.get('fwd_host_s',0)*1e3,2), round(v.get('bwd_host_s',0)*1e3,2)) for k,v in b[0]['what_ifs'].items()})" >> $L 2>&1
grep -h "rc=" $OUT/a.log >> $L
rm -rf $OUT/a
