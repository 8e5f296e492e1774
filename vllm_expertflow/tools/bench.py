"""`vllm-expertflow bench`: every caching policy side by side, at several cache sizes, against
vLLM's stock MoE backend (the ceiling) and Belady (the floor), all in one run.

Online (the real engine, one per backend; `reconfigure` swaps pool size and policy):
  stock          vLLM's own backend, every expert resident
  lru-ondemand   misses loaded on demand, LRU (mixtral-offloading's policy)
  static         a hot set of the most routed experts pinned, misses on demand
  gate | transition | learned   predictive prefetch with that predictor + predictive eviction
Offline (replayed from a trace recorded during the run, batch-1 decode):
  every policy above and `belady`, the fewest loads any policy can make with the same slots.
The physical limit of every online row, from the same run:
  compute s/token = stock's decode time per token (every expert resident)
  link s/token    = Belady's loads per decode token for that pool and batch (the trace replayed
                    as the measured generations ran: one prefill, then batched decode steps)
                    x seconds per expert load (the engine's own reads, measured in the run)
  limit tok/s     = 1 / max(compute, link);  limit_ratio = achieved / limit
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

from vllm_expertflow.core.files import atomic_path, write_text_atomically
from vllm_expertflow.tools.engine_runs import (
    DEMO_MODEL,
    DEMO_PREDICTORS,
    greedy_params,
    held_out_prompts,
    open_engine,
)

# Loads timed through the engine's store for the link term of the physical limit.
LOADS_MEASURED = 64
ONLINE = ("lru-ondemand", "static", "gate", "transition", "learned")
FULL = {
    "budgets": "0.125,0.25,0.5,1.0",
    "policies": "stock,lru-ondemand,static,gate,transition,learned,belady",
    "decode_tokens": 32,
    "repeats": 3,
}
# Explicit options still win over these.
QUICK = {
    "budgets": "0.25,1.0",
    "policies": "stock,lru-ondemand,learned,belady",
    "decode_tokens": 16,
    "repeats": 1,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--text", type=Path, nargs="*", help="held-out text for prompts")
    parser.add_argument("--budgets", help=f"cache fractions (default {FULL['budgets']})")
    parser.add_argument("--store", choices=("ram", "disk"), default="disk")
    parser.add_argument("--store-dir", default=None)
    parser.add_argument(
        "--policies",
        help=f"comma-separated (default {FULL['policies']}; --quick: {QUICK['policies']})",
    )
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--decode-tokens", type=int)
    parser.add_argument("--repeats", type=int, help="median of this many runs")
    parser.add_argument("--prefetch-depth", type=int, default=2)
    parser.add_argument(
        "--link-gbps",
        type=float,
        default=None,
        help="emulate a slower store link (labelled 'emulated link')",
    )
    parser.add_argument(
        "--learned",
        type=Path,
        default=None,
        help=f"default: {DEMO_PREDICTORS}/learned.safetensors",
    )
    parser.add_argument(
        "--transition",
        type=Path,
        default=None,
        help=f"default: {DEMO_PREDICTORS}/transition.safetensors",
    )
    parser.add_argument(
        "--static-experts",
        type=Path,
        default=None,
        help=f"default: {DEMO_PREDICTORS}/hot_experts.json",
    )
    parser.add_argument(
        "--quantized",
        type=Path,
        nargs="*",
        default=[],
        help="quantized checkpoints of --model (vllm-expertflow quantize) to run lru-ondemand "
        "on at the same cache_bytes as the bf16 model's budgets",
    )
    parser.add_argument("--quick", action="store_true", help=f"a <5 minute run: {QUICK}")
    parser.add_argument("--out", type=Path, required=True)


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fills every option left unset (None) from QUICK or FULL; options given explicitly win."""
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def run(args: argparse.Namespace) -> int:
    from vllm_expertflow.core.tracer import read_trace

    resolve_defaults(args)
    budgets = [float(b) for b in args.budgets.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    policies = args.policies.split(",")
    prompts = bench_prompts(args, max(batches))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    if "stock" in policies:
        with open_engine(
            "auto", None, args.model, enforce_eager=False, enable_prefix_caching=False
        ) as llm:
            labels = {"policy": "stock", "format": "bf16", "cache_fraction": 1.0}
            rows += measured_rows(llm, prompts, batches, args, labels, with_stats=False)
    online = [p for p in policies if p in ONLINE]
    trace_dir = args.out / "trace"
    in_flight_seconds: tuple[float, ...] = ()
    if online:
        expertflow_rows, in_flight_seconds = run_expertflow(
            args, prompts, budgets, batches, online, trace_dir
        )
        rows += expertflow_rows
    for checkpoint in args.quantized:
        rows += run_quantized(args, checkpoint, prompts, budgets, batches)
    add_ratios(rows)
    # Read once: the limits and the offline replays both replay it.
    trace = read_trace(str(trace_dir)) if trace_dir.exists() else None
    if online and "stock" in policies:
        specs = replay_specs(args, policies)
        add_limits(rows, trace, args.decode_tokens, in_flight_seconds, specs)
    offline = offline_rows(args, budgets, policies, trace) if trace is not None else []
    write_results(args, rows, offline, in_flight_seconds)
    return 0


def bench_prompts(args: argparse.Namespace, count: int) -> list[str]:
    if not args.text:
        return held_out_prompts(args.model, count)
    text = "\n\n".join(path.read_text() for path in args.text)
    paragraphs = [p.strip()[:160] for p in text.split("\n\n") if len(p.strip()) >= 160]
    return paragraphs[:count]


def policy_options(
    args: argparse.Namespace, policy: str, budget: float, cache_bytes: int | None = None
) -> dict:
    """Options for one online policy; `cache_bytes`, when given, sizes the pool instead."""
    size = {"cache_fraction": budget} if cache_bytes is None else {"cache_bytes": cache_bytes}
    options: dict = {**size, "store": args.store}
    if args.store_dir:
        options["store_dir"] = args.store_dir
    if args.link_gbps:
        options["link_gbps"] = args.link_gbps
    predictive = {"policy": "predictive", "prefetch_depth": args.prefetch_depth}
    files = {
        "learned": args.learned or DEMO_PREDICTORS / "learned.safetensors",
        "transition": args.transition or DEMO_PREDICTORS / "transition.safetensors",
    }
    extra = {
        "lru-ondemand": {"policy": "lru"},
        "static": {
            "policy": "static",
            "static_experts": str(args.static_experts or DEMO_PREDICTORS / "hot_experts.json"),
        },
        "gate": {**predictive, "predictor": "gate"},
        "transition": {**predictive, "predictor": str(files["transition"])},
        "learned": {**predictive, "predictor": str(files["learned"])},
    }[policy]
    return {**options, **extra}


def run_expertflow(
    args, prompts, budgets, batches, online, trace_dir
) -> tuple[list[dict], tuple[float, ...]]:
    """The online rows, and the seconds per expert load through this engine's store with 1, 2,
    ... loads in flight (the last: as many as its pool overlaps)."""
    import vllm_expertflow
    from vllm_expertflow.tools.trace import model_metadata

    rows = []
    configs = [(budget, policy) for budget in budgets for policy in online]
    first = policy_options(args, "lru-ondemand", budgets[0])
    with open_engine(
        "expertflow", first, args.model, enforce_eager=False, enable_prefix_caching=False
    ) as llm:
        record_trace(llm, prompts, args, trace_dir, model_metadata(args.model))
        in_flight_seconds = vllm_expertflow.measure_load_seconds(llm, LOADS_MEASURED)
        for budget, policy in tqdm(configs, desc="expertflow configs", unit="config"):
            vllm_expertflow.reconfigure(llm, policy_options(args, policy, budget))
            labels = {"policy": policy, "format": "bf16", "cache_fraction": budget}
            rows += measured_rows(llm, prompts, batches, args, labels)
    return rows, in_flight_seconds


def run_quantized(args, checkpoint: Path, prompts, budgets, batches) -> list[dict]:
    """lru-ondemand on a quantized checkpoint, each budget as the bf16 experts' bytes, with
    slots expanded to bf16 on load and kept packed (format `...-packed`)."""
    import vllm_expertflow

    config = json.loads((checkpoint / "config.json").read_text())
    (group,) = config["quantization_config"]["config_groups"].values()
    report = checkpoint / "quantization_report.json"
    method = json.loads(report.read_text())["method"] if report.exists() else "int4"
    fmt = f"int{group['weights']['num_bits']}-{method}-g{group['weights']['group_size']}"
    bf16_bytes = bf16_expert_bytes(config)
    rows = []
    sized = [
        (budget, slots, policy_options(args, "lru-ondemand", budget, int(budget * bf16_bytes)))
        for budget in budgets
        for slots in ("bf16", "packed")
    ]
    with open_engine(
        "expertflow", sized[0][2], checkpoint, enforce_eager=False, enable_prefix_caching=False
    ) as llm:
        for budget, slots, options in tqdm(sized, desc=f"{fmt} budgets", unit="config"):
            vllm_expertflow.reconfigure(llm, {**options, "int4_slots": slots})
            labels = {
                "policy": "lru-ondemand",
                "format": fmt if slots == "bf16" else f"{fmt}-packed",
                "cache_fraction": budget,
                "cache_bytes": options["cache_bytes"],
            }
            rows += measured_rows(llm, prompts, batches, args, labels)
    return rows


def bf16_expert_bytes(config: dict) -> int:
    """Bytes of every routed expert of the model in bf16 (the pool at cache_fraction 1.0)."""
    mlp_only = len(config.get("mlp_only_layers") or [])
    layers = config["num_hidden_layers"] - mlp_only
    per_expert = 3 * config["hidden_size"] * config["moe_intermediate_size"] * 2
    num_experts = config.get("num_experts") or config["num_local_experts"]
    return layers * num_experts * per_expert


def record_trace(llm, prompts, args, trace_dir: Path, metadata: dict) -> None:
    """Batch-1 generation of every prompt, the workload the offline replays model: a prefill,
    then `decode_tokens` decode steps (a measured generation's, so its last token is fed too)."""
    llm.collective_rpc("expertflow_start_tracing", args=(str(trace_dir), metadata, 10**9, 1.0, 0))
    for prompt in prompts:
        llm.generate([prompt], greedy_params(1 + args.decode_tokens), use_tqdm=False)
    llm.collective_rpc("expertflow_stop_tracing")


def measured_rows(
    llm, prompts: list[str], batches: list[int], args, labels: dict, with_stats: bool = True
) -> list[dict]:
    """One result row per batch size, the first `batch` prompts each, tagged with `labels`."""
    return [
        {**labels, "batch": batch, **measure(llm, prompts[:batch], args, with_stats)}
        for batch in batches
    ]


# Where a decode step's time goes, from the engine's own clocks (ms per decode step): the MoE
# layers' host step in all and its parts; the rest of the step is outside the MoE layers.
PROFILE_PARTS = {
    "kernel_ms": "kernel_seconds",
    "stall_ms": "stall_seconds",
    "predict_ms": "predict_seconds",
    "expand_ms": "decode_seconds",
}


def measure(llm, prompts: list[str], args, with_stats: bool) -> dict:
    """Decode time = a full generation minus a prefill-only one of the same prompts; the
    engine's counters and clocks over the same runs give the decode step's profile."""
    llm.generate(prompts, greedy_params(4), use_tqdm=False)  # warm-up
    runs: dict[int, list[tuple[float, dict | None]]] = {1: [], 1 + args.decode_tokens: []}
    for _ in range(args.repeats):
        for max_tokens, timed in runs.items():
            timed.append(_timed(llm, prompts, max_tokens, with_stats))
    prompt_tokens = sum(len(ids) for ids in llm.get_tokenizer()(prompts)["input_ids"])
    prefill, full = runs.values()
    prefill_s = statistics.median(seconds for seconds, _ in prefill)
    full_s = statistics.median(seconds for seconds, _ in full)
    row = {
        "decode_tokens_per_s": len(prompts) * args.decode_tokens / (full_s - prefill_s),
        "prefill_tokens_per_s": prompt_tokens / prefill_s,
        "decode_step_ms": 1e3 * (full_s - prefill_s) / args.decode_tokens,
    }
    if with_stats:
        import vllm_expertflow

        total = {k: sum(d[k] for _, d in prefill + full) for k in full[0][1]}
        row["slots"] = vllm_expertflow.get_stats(llm)["slots"]
        prefetched = max(total["prefetches_issued"], 1)
        row.update(
            total,
            hit_rate=total["hits"] / max(total["lookups"], 1),
            prefetch_precision=total["prefetches_used"] / prefetched,
        )
        steps = args.repeats * args.decode_tokens

        def per_decode_step(key: str) -> float:
            moved = [f[key] - p[key] for (_, p), (_, f) in zip(prefill, full, strict=True)]
            return 1e3 * sum(moved) / steps

        decode_loads = per_decode_step("loads")
        if decode_loads:  # the store's time per load while decoding (the prefill loads more)
            row["decode_link_s_per_load"] = per_decode_step("link_seconds") / decode_loads
        row["moe_ms"] = per_decode_step("step_seconds")
        row.update({name: per_decode_step(key) for name, key in PROFILE_PARTS.items()})
        row["bookkeeping_ms"] = row["moe_ms"] - sum(row[name] for name in PROFILE_PARTS)
        row["outside_moe_ms"] = row["decode_step_ms"] - row["moe_ms"]
    return row


def _timed(llm, prompts: list[str], max_tokens: int, with_stats: bool) -> tuple[float, dict | None]:
    """Wall seconds of one generation and, `with_stats`, the engine's counters it moved."""
    import vllm_expertflow

    before = vllm_expertflow.get_stats(llm)["total"] if with_stats else None
    start = time.perf_counter()
    llm.generate(prompts, greedy_params(max_tokens), use_tqdm=False)
    seconds = time.perf_counter() - start
    if before is None:
        return seconds, None
    after = vllm_expertflow.get_stats(llm)["total"]
    return seconds, {k: after[k] - before[k] for k in after if k != "hit_rate"}


def add_ratios(rows: list[dict]) -> None:
    stock = {r["batch"]: r for r in rows if r["policy"] == "stock"}
    for row in rows:
        if row["batch"] in stock:
            base = stock[row["batch"]]
            row["decode_ratio_vs_stock"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]


def physical_limit(compute_s_per_token: float, loads_per_token: float, load_seconds: float) -> dict:
    """The fastest decode the hardware allows: compute and loads overlap perfectly, and no
    policy loads less than Belady's."""
    link_s_per_token = loads_per_token * load_seconds
    return {
        "compute_s_per_token": compute_s_per_token,
        "link_s_per_token": link_s_per_token,
        "limit_tokens_per_s": 1.0 / max(compute_s_per_token, link_s_per_token),
        "bound": "link" if link_s_per_token > compute_s_per_token else "compute",
    }


def generation_steps(tensors: dict, batch: int, decode_tokens: int) -> list[list[int]]:
    """Trace rows of one generation of the first `batch` traced requests, forward by forward:
    their prompts in one prefill, then each decode step's row of every request."""
    request_ids, positions = tensors["request_ids"], tensors["positions"]
    prefill, decode = [], []
    for request in range(batch):
        rows = (request_ids == request).nonzero().flatten()
        rows = rows[positions[rows].argsort()].tolist()
        prefill += rows[:-decode_tokens]
        decode.append(rows[-decode_tokens:])
    return [prefill] + [list(step) for step in zip(*decode, strict=True)]


def add_limits(
    rows: list[dict],
    trace: tuple[dict, dict],
    decode_tokens: int,
    in_flight_seconds: tuple[float, ...],
    specs: dict[str, dict],
) -> None:
    """Adds the physical limit and `limit_ratio` to every bf16 expertflow row, and what `plan`'s
    timeline predicts for the row from this run's own measurements (`planned_tokens_per_s`,
    `planned_stall_ms` against the measured `stall_ms`).

    Belady's loads are those of a generation run right after the same one (the measured runs
    repeat the prompts), counted over its decode steps only, as decode time is measured. The
    planned figure replays the row's policy over the same steps and puts its loads on a clock
    (`core/timeline.py`): per layer-step, stock's decode time split evenly over the MoE layers
    (loads land during its part before the MoE step; its kernel's share comes after any wait)
    plus the plugin's own work on the step thread (bookkeeping and prefetcher, by the engine's
    clocks); loads on the CPU pool's readers, every load in flight sharing the store, which
    moves one load per `decode_link_s_per_load` of the row's run (each decode step's load
    wall time divided among the loads in flight with it: what the store gave its reads). The
    limit takes the store's time per load measured with as many in flight as the pool
    overlaps (the last of `in_flight_seconds`).
    """
    from vllm_expertflow.core.pool import DEMAND_READERS, IO_THREADS
    from vllm_expertflow.core.prefetcher import loads_hidden_per_layer
    from vllm_expertflow.core.replay import replay, slots_for_fraction
    from vllm_expertflow.core.timeline import Link, simulate

    manifest, tensors = trace
    load_seconds = in_flight_seconds[-1]
    stock = {r["batch"]: r["decode_tokens_per_s"] for r in rows if r["policy"] == "stock"}
    belady: dict[tuple[float, int], float] = {}
    for row in rows:
        if row["policy"] == "stock" or row["format"] != "bf16" or row["batch"] not in stock:
            continue
        budget, batch = row["cache_fraction"], row["batch"]
        if (budget, batch) not in belady:
            generation = generation_steps(tensors, batch, decode_tokens)
            slots = slots_for_fraction(budget, len(manifest["layers"]), manifest["num_experts"])
            warm = len(generation) + 1  # the previous generation and this one's prefill
            result = replay(
                manifest, tensors, slots, "belady", steps=generation * 2, warm_steps=warm
            )
            belady[(budget, batch)] = result.loads / (batch * decode_tokens)
        limit = physical_limit(1.0 / stock[batch], belady[(budget, batch)], load_seconds)
        row.update(
            limit,
            belady_loads_per_token=belady[(budget, batch)],
            expert_load_s=load_seconds,
            limit_ratio=row["decode_tokens_per_s"] / limit["limit_tokens_per_s"],
        )
        if row["policy"] in specs:
            generation = generation_steps(tensors, batch, decode_tokens)
            slots = slots_for_fraction(budget, len(manifest["layers"]), manifest["num_experts"])
            # The prefetcher's online link budget: the loads one layer's time hides, by the
            # mean load time it saw.
            latency = row["load_seconds"] / row["loads"] if row["loads"] else load_seconds
            layer_s = row["decode_step_ms"] / 1e3 / len(manifest["layers"])
            prefetch_budget = loads_hidden_per_layer(layer_s, latency)
            result = replay(
                manifest,
                tensors,
                slots,
                steps=generation * 2,
                warm_steps=len(generation) + 1,
                timeline=True,
                prefetches_per_layer=prefetch_budget,
                **specs[row["policy"]],
            )
            # Per layer: stock's time, split at the MoE step (the kernel's share, as this run
            # measured it, comes after any wait for loads; the attention before goes on while
            # they land), plus the plugin's own work on the step thread (engine clocks).
            per_layer = 1e-3 / len(manifest["layers"])
            stock_layer = batch / stock[batch] / len(manifest["layers"])
            lead = max(stock_layer - row["kernel_ms"] * per_layer, 0.0)
            overhead = (row["bookkeeping_ms"] + row["predict_ms"]) * per_layer
            layer_seconds = stock_layer - lead + overhead
            store_seconds = row.get("decode_link_s_per_load", load_seconds)
            link = Link((store_seconds,), IO_THREADS, DEMAND_READERS)
            predictor = specs[row["policy"]].get("predictor")
            after_compute = predictor is not None and bool(predictor.context_inputs)
            planned = simulate(
                result.forwards,
                layer_seconds,
                link,
                prefetch_after_compute=after_compute,
                lead_seconds=lead,
                prefetch_budget=prefetch_budget,
            )
            row.update(
                planned_tokens_per_s=batch * decode_tokens / planned.seconds,
                planned_stall_share=planned.stall_share,
                planned_stall_ms=1e3 * planned.stall_seconds / decode_tokens,
                planned_overhead_s_per_layer=overhead,
            )


def replay_specs(args, policies: list[str]) -> dict[str, dict]:
    """`replay` arguments of the run's policies (and Belady's), each as the engine ran it; only
    what the run asked for is loaded (a predictor or hot set for another model is not)."""
    from vllm_expertflow.core.checkpoint import load_gate_weights, routing_config_hash
    from vllm_expertflow.core.predictor import GatePredictor, load_predictor
    from vllm_expertflow.core.replay import replay_spec

    predictors = {}
    if "gate" in policies:
        predictors["gate"] = GatePredictor(load_gate_weights(str(args.model)), args.prefetch_depth)
    for name in ("transition", "learned"):
        if name in policies:
            path = policy_options(args, name, 1.0)["predictor"]
            predictors[name] = load_predictor(path, routing_config_hash(str(args.model)))
    specs = {"lru-ondemand": replay_spec("lru-ondemand"), "belady": replay_spec("belady")}
    if "static" in policies:
        hot_file = Path(policy_options(args, "static", 1.0)["static_experts"])
        hot = [tuple(k) for k in json.loads(hot_file.read_text())]
        specs["static"] = replay_spec("static", static_keys=hot)
    for name, predictor in predictors.items():
        specs[name] = replay_spec(name, predictor, prefetch_depth=args.prefetch_depth)
    return specs


def offline_rows(args, budgets, policies, trace: tuple[dict, dict]) -> list[dict]:
    """Replays of the recorded trace: loads per policy against Belady, and predictor recall."""
    from vllm_expertflow.core.predictor import predictor_recall
    from vllm_expertflow.core.replay import replay, slots_for_fraction

    manifest, tensors = trace
    specs = replay_specs(args, policies)
    wanted = [p for p in specs if p in policies or p == "belady"]
    rows = []
    for budget in tqdm(budgets, desc="offline replays", unit="budget"):
        slots = slots_for_fraction(budget, len(manifest["layers"]), manifest["num_experts"])
        results = {p: replay(manifest, tensors, slots, name=p, **specs[p]) for p in wanted}
        floor = max(results["belady"].loads, 1)
        for policy, result in results.items():
            row = {
                "policy": policy,
                "cache_fraction": budget,
                "slots": slots,
                "lookups": result.lookups,
                "loads": result.loads,
                "stalls": result.demand_misses,
                "loads_vs_belady": result.loads / floor,
                "hit_rate": result.hit_rate,
            }
            predictor = specs[policy].get("predictor")
            if predictor is not None:
                recall, precision = predictor_recall(predictor, tensors, 1, manifest["top_k"])
                row.update(
                    next_layer_recall=recall,
                    prefetch_precision=result.prefetch_used / max(result.prefetch_issued, 1),
                )
            rows.append(row)
    return rows


def write_results(
    args, rows: list[dict], offline: list[dict], in_flight_seconds: tuple[float, ...]
) -> None:
    results = {
        "command": " ".join(["vllm-expertflow", *sys.argv[1:]]),
        "model": str(args.model),
        "store": args.store,
        "link": f"emulated link {args.link_gbps} GB/s" if args.link_gbps else "real store speed",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        # Seconds per expert load through the store with 1, 2, ... loads in flight.
        "load_seconds_in_flight": list(in_flight_seconds),
        "units": {
            "decode_tokens_per_s": "tokens/s",
            "prefill_tokens_per_s": "tokens/s",
            "bytes_loaded": "bytes",
            "load_seconds": "s",
            "link_seconds": "s: each load's wall time divided among the loads in flight with it",
            "decode_link_s_per_load": "s: link_seconds per load over the decode steps alone",
            "stall_seconds": "s",
            "hit_rate": "fraction of lookups",
            "loads": "expert copies",
            "loads_vs_belady": "ratio",
            "decode_ratio_vs_stock": "ratio",
            "compute_s_per_token": "s (stock's decode time per token)",
            "link_s_per_token": "s (Belady's loads per token x expert_load_s)",
            "belady_loads_per_token": "expert copies per decoded token",
            "expert_load_s": "s per expert load through the engine's store, as many in "
            "flight as its pool overlaps",
            "limit_tokens_per_s": "tokens/s",
            "limit_ratio": "decode_tokens_per_s / limit_tokens_per_s",
            "planned_tokens_per_s": "tokens/s (`plan`'s timeline on this run's measurements)",
            "planned_stall_share": "fraction of planned decode time waiting for loads",
            "planned_overhead_s_per_layer": "s: the step's bookkeeping and the prefetcher "
            "(engine clocks, this run), added to stock's compute per layer",
            "planned_stall_ms": "ms per decode step the plan's layers wait for loads",
            "decode_step_ms": "ms per decode step (all layers, the whole batch)",
            "moe_ms": "ms per decode step in the MoE layers' host step (engine clocks)",
            "kernel_ms": "ms per decode step in vLLM's kernel on the pool",
            "stall_ms": "ms per decode step waiting for loads",
            "predict_ms": "ms per decode step in the prefetcher (scores, ranking, queuing)",
            "expand_ms": "ms per decode step expanding packed int4 slots",
            "bookkeeping_ms": "ms per decode step in the rest of the host step (page table, "
            "pins, remap)",
            "outside_moe_ms": "decode_step_ms - moe_ms: attention, sampling, vLLM's scheduler",
        },
        "online": rows,
        "offline": offline,
    }
    write_text_atomically(args.out / "results.json", json.dumps(results, indent=1))
    markdown = render_markdown(results)
    write_text_atomically(args.out / "results.md", markdown)
    plot(rows, args.out / "bench.png", results["link"])
    print(markdown)


def render_markdown(results: dict) -> str:
    lines = [
        f"Store: {results['store']}, {results['link']}. Command: `{results['command']}`",
        "",
        "| policy | experts | cache | slots | batch | decode tok/s | vs stock | "
        "limit tok/s (bound) | of limit | planned tok/s | prefill tok/s | hit rate | misses | "
        "MiB read | stall s | "
        "decode s | prefetch precision |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["online"]:
        mib = r.get("bytes_loaded", 0) / 2**20
        lines.append(
            f"| {r['policy']} | {r.get('format', 'bf16')} | {r['cache_fraction']} | "
            f"{r.get('slots', '')} | {r['batch']} | "
            f"{r['decode_tokens_per_s']:.1f} | {r.get('decode_ratio_vs_stock', 0):.2f}x | "
            f"{_limit_cell(r)} | {r.get('limit_ratio', float('nan')):.2f} | "
            f"{r.get('planned_tokens_per_s', float('nan')):.1f} | "
            f"{r['prefill_tokens_per_s']:.0f} | {r.get('hit_rate', 1.0):.3f} | "
            f"{r.get('misses', 0)} | {mib:.1f} | {r.get('stall_seconds', 0):.2f} | "
            f"{r.get('decode_seconds', 0):.2f} | "
            f"{r.get('prefetch_precision', float('nan')):.2f} |"
        )
    profiled = [r for r in results["online"] if "moe_ms" in r]
    if profiled:
        lines += [
            "",
            "Where a decode step's time goes (ms per step, engine clocks; stock: the step only):",
            "",
            "| policy | experts | cache | batch | step | outside MoE | MoE step | kernel | "
            "stall | planned stall | predict | expand | bookkeeping |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["online"]:
            parts = ("outside_moe_ms", "moe_ms", "kernel_ms", "stall_ms", "planned_stall_ms")
            cells = " | ".join(
                f"{r[k]:.2f}" if k in r else "-"
                for k in (*parts, "predict_ms", "expand_ms", "bookkeeping_ms")
            )
            lines.append(
                f"| {r['policy']} | {r.get('format', 'bf16')} | {r['cache_fraction']} | "
                f"{r['batch']} | {r['decode_step_ms']:.2f} | {cells} |"
            )
    if results["offline"]:
        lines += [
            "",
            "Offline replay of the recorded batch-1 trace:",
            "",
            "| policy | cache | slots | loads | loads vs Belady | stalls | hit rate | "
            "next-layer recall | prefetch precision |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["offline"]:
            lines.append(
                f"| {r['policy']} | {r['cache_fraction']} | {r['slots']} | {r['loads']} | "
                f"{r['loads_vs_belady']:.2f} | {r['stalls']} | {r['hit_rate']:.3f} | "
                f"{r.get('next_layer_recall', float('nan')):.3f} | "
                f"{r.get('prefetch_precision', float('nan')):.2f} |"
            )
    return "\n".join(lines) + "\n"


def _limit_cell(row: dict) -> str:
    if "limit_tokens_per_s" not in row:
        return "-"
    return f"{row['limit_tokens_per_s']:.1f} ({row['bound']})"


def plot(rows: list[dict], path: Path, link: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(3, len(batches), figsize=(5.5 * len(batches), 12), squeeze=False)
    for col, batch in enumerate(batches):
        series = dict.fromkeys((r["policy"], r["format"]) for r in rows if r["policy"] != "stock")
        for policy, fmt in series:
            points = sorted(
                (
                    r["cache_fraction"],
                    r.get("hit_rate", 0),
                    r.get("decode_ratio_vs_stock", 0),
                    r.get("limit_ratio", float("nan")),
                )
                for r in rows
                if (r["policy"], r["format"]) == (policy, fmt) and r["batch"] == batch
            )
            x = [p[0] for p in points]
            label = policy if fmt == "bf16" else f"{policy}, {fmt} experts"
            for row_index in range(3):
                values = [p[row_index + 1] for p in points]
                axes[row_index][col].plot(x, values, marker="o", label=label)
        axes[1][col].axhline(1.0, color="grey", linestyle="--", label="stock")
        axes[2][col].axhline(1.0, color="grey", linestyle="--", label="physical limit")
        axes[0][col].set(
            title=f"hit rate, batch {batch}",
            xlabel="pool size, share of the bf16 experts' bytes",
            ylabel="hit rate",
        )
        axes[1][col].set(
            title=f"decode tok/s vs stock, batch {batch} ({link})",
            xlabel="pool size, share of the bf16 experts' bytes",
            ylabel="ratio to stock",
        )
        axes[2][col].set(
            title=f"share of the physical limit, batch {batch}",
            xlabel="pool size, share of the bf16 experts' bytes",
            ylabel="achieved / limit tok/s",
        )
        for ax in (axes[0][col], axes[1][col], axes[2][col]):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
