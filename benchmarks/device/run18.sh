#!/usr/bin/env bash
# Device call 18 (2026-12-02, one H200): issue 17's zoo rows still from runs 1-2 (measured side by side, when
# waiting processes loaded the host), measured again one process at a time: encoder_decoder, unet_diffusion and
# accelerate_loop profiled again with their plans; lightning_module's and fused_adamw's state-offload rows;
# hf_trainer profiled again (its run-5 profile step is 30% over its measured baseline). About 9.5 minutes.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
acc() {  # acc <out> <deadline s> args...
  local o=$1 d=$2; shift 2
  timeout $((d + 60)) python3 benchmarks/accuracy.py --resume benchmarks/results/zoo_final.json --out $OUT/$o \
    --work /tmp/accw --jobs 1 --model-jobs 1 --steps 6 --profile-steps 5 --profile-warmup 1 --timeout 50 \
    --deadline $d "$@" >> $OUT/acc.log 2>&1
  echo "accuracy $o rc=$? at ${SECONDS}s" >> $L; rm -f $OUT/$o/accuracy.md
}
acc a1 330 --models encoder_decoder unet_diffusion accelerate_loop \
  --reprofile encoder_decoder unet_diffusion accelerate_loop \
  --only baseline 'checkpoint all' 'checkpoint half' 'offload act. half' 'offload opt. state' 'batch 64'
acc a2 $((480 - SECONDS)) --models lightning_module fused_adamw --only 'offload opt. state' 'ckpt all + offload opt. state'
left=$((570 - SECONDS))
[ $left -gt 60 ] && acc a3 $((left - 60)) --models hf_trainer --reprofile hf_trainer --only baseline 'checkpoint all'
