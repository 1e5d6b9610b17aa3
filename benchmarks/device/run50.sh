#!/usr/bin/env bash
# Device call 50 (one H200): issue 20's three 7B configurations in one call, each under its own timeout.
# Measured so far: the plan (batch 14, 6 steps) took 140 s after another process (call 47) and over 150 s as the
# call's first process (call 48); torchao b8 130-142 s; FSDP2 b8 3 steps 203 s (call 48). So the plan runs first
# with 5 steps (2 warm-up) and 190 s, torchao with 5 steps and 160 s, FSDP2 (3 steps, 1 warm-up) with the rest.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore COLUMNS=200
L=$OUT/log.txt
P=benchmarks/results/run46/llama7b_24gib.yaml
one() {  # name steps warmup timeout
  timeout $(($4 + 10)) python3 benchmarks/offload7b.py --plan $P --only $1 --steps $2 --warmup $3 --timeout $4 \
    --budget-s $(($4 + 5)) --out $OUT/$1.json > $OUT/$1.log 2>&1
  echo "$1 rc=$? at ${SECONDS}s: $(head -1 $OUT/$1.log)" >> $L
}
one plan_b14 5 2 190
one torchao_b8 5 2 160
one fsdp2_b8 3 1 $((580 - SECONDS))
free -g >> $L
