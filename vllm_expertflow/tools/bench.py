"""`vllm-expertflow bench`: decode and prefill speed of expertflow against vLLM's stock MoE
backend, every configuration measured in one run on the same prompts.
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

from vllm_expertflow.tools.engine_runs import (
    DEMO_MODEL,
    greedy_params,
    held_out_prompts,
    open_engine,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--budgets", default="0.25,0.5,1.0", help="cache fractions")
    parser.add_argument("--stores", default="ram,disk")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    parser.add_argument("--store-dir", default=None, help="disk store directory")
    parser.add_argument("--out", type=Path, required=True)


def run(args: argparse.Namespace) -> int:
    budgets = [float(b) for b in args.budgets.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    prompts = held_out_prompts(args.model, count=max(batches))
    configs = [("stock", None, None)] + [
        ("expertflow", store, budget) for store in args.stores.split(",") for budget in budgets
    ]
    rows = []
    for backend, store, budget in tqdm(configs, desc="engines", unit="engine"):
        options = None
        if backend == "expertflow":
            options = {"cache_fraction": budget, "store": store}
            if args.store_dir:
                options["store_dir"] = args.store_dir
        with open_engine(
            backend, options, args.model, enforce_eager=False, enable_prefix_caching=False
        ) as llm:
            for batch in batches:
                row = measure(llm, prompts[:batch], args.decode_tokens, args.repeats, options)
                rows.append(
                    {
                        "backend": backend,
                        "store": store,
                        "cache_fraction": budget,
                        "batch": batch,
                        **row,
                    }
                )
    add_ratios(rows)
    write_results(args, rows)
    return 0


def measure(llm, prompts: list[str], decode_tokens: int, repeats: int, options) -> dict:
    """Decode time is a full generation minus a prefill-only one of the same prompts."""
    from vllm_expertflow import get_stats

    llm.generate(prompts, greedy_params(4), use_tqdm=False)  # warm-up
    before = get_stats(llm)["total"] if options else None
    prefill, full = [], []
    for _ in range(repeats):
        prefill.append(_timed(llm, prompts, 1))
        full.append(_timed(llm, prompts, 1 + decode_tokens))
    prompt_tokens = sum(len(p) for p in llm.get_tokenizer()(prompts)["input_ids"])
    prefill_s, full_s = statistics.median(prefill), statistics.median(full)
    row = {
        "decode_tokens_per_s": len(prompts) * decode_tokens / (full_s - prefill_s),
        "prefill_tokens_per_s": prompt_tokens / prefill_s,
    }
    if before is not None:
        after = get_stats(llm)["total"]
        delta = {
            k: after[k] - before[k]
            for k in ("hits", "misses", "lookups", "bytes_loaded", "load_seconds")
        }
        row.update(delta, hit_rate=delta["hits"] / max(delta["lookups"], 1))
    return row


def _timed(llm, prompts: list[str], max_tokens: int) -> float:
    start = time.perf_counter()
    llm.generate(prompts, greedy_params(max_tokens), use_tqdm=False)
    return time.perf_counter() - start


def add_ratios(rows: list[dict]) -> None:
    stock = {r["batch"]: r for r in rows if r["backend"] == "stock"}
    for row in rows:
        base = stock[row["batch"]]
        row["decode_ratio_vs_stock"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        row["prefill_ratio_vs_stock"] = row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]


def write_results(args: argparse.Namespace, rows: list[dict]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "command": " ".join(["vllm-expertflow", *sys.argv[1:]]),
        "model": str(args.model),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "units": {
            "decode_tokens_per_s": "tokens/s",
            "prefill_tokens_per_s": "tokens/s",
            "bytes_loaded": "bytes",
            "load_seconds": "s",
            "hit_rate": "fraction",
        },
        "rows": rows,
    }
    _write_atomically(args.out / "results.json", json.dumps(results, indent=1))
    _write_atomically(args.out / "results.md", markdown_table(rows))
    plot(rows, args.out / "decode_ratio.png")
    print(markdown_table(rows))


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| backend | store | cache | batch | decode tok/s | vs stock | prefill tok/s | hit rate "
        "| MiB read |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        hit = f"{r['hit_rate']:.3f}" if "hit_rate" in r else "-"
        mib = f"{r['bytes_loaded'] / 2**20:.1f}" if "bytes_loaded" in r else "-"
        lines.append(
            f"| {r['backend']} | {r['store'] or '-'} | {r['cache_fraction'] or '-'} | "
            f"{r['batch']} | {r['decode_tokens_per_s']:.1f} | {r['decode_ratio_vs_stock']:.2f}x "
            f"| {r['prefill_tokens_per_s']:.0f} | {hit} | {mib} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    series = sorted({(r["store"], r["batch"]) for r in rows if r["backend"] == "expertflow"})
    for store, batch in series:
        points = sorted(
            (r["cache_fraction"], r["decode_ratio_vs_stock"], r["hit_rate"])
            for r in rows
            if r["store"] == store and r["batch"] == batch
        )
        fractions = [p[0] for p in points]
        left.plot(fractions, [p[1] for p in points], marker="o", label=f"{store}, batch {batch}")
        right.plot(fractions, [p[2] for p in points], marker="o", label=f"{store}, batch {batch}")
    left.axhline(1.0, color="grey", linestyle="--", label="stock (all resident)")
    left.set(
        xlabel="share of experts resident",
        ylabel="decode tok/s / stock",
        title="Decode speed vs stock",
    )
    right.set(xlabel="share of experts resident", ylabel="hit rate", title="Expert cache hit rate")
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
