#!/usr/bin/env bash
# Device call 29 (2026-12-03, one H200): diagnostics for the zoo's largest step-time misses and its worst
# under-predicted peak: the host update's rate beside the PCIe copies the run makes (optimizer-state offload of
# clipping scripts measured 1.4-1.65x the profile's rate), where hf_trainer's bf16-parameter step goes (140 ms
# against 78), what is live at lstm_lm's checkpoint-all peak (-5.3%), where T5's activation offload goes (-26.5%).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
P=benchmarks/plans/diag29
timeout 120 python3 benchmarks/host_update.py --elements 335544320 --threads 16 --iters 2 --beside-copies \
  --out $OUT/host_update.json > $OUT/host_update.log 2>&1
echo "host rc=$? at ${SECONDS}s" >> $L
for x in hf_bf16 hf_base; do
  timeout 150 python3 benchmarks/diag_step.py $P/$x.yaml --steps 7 --skip 4 --top 30 > $OUT/step_$x.log 2>&1
  echo "$x rc=$? at ${SECONDS}s" >> $L
done
timeout 120 python3 benchmarks/diag_peak.py $P/lstm_ckpt.yaml --steps 3 --frames 5 --top 30 > $OUT/peak_lstm_ckpt.log 2>&1
echo "lstm rc=$? at ${SECONDS}s" >> $L
timeout 150 python3 benchmarks/diag_step.py $P/t5_offload.yaml --steps 7 --skip 4 --top 30 > $OUT/step_t5_offload.log 2>&1
echo "t5 rc=$? at ${SECONDS}s" >> $L
