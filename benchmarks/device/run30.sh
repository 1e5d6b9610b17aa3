#!/usr/bin/env bash
# Device call 30 (2026-12-03, one H200): the zoo's two misses call 29 did not reproduce, measured again alone in
# the harness (lstm_lm checkpoint all, hf_trainer bf16 parameters); how the device's compute and copies overlap
# in the activation-offload steps the model under-predicts (T5, MoE: host-bound scripts) and in lightning's
# optimizer-state offload, beside their baselines.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $L
timeout 230 python3 benchmarks/accuracy.py --resume benchmarks/results/zoo_final.json --out $OUT/a --work /tmp/accw \
  --jobs 1 --model-jobs 1 --steps 6 --timeout 70 --deadline 200 \
  --models lstm_lm hf_trainer --only 'checkpoint all' 'bf16 params' > $OUT/a.log 2>&1
echo "acc rc=$? at ${SECONDS}s" >> $L
python3 -c "
import json; z=json.load(open('$OUT/a/results.json'))
out={m['model']: [r for r in m['rows'] if r['plan'] in ('checkpoint all','bf16 params')] for m in z['models'] if m['model'] in ('lstm_lm','hf_trainer')}
json.dump(out, open('$OUT/rows.json','w'))
for k,v in out.items():
  for r in v: print(k, r['plan'], r.get('measured_peak'), r.get('measured_step_s'), r.get('step_times'))" >> $L 2>&1
rm -rf $OUT/a
timeout 60 python3 benchmarks/diag_peak.py benchmarks/plans/diag29/lstm_ckpt.yaml --steps 6 --frames 5 --top 20 \
  > $OUT/peak_lstm_ckpt6.log 2>&1
echo "lstm peak rc=$? at ${SECONDS}s" >> $L
for x in diag30/t5_base diag29/t5_offload diag30/moe_base diag29/moe_offload diag29/light_opt; do
  n=$(basename $x)
  timeout 75 python3 benchmarks/diag_step.py benchmarks/plans/$x.yaml --steps 7 --skip 4 --top 25 --overlap \
    > $OUT/step_$n.log 2>&1
  echo "$n rc=$? at ${SECONDS}s: $(grep -h 'median step\|overlap per step' $OUT/step_$n.log | tr '\n' ' ')" >> $L
done
