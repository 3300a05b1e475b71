#!/usr/bin/env bash
# Vision-language on the CPU (issue 23): SmolLM2-135M-Instruct + the pretrained EfficientNet-Lite0, the two LLaVA
# stages and the multimodal LLaMA-Adapter, with bench/vlm.py's settings (1,200 training samples: synthetic scenes
# and Fashion-MNIST; 60 + 300 steps), then three questions about a scene none of them saw. About 35 minutes on 2
# cores (each finetune prints its held-out accuracy per question type; results.json in each run directory).
# Needs Fashion-MNIST: `make fashion-mnist` (Debian's dataset-fashion-mnist).
# Writes runs/out/vlm-demo/{vlm1,vlm2,vlm-adapter,scene.png}, replacing those of an earlier run of this script.
#   bash runs/vlm_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
M=.venv/bin/mighty
OUT=runs/out/vlm-demo  # its own directories: a run of yours under runs/out is never overwritten
TRAIN=(--data.train_samples 1200 --data.test_samples 200 --train.batch_size 8 --train.weight_decay 0.0
       --train.log_every 10 --train.save_every 1000000)
$M finetune vlm --stage 1 --out "$OUT/vlm1" --overwrite true "${TRAIN[@]}" \
  --train.steps 60 --train.lr 1e-3 --train.min_lr 1e-4 --train.warmup 10 --train.eval_every 60
$M finetune vlm --stage 2 --init "$OUT/vlm1" --out "$OUT/vlm2" --overwrite true "${TRAIN[@]}" \
  --train.steps 300 --train.lr 2e-4 --train.min_lr 2e-5 --train.warmup 10 --train.eval_every 300
$M finetune vlm --stage 2 --projector adapter --out "$OUT/vlm-adapter" --overwrite true "${TRAIN[@]}" \
  --train.steps 300 --train.lr 3e-3 --train.min_lr 3e-4 --train.warmup 10 --train.eval_every 300
.venv/bin/python -c "
import numpy as np
from mightylm.multimodal.data import scene
s = scene(np.random.default_rng(20261203), 'colour')  # a seed the training and test sets do not use
s.image.save('$OUT/scene.png')
print('the scene:', s.caption)"
for model in vlm2 vlm-adapter; do
  echo "== $model"
  for q in "Is the shape on the left or on the right?" "What shape is it?" "What colour is the shape?"; do
    printf '%-42s -> ' "$q"
    $M generate --model "$OUT/$model" --image "$OUT/scene.png" --chat true --temperature 0 --max_new_tokens 8 \
      --prompt "$q Answer in one word." 2>/dev/null
  done
done
