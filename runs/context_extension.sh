#!/usr/bin/env bash
# Context extension measured (issue 22): the tour's ~6M-parameter Shakespeare model, trained on windows of 256
# tokens, read at 1,024 tokens four ways: as it is, with YaRN x4 set but not trained, after going on training under
# YaRN x4 on windows of 1,024 (`mighty pretrain --init ... --seq_len 1024 --rope_scaling yarn:4`, the one loop), and,
# as the control for the extra training, after going on training as it was (windows of 256, the same tokens).
# Perplexity by position (buckets of 128) on the corpus' held-out play. About 25 minutes on 2 cores (10 of them the
# base model, reused from `make main` when it is there).
#   bash runs/context_extension.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
M=.venv/bin/mighty
BASE=runs/out/shakespeare
LONG=runs/out/shakespeare-yarn4
MORE=runs/out/shakespeare-more256
STEPS=${1:-150}
if ! { [ -e "$BASE/summary.json" ] && grep -q '"finished": true' "$BASE/summary.json"; }; then
  $M pretrain --config recipes/pretrain-shakespeare.yaml --out "$BASE" --resume true
fi
HELD=$(.venv/bin/python -c "from mightylm.data.pretrain import collect_files; print(collect_files(['shakespeare'])[-1])")
$M pretrain --data shakespeare --out "$LONG" --init "$BASE" --seq_len 1024 --rope_scaling yarn:4 --overwrite true \
  --train.steps "$STEPS" --train.batch_size 4 --train.lr 5e-4 --train.min_lr 5e-5 --train.warmup 10 \
  --train.eval_every "$STEPS" --train.save_every "$STEPS" --train.log_every 10
$M pretrain --data shakespeare --out "$MORE" --init "$BASE" --seq_len 256 --overwrite true \
  --train.steps $((STEPS * 4)) --train.batch_size 4 --train.lr 5e-4 --train.min_lr 5e-5 --train.warmup 10 \
  --train.eval_every $((STEPS * 4)) --train.save_every $((STEPS * 4)) --train.log_every 10
for run in "base|$BASE|" "base, YaRN x4 untrained|$BASE|--rope_scaling yarn:4" "trained on 1,024 under YaRN x4|$LONG|" \
           "control: trained on 256 as it was|$MORE|"; do
  IFS='|' read -r name model extra <<< "$run"
  echo "== $name"
  # shellcheck disable=SC2086
  $M eval longctx --model "$model" $extra --tasks passkey --lengths 1024 --depths 0.5 --samples 1 --text "$HELD" \
    --ppl_length 1024 --bucket 128 --windows 8 --out "runs/out/context-extension/${name//[ ,x:]/_}" --overwrite true \
    2>/dev/null | grep -v "^results:"
done
