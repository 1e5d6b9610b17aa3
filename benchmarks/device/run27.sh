#!/usr/bin/env bash
# Device call 27 (2026-12-03, one H200): the GPU tests of the profiler and offload; the compiled model's
# optimizer-state offload with inductor compiling in one process (its worker pool slowed the host update 5x in
# call 26) and no update beside a compiled backward; gan with both optimizers offloaded and its large blocks
# checkpointed; ddp_torchrun as one process (first GPU rows); lstm_lm's rnn checkpointed.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
R=benchmarks/results/zoo_final.json
END=545
acc() {  # acc <name> <deadline s> args...; the deadline shrinks to what the call has left
  local n=$1 d=$2; shift 2
  local left=$((END - SECONDS - 70))
  [ $left -lt 30 ] && { echo "$n skipped at ${SECONDS}s" >> $L; return; }
  [ $d -gt $left ] && d=$left
  timeout $((d + 60)) python3 benchmarks/accuracy.py --resume $R --out $OUT/$n --work /tmp/accw --jobs 1 \
    --model-jobs 1 --steps 6 --profile-steps 5 --profile-warmup 1 --timeout 60 --deadline $d "$@" > $OUT/$n.log 2>&1
  echo "$n rc=$? at ${SECONDS}s (deadline $d)" >> $L; rm -f $OUT/$n/accuracy.md
  [ -f $OUT/$n/results.json ] && R=$OUT/$n/results.json
}
timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_profile.py tests/test_offload.py \
  > $OUT/gpu_tests.log 2>&1
echo "gpu tests rc=$? at ${SECONDS}s" >> $L
acc x 60 --models compiled --only 'offload opt. state'
acc g 80 --models gan --only 'offload opt. state' 'checkpoint all'
acc d 170 --models ddp_torchrun --only baseline 'checkpoint all' 'checkpoint half' 'offload act. half' \
  'offload opt. state'
acc l 100 --models lstm_lm --only 'checkpoint all' 'offload act. half'
