#!/usr/bin/env bash
# Device call 32 (2026-12-03, one H200): the host cost of each offload primitive per tensor, the steady-state
# host time of activation offload in T5 and MoE (timers from step 3), and lightning's optimizer-state offload
# with the clipped gradients' copies batched per chunk (one stream switch and one event per chunk).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
P=benchmarks/plans/diag29
timeout 90 python3 benchmarks/transport_costs.py >> $L 2>&1
echo "costs rc=$? at ${SECONDS}s" >> $L
for x in light_opt t5_offload moe_offload; do
  timeout 90 python3 benchmarks/device/diag_offload.py $P/$x.yaml --steps 8 --skip 3 --out /tmp/d_$x > $OUT/$x.log 2>&1
  echo "$x rc=$? at ${SECONDS}s: $(tail -1 $OUT/$x.log | cut -c1-1200)" >> $L
done
timeout 120 python3 benchmarks/accuracy.py --resume benchmarks/results/zoo_final.json --out $OUT/a --work /tmp/accw \
  --jobs 1 --model-jobs 1 --steps 6 --timeout 70 --deadline 100 \
  --models lightning_module --only 'offload opt. state' > $OUT/a.log 2>&1
echo "acc rc=$? at ${SECONDS}s" >> $L
python3 -c "
import json; z=json.load(open('$OUT/a/results.json'))
for m in z['models']:
  for r in m['rows']:
    if r['plan'] == 'offload opt. state': print(m['model'], r['plan'], r.get('measured_peak'), r.get('measured_step_s'), r.get('step_times'), r.get('apply_notes'))" >> $L 2>&1
rm -rf $OUT/a
