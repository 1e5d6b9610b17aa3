#!/usr/bin/env bash
# Device call 31 (2026-12-03, one H200): where the host time of three under-predicted offload steps goes (timers
# around the offload paths, cProfile of the main thread: lightning's optimizer-state offload, T5's and MoE's
# activation offload), and why lstm_lm's checkpoint-all peak measures 7.27 GiB in `memtune apply` but 6.86 GiB
# in diag_peak.py (with and without the allocator's history, in-process and through the CLI).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
P=benchmarks/plans/diag29
for x in light_opt t5_offload moe_offload; do
  timeout 90 python3 benchmarks/device/diag_offload.py $P/$x.yaml --steps 7 --cprofile --out $OUT/$x > $OUT/$x.log 2>&1
  echo "$x rc=$? at ${SECONDS}s: $(tail -1 $OUT/$x.log | cut -c1-900)" >> $L
done
for v in "--no-history" "--cli --no-history" "--cli"; do
  timeout 60 python3 benchmarks/diag_peak.py $P/lstm_ckpt.yaml --steps 6 --frames 5 --top 12 $v > $OUT/lstm.log 2>&1
  echo "lstm $v rc=$? at ${SECONDS}s: $(grep -h 'max_memory' $OUT/lstm.log)" >> $L
done
mv $OUT/lstm.log $OUT/lstm_cli_history.log
