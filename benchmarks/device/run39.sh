#!/usr/bin/env bash
# Device call 39 (2026-12-03, one H200): how far a host-bound script's step time moves between processes. Three
# profiles and three unpatched applies of the UNet, T5 and the HF Trainer script, one after another (in call 38
# the UNet's profile read 139 ms a step and its unpatched run 106 ms; T5's 137 and 165).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
L=$OUT/log.txt; W=/tmp/rep; mkdir -p $W
for spec in unet_diffusion:64 encoder_decoder:8 hf_trainer:8; do
  s=${spec%%:*}; b=${spec##*:}
  A="--size gpu --batch-size $b --steps 1000"
  printf 'memtune_plan: 1\nrun: {script: examples/zoo/%s.py, argv: [--size, gpu, --batch-size, "%s", --steps, "1000"]}\n' $s $b > $W/$s.yaml
  for k in 1 2 3; do
    timeout 60 python3 -m memtune profile examples/zoo/$s.py -o $W/$s.$k.json --force --steps 5 --warmup 1 -- $A > $W/$s.p$k.log 2>&1
    python3 -c "import json,sys; p=json.load(open('$W/$s.$k.json')); print('$s profile $k', round(p['step_s']*1e3,1), 'fwd', round(p['fwd_s']*1e3,1), 'bwd', round(p['bwd_s']*1e3,1), 'opt', round(p['optimizer_s']*1e3,1))" >> $L 2>&1
    timeout 60 python3 -m memtune apply $W/$s.yaml --steps 12 --report $W/$s.r$k.json > $W/$s.a$k.log 2>&1
    python3 -c "import json; r=json.load(open('$W/$s.r$k.json')); print('$s apply $k', [round(t*1e3) for t in r['step_times']])" >> $L 2>&1
    echo "  at ${SECONDS}s" >> $L
  done
  timeout 60 python3 -m memtune profile examples/zoo/$s.py -o $W/$s.10.json --force --steps 12 --warmup 1 -- $A > $W/$s.p10.log 2>&1
  python3 -c "import json,sys; p=json.load(open('$W/$s.10.json')); print('$s profile steps 12', round(p['step_s']*1e3,1), 'fwd', round(p['fwd_s']*1e3,1), 'bwd', round(p['bwd_s']*1e3,1))" >> $L 2>&1
done
tail -5 $W/unet_diffusion.p1.log > $OUT/sample_profile_log.txt
