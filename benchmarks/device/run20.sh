#!/usr/bin/env bash
# Device call 20 (2026-12-02, one H200): activation offload now prefetches only the block that ran just before
# (it fetched the newest offloaded block at the start of backward, next to every kept block's activations:
# ViT -11%, ResNet -12% peak under-prediction). GPU tests of offload, every zoo 'offload act. half' row measured
# again, and unet_diffusion's tuned plan at 0.75 of its baseline (207 ms measured, 114 predicted) taken apart.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
timeout 120 python3 -m pytest -q -m gpu tests/test_offload.py > $OUT/pytest_gpu.log 2>&1
echo "pytest rc=$? at ${SECONDS}s" >> $L
U=/tmp/unet; mkdir -p $U
H="memtune_plan: 1
run: {script: examples/zoo/unet_diffusion.py, argv: [--size, gpu, --batch-size, '64', --steps, '1000']}"
printf '%s\noptimizer: {name: adamw}\ncheckpoint: {blocks: [17-21], mode: full}\n' "$H" > $U/tuned.yaml
printf '%s\ncheckpoint: {blocks: [17-21], mode: full}\n' "$H" > $U/ckpt.yaml
printf '%s\noptimizer: {name: adamw}\n' "$H" > $U/opt.yaml
printf '%s\ncheckpoint: {blocks: all, mode: full}\n' "$H" > $U/all.yaml
for p in tuned ckpt opt all; do
  timeout 60 python3 -m memtune apply $U/$p.yaml --steps 10 --report $U/$p.json > $U/$p.log 2>&1
  python3 -c "import json,sys; r=json.load(open('$U/$p.json')); print('$p', r.get('step_s'), r.get('peak_allocated_bytes'), r.get('notes'), [round(t,4) for t in r.get('step_times',[])])" >> $OUT/unet.txt 2>&1
done
echo "unet done at ${SECONDS}s" >> $L
timeout $((${T:-570} - SECONDS)) python3 benchmarks/accuracy.py --resume benchmarks/results/zoo_final.json --out $OUT/acc \
  --work /tmp/accw --jobs 1 --model-jobs 1 --steps 6 --profile-steps 5 --profile-warmup 1 --timeout 50 \
  --deadline $((${T:-570} - 40 - SECONDS)) --only 'offload act. half' \
  --models vit resnet_amp accelerate_loop distill unet_diffusion encoder_decoder lightning_module hf_trainer \
    peft_lora lora_handwritten fused_adamw > $OUT/acc.log 2>&1
echo "accuracy rc=$? at ${SECONDS}s" >> $L; rm -f $OUT/acc/accuracy.md
