#!/usr/bin/env bash
# Device call 4 (one H200, 2026-12-02): GPU tests after the nf4 tile change, then where offloaded zoo runs
# spend their step (benchmarks/device/diag_offload.py), one process at a time, nothing else on the host.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
L=$OUT/log.txt
mkdir -p /tmp/d
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $L
python3 -c "import torch, triton, transformers; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__)" >> $L
timeout 170 python3 -m pytest -m gpu -q -p no:cacheprovider --timeout 90 tests > /tmp/d/pytest_gpu.log 2>&1 || true
tail -15 /tmp/d/pytest_gpu.log >> $L
plan() {  # name script argv-yaml sections-yaml
  printf 'memtune_plan: 1\nrun:\n  script: %s\n  argv: %s\n%s\n' "$PWD/examples/zoo/$2" "$3" "$4" > /tmp/d/$1.yaml
}
plan lora lora_handwritten.py "[--size, gpu, --batch-size, '4', --steps, '1000']" $'checkpoint: {blocks: all, mode: full}\noffload: {optimizer_state: true}'
plan lora_ck lora_handwritten.py "[--size, gpu, --batch-size, '4', --steps, '1000']" $'checkpoint: {blocks: all, mode: full}'
plan hft hf_trainer.py "[--size, gpu, --batch-size, '8', --steps, '1000']" $'offload: {optimizer_state: true}'
plan vit vit.py "[--size, gpu, --batch-size, '256', --steps, '1000']" $'offload: {activations: [0-5]}'
plan resnet resnet_amp.py "[--size, gpu, --batch-size, '256', --steps, '1000']" $'offload: {activations: [0-7]}'
plan acc_ck accelerate_loop.py "[--size, gpu, --steps, '1000']" $'checkpoint: {blocks: all, mode: full}'
plan acc_off accelerate_loop.py "[--size, gpu, --steps, '1000']" $'offload: {optimizer_state: true}'
for n in lora lora_ck hft vit resnet acc_ck acc_off; do
  echo "== $n" >> $L
  timeout 75 python3 benchmarks/device/diag_offload.py /tmp/d/$n.yaml --steps 7 --out /tmp/d/$n > /tmp/d/$n.log 2>&1
  echo "rc=$?" >> $L; tail -c 1500 /tmp/d/$n.log >> $L
  tar czf $OUT/d.tgz -C /tmp d
done
echo "== lora cprofile" >> $L
timeout 60 python3 benchmarks/device/diag_offload.py /tmp/d/lora.yaml --steps 7 --cprofile --out /tmp/d/lora_cp > /tmp/d/lora_cp.log 2>&1
echo "rc=$?" >> $L; tail -c 600 /tmp/d/lora_cp.log >> $L
tar czf $OUT/d.tgz -C /tmp d
