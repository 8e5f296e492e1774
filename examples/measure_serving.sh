#!/usr/bin/env bash
# The serving figures in BENCHMARKS.md: (1) 32 clients x 200 requests against one
# `vllm serve --moe-backend expertflow` (cache_fraction 0.25, disk store), outputs compared with
# a stock server running beside it, then the stock server alone; (2) two Ray Serve replicas on a
# mixed Shakespeare / Python-docs workload, round-robin against expert-affinity routing.
set -euo pipefail
cd "$(dirname "$0")/.."
cli=.venv/bin/vllm-expertflow
model=examples/models/expertflow-demo-moe
out="${OUT:-benchmarks/serving}"
mkdir -p "$out"
export VLLM_CPU_KVCACHE_SPACE=1
engine=(--enforce-eager --max-model-len 512 --max-num-seqs 8 --seed 0)
offload='{"expertflow": {"cache_fraction": 0.25, "store": "disk"}}'
pids=()
stop_all() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait || true; pids=(); }
trap stop_all EXIT

wait_up() {  # URL LOG
  for _ in $(seq 300); do
    curl -sf "$1/health" >/dev/null && return 0
    sleep 1
  done
  tail -20 "$2"; return 1
}

VLLM_CPU_OMP_THREADS_BIND=0 .venv/bin/vllm serve "$model" --moe-backend expertflow \
  --additional-config "$offload" --port 8101 "${engine[@]}" >"$out/expertflow.log" 2>&1 &
pids+=($!)
VLLM_CPU_OMP_THREADS_BIND=1 .venv/bin/vllm serve "$model" --port 8102 "${engine[@]}" \
  >"$out/stock.log" 2>&1 &
pids+=($!)
wait_up http://127.0.0.1:8101 "$out/expertflow.log"
wait_up http://127.0.0.1:8102 "$out/stock.log"
"$cli" load-test --url http://127.0.0.1:8101 --compare-url http://127.0.0.1:8102 \
  --clients 32 --requests 200 --json-out "$out/load_expertflow_vs_stock.json"
"$cli" load-test --url http://127.0.0.1:8102 --clients 32 --requests 200 \
  --json-out "$out/load_stock.json"
stop_all

for routing in round-robin expert-affinity; do
  "$cli" serve-ray "$model" --replicas 2 --routing "$routing" --port 8200 -- \
    --additional-config "$offload" "${engine[@]}" >"$out/ray_$routing.log" 2>&1 &
  pids+=($!)
  wait_up http://127.0.0.1:8200 "$out/ray_$routing.log"
  "$cli" load-test --url http://127.0.0.1:8200 --workload affinity --clients 16 \
    --requests 200 --json-out "$out/affinity_$routing.json"
  stop_all
done
