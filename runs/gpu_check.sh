#!/usr/bin/env bash
# The GPU checks in one short command, for a session lent a device machine (the device tool's `run`; CI never has
# one): the `gpu`-marked tests (tests/test_gpu.py: logits against transformers, cached and greedy decoding against
# the CPU, bf16 training) with that machine's own python3, whose PyTorch has CUDA. About a minute.
#   run: bash runs/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device here'; print(torch.__version__, torch.cuda.get_device_name(0))"
PYTHONPATH=. python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py "$@"
