#!/usr/bin/env bash
# Device call 47 (one H200, 2026-12-04): issue 20's comparison in one call: the plan `memtune tune --budget 24GiB
# --verify 2` chose in call 46 (batch 14) beside torchao's CPUOffloadOptimizer and FSDP2's CPUOffloadPolicy at
# batch 8 on the same 7B script. FSDP2 (12.4 s a step in call 44) runs first, on 4 steps of which 1 warm-up, so
# that it ends inside the call; the other two on 6 steps of which 2 warm-up.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore COLUMNS=200
L=$OUT/log.txt
python3 -c "import torchao, torch; print('torchao', torchao.__version__, 'torch', torch.__version__)" >> $L 2>&1
P=benchmarks/results/run46/llama7b_24gib.yaml
timeout 250 python3 benchmarks/offload7b.py --plan $P --only fsdp2_b8 --steps 4 --warmup 1 --timeout 240 \
  --budget-s 245 --out $OUT/fsdp2.json > $OUT/fsdp2.log 2>&1
echo "fsdp2 rc=$? at ${SECONDS}s" >> $L
timeout $((585 - SECONDS)) python3 benchmarks/offload7b.py --plan $P --only plan_b14,torchao_b8 --steps 6 \
  --warmup 2 --timeout 170 --budget-s $((575 - SECONDS)) --out $OUT/offload7b.json > $OUT/offload7b.log 2>&1
echo "offload7b rc=$? at ${SECONDS}s" >> $L
