#!/usr/bin/env bash
# Device call 5 (one H200, 2026-12-02; docs/accuracy-zoo.md run 3): activation offload with the forward waiting for the copies down (an experiment, not kept)
# (`drain`), where a ViT's offloaded step goes, the streamed-gradient GPU test's weight difference, then
# the zoo's offload rows measured again one process at a time (run 1 measured three models side by side:
# CPU contention inflated host-update steps, e.g. lora_handwritten ckpt all + state offload 1.77 s there,
# 0.42 s alone in run 4).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
L=$OUT/log.txt
mkdir -p /tmp/d
plan() {
  printf 'memtune_plan: 1\nrun:\n  script: %s\n  argv: %s\n%s\n' "$PWD/examples/zoo/$2" "$3" "$4" > /tmp/d/$1.yaml
}
plan vit vit.py "[--size, gpu, --batch-size, '256', --steps, '1000']" $'offload: {activations: [0-5]}'
plan resnet resnet_amp.py "[--size, gpu, --batch-size, '256', --steps, '1000']" $'offload: {activations: [0-7]}'
for n in vit resnet; do
  echo "== $n" >> $L
  timeout 80 python3 benchmarks/device/diag_offload.py /tmp/d/$n.yaml --steps 7 --out /tmp/d/$n > /tmp/d/$n.log 2>&1
  echo "rc=$?" >> $L; tail -c 1200 /tmp/d/$n.log >> $L
done
echo "== streamed test diff" >> $L
timeout 60 python3 - >> $L 2>&1 <<'PY'
import sys, torch
sys.path.insert(0, "tests")
import test_offload_stream as T
kw = dict(accum=2, autocast=True)
base = T.gpu_train(**kw)
got = T.gpu_train(T.GRADS, **kw)
names = [n for n, _ in base[2].named_parameters()]
wa, wb = T.weights(base), T.weights(got)
rows = sorted(((float((x - y).abs().max()), float((x - y).abs().mean()), n, float(x.abs().max()))
               for n, x, y in zip(names, wa, wb)), reverse=True)
for r in rows[:8]:
    print("maxdiff %.3g meandiff %.3g %s (|w|max %.3g)" % r)
print("losses", [float(a) for a in base[0]], [float(b) for b in got[0]])
PY
tar czf $OUT/d.tgz -C /tmp d
echo "== accuracy rows" >> $L
timeout 420 python3 benchmarks/accuracy.py --models resnet_amp vit distill hf_trainer lora_handwritten peft_lora \
  fused_adamw lightning_module unet_diffusion grad_accum encoder_decoder --resume benchmarks/results/zoo_run2.json \
  --reprofile hf_trainer --only 'offload act. half' 'offload opt. state' 'ckpt all + offload opt. state' \
  --out $OUT/acc --work /tmp/accw --jobs 1 --model-jobs 1 --steps 6 --profile-steps 4 --profile-warmup 1 \
  --timeout 90 --deadline 360 > $OUT/acc.log 2>&1
tail -3 $OUT/acc.log >> $L
grep -E " rc=" $OUT/acc.log | cut -c1-160 >> $L
