#!/usr/bin/env bash
# The GPU checks in one short command, for a session lent a device machine (the device tool's `run`; CI never has
# one): the `gpu`-marked tests (tests/test_gpu.py: logits against transformers, cached, greedy and CUDA-graph
# decoding against the dynamic step and the CPU, bf16 training), then bench/gpu.py (decode and bf16 training
# against transformers), with that machine's own python3, whose PyTorch has CUDA. A few minutes.
#   run: bash runs/gpu_check.sh [bench/gpu.py options]
# The server on a GPU: python3 bench/serve.py --model DIR --device cuda --dtype bfloat16 (a model with its tokenizer).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device here'; print(torch.__version__, torch.cuda.get_device_name(0))"
PYTHONPATH=. python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
PYTHONPATH=. python3 bench/gpu.py "$@"
