#!/usr/bin/env bash
# Device calls for the next session (prepared 2026-12-02; one H200), one part per call, about 9 minutes each:
#   bash benchmarks/device/run25.sh new     the zoo scripts not measured yet: gan, compiled, moe, lstm_lm
#   bash benchmarks/device/run25.sh stale   vit, peft_lora, lora_handwritten, fused_adamw profiled again (their
#       profiles predate the host-update probe in pinned memory on a worker thread: fused_adamw's says 4.02G
#       params/s, its run updates at 2.7-2.84G/s), their state-offload rows, then fused_adamw tuned at half
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
acc() {  # acc <deadline s> args...
  local d=$1; shift
  timeout $((d + 60)) python3 benchmarks/accuracy.py --resume benchmarks/results/zoo_final.json --out $OUT/acc \
    --work /tmp/accw --jobs 1 --model-jobs 1 --steps 6 --profile-steps 5 --profile-warmup 1 --timeout 60 \
    --deadline $d "$@" > $OUT/acc.log 2>&1
  echo "accuracy rc=$? at ${SECONDS}s" >> $L; rm -f $OUT/acc/accuracy.md
}
case "$1" in
  new) acc 480 --models gan compiled moe lstm_lm \
         --only baseline 'checkpoint all' 'checkpoint half' 'offload act. half' 'offload opt. state' ;;
  stale) acc 330 --models fused_adamw lora_handwritten vit peft_lora --reprofile fused_adamw lora_handwritten vit peft_lora \
           --only baseline 'offload opt. state' 'ckpt all + offload opt. state'
         R=$OUT/acc/results.json; [ -f $R ] || exit 0
         timeout $((570 - SECONDS)) python3 benchmarks/tune_zoo.py --results $R --out /tmp/tune --jobs 1 --scripts \
           --also fused_adamw:0.5 > $OUT/tune.log 2>&1
         echo "tune_zoo rc=$? at ${SECONDS}s" >> $L; cp /tmp/tune/tune_results.json $OUT/ 2>/dev/null ;;
  *) echo "usage: run25.sh new|stale" >&2; exit 2 ;;
esac
