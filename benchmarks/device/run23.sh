#!/usr/bin/env bash
# Device call 23 (2026-12-02, one H200), diagnostics for issue 17's two worst rows: what is live at resnet_amp's
# activation-offload peak (-12% predicted) beside checkpoint-half (predicted within 2%), by
# benchmarks/diag_peak.py; hf_trainer's bf16-params steps (140 ms against an 82 ms baseline) over 12 steps.
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt
D=/tmp/diag; mkdir -p $D
R="memtune_plan: 1
run: {script: examples/zoo/resnet_amp.py, argv: [--size, gpu, --batch-size, '256', --steps, '1000']}"
printf '%s\noffload: {activations: [0-7]}\n' "$R" > $D/r_off.yaml
printf '%s\ncheckpoint: {blocks: [0-7], mode: full}\n' "$R" > $D/r_ckpt.yaml
for p in r_off r_ckpt; do
  timeout 100 python3 benchmarks/diag_peak.py $D/$p.yaml --steps 3 --frames 5 --top 30 > $OUT/$p.txt 2>&1
  echo "$p rc=$? at ${SECONDS}s" >> $L
done
H="memtune_plan: 1
run: {script: examples/zoo/hf_trainer.py, argv: [--size, gpu, --batch-size, '8', --steps, '1000']}"
printf '%s\nprecision: {autocast: none, params: bf16, master_weights: true}\n' "$H" > $D/h_bf16.yaml
printf '%s\n' "$H" > $D/h_base.yaml
printf '%s\nprecision: {autocast: none, params: bf16, master_weights: false}\n' "$H" > $D/h_bf16nm.yaml
for p in h_bf16 h_base h_bf16nm; do
  timeout 90 python3 -m memtune apply $D/$p.yaml --steps 12 --report $D/$p.json > $D/$p.log 2>&1
  python3 -c "import json; r=json.load(open('$D/$p.json')); print('$p', r.get('step_s'), r.get('peak_allocated_bytes'), [round(t*1e3) for t in r.get('step_times', [])], r.get('notes'))" >> $OUT/hf.txt 2>&1
  echo "$p rc=$? at ${SECONDS}s" >> $L
done
