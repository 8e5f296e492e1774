"""`vllm-expertflow plan`: predicted decode tokens/s for a model, a machine and pool sizes.

From a routing trace (the project's own, or a plain `.npz` routing file recorded by any engine)
and a model's Hugging Face config (no weights needed), each policy is replayed through the
engine's own step and pool (core/replay.py), and the loads it issued are put on a clock with the
machine's link and compute (core/timeline.py). Two baselines come with it: every expert
resident (where it fits) and vLLM's `--cpu-offload-gb` (whatever does not fit crosses the link
on every forward). Presets describe machines we cannot run here; `local` measures this CPU and
the disk under `--store-dir`.

Batch B groups the trace's requests B at a time and decodes them together: forward j holds the
j-th token of each request in the group, as continuous batching would.
"""

from __future__ import annotations

import argparse
import json
import logging
import mmap
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_expertflow.core.checkpoint import load_gate_weights, routing_config_hash
from vllm_expertflow.core.files import atomic_path, write_text_atomically
from vllm_expertflow.core.model_shape import EXPERT_DTYPE_BYTES, ModelFootprint
from vllm_expertflow.core.predictor import GatePredictor
from vllm_expertflow.core.prefetcher import loads_hidden_per_layer
from vllm_expertflow.core.replay import (
    PREDICTIVE_POLICIES,
    replay,
    replay_spec,
    slots_for_fraction,
)
from vllm_expertflow.core.timeline import (
    Hardware,
    LayerCost,
    LayerStep,
    Link,
    TimelineResult,
    compute_seconds,
    simulate,
)
from vllm_expertflow.core.tracer import fit_routing, read_routing_npz, read_trace

logger = logging.getLogger(__name__)

# `gate` is left out: it needs the model's router weights, and a plan needs only its config.
POLICIES = ("lru-ondemand", "static", "gate", "transition", "learned", "belady")
# Share of device memory vLLM may use (its default `gpu_memory_utilization`), and of that the
# part kept for the KV cache and activations rather than weights and the pool.
MEMORY_UTILIZATION, KV_SHARE = 0.9, 0.1

# Datasheet peaks, derated to what kernels and copies achieve: links at about 80% of the PCIe
# generation's x16 rate (pinned host-to-device copies), memory at 80% of peak, dense bf16 at 60%.
# PCIe 5.0 x16 = 64 GB/s, 4.0 x16 = 32 GB/s per direction (PCI-SIG). 30 us per layer-step is a
# MoE layer's kernel launches in eager mode; copy engines from the CUDA device properties.
PRESETS = {
    # NVIDIA H100 PCIe datasheet: 80 GB HBM2e, 2.0 TB/s, 756 TFLOPS bf16 dense; PCIe 5.0.
    "h100-pcie": Hardware("h100-pcie", 51.2, 10.0, 2, 1600.0, 453.6, 80 * 1e9 / 2**30, 30.0),
    # NVIDIA H100 SXM5 datasheet: 80 GB HBM3, 3.35 TB/s, 989 TFLOPS bf16 dense; PCIe 5.0 host.
    "h100-sxm": Hardware("h100-sxm", 51.2, 10.0, 2, 2680.0, 593.4, 80 * 1e9 / 2**30, 30.0),
    # NVIDIA A100 40GB PCIe datasheet: 1,555 GB/s HBM2, 312 TFLOPS bf16 dense; PCIe 4.0.
    "a100-40gb": Hardware("a100-40gb", 25.6, 10.0, 2, 1244.0, 187.2, 40 * 1e9 / 2**30, 30.0),
    # NVIDIA Ada whitepaper, RTX 4090: 24 GB GDDR6X, 1,008 GB/s, 165 TFLOPS bf16 (fp32
    # accumulate) dense; PCIe 4.0.
    "rtx4090": Hardware("rtx4090", 25.6, 10.0, 1, 806.4, 99.1, 24 * 1e9 / 2**30, 30.0),
}


class PlanError(ValueError):
    """A bad `plan` input; the message names the fix."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trace", type=Path, required=True, help="trace folder (`trace`) or .npz routing file"
    )
    parser.add_argument(
        "--hardware",
        required=True,
        help=f"a preset ({', '.join([*PRESETS, 'local'])}) or a JSON file of Hardware's fields",
    )
    parser.add_argument(
        "--model-shape", type=Path, required=True, help="the model's HF config.json"
    )
    parser.add_argument("--expert-dtype", choices=tuple(EXPERT_DTYPE_BYTES), default="bf16")
    parser.add_argument("--budgets", default="0.125,0.25,0.5", help="pool sizes (cache fractions)")
    parser.add_argument("--policies", default="lru-ondemand,belady", help=", ".join(POLICIES))
    parser.add_argument("--predictor", type=Path, help="predictor file for transition/learned")
    parser.add_argument(
        "--gate-model",
        type=Path,
        help="for gate: the traced model's checkpoint folder (its routers predict)",
    )
    parser.add_argument("--static-experts", type=Path, help="hot set JSON for static")
    parser.add_argument("--prefetch-depth", type=int, default=1)
    parser.add_argument("--batches", default="1", help="decode batch sizes")
    parser.add_argument("--store-dir", type=Path, help="where `local` measures the disk")
    parser.add_argument(
        "--fit-trace",
        action="store_true",
        help="map a trace of another shape onto this model's (core/tracer.py: fit_routing)",
    )
    parser.add_argument("--out", type=Path, required=True)


def run(args: argparse.Namespace) -> int:
    try:
        footprint, trace, policies, hardware = _inputs(args)
    except PlanError as error:
        print(error)
        return 2
    manifest, tensors = trace
    budgets = [float(b) for b in args.budgets.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    cost = LayerCost(
        footprint.moe_layer_resident_bytes,
        footprint.expert_bytes,
        footprint.moe_layer_flops_per_token,
    )

    def on_hardware(step: LayerStep) -> float:
        return compute_seconds(cost, hardware, step.tokens, step.experts_run)

    # The GPU pool's one copy stream: prefetches and demand loads in issue order.
    load_seconds = hardware.load_seconds(footprint.expert_bytes)
    link = Link.independent(load_seconds)
    rest = _rest_seconds(footprint, hardware)
    rows = []
    for batch in batches:
        steps = decode_batches(tensors["request_ids"], batch)
        # The prefetcher's link budget, as it measures it online: the loads a layer hides.
        routed = min(batch * manifest["top_k"], manifest["num_experts"])
        layer_s = on_hardware(LayerStep(manifest["layers"][0], batch, routed))
        prefetches = loads_hidden_per_layer(layer_s, load_seconds)
        for budget in tqdm(budgets, desc=f"plan batch {batch}", unit="budget"):
            slots = slots_for_fraction(budget, len(manifest["layers"]), manifest["num_experts"])
            fits = _pool_fits(footprint, hardware, slots)
            results = {
                policy: replay(
                    manifest,
                    tensors,
                    slots,
                    steps=steps,
                    timeline=True,
                    prefetches_per_layer=prefetches,
                    **spec,
                )
                for policy, spec in policies.items()
            }
            floor = max(results["belady"].loads, 1)
            for policy, result in results.items():
                predictor = policies[policy].get("predictor")
                late = predictor is not None and bool(predictor.context_inputs)
                timeline = simulate(
                    result.forwards,
                    on_hardware,
                    link,
                    rest,
                    prefetch_after_compute=late,
                    prefetch_budget=prefetches,
                )
                rows.append(
                    {
                        "policy": policy,
                        "cache_fraction": budget,
                        "batch": batch,
                        "slots": slots,
                        "fits": fits,
                        "hit_rate": result.hit_rate,
                        "loads": result.loads,
                        "loads_vs_belady": result.loads / floor,
                        "bytes_moved": result.loads * footprint.expert_bytes,
                        "stall_share": timeline.stall_share,
                        "tokens_per_s": timeline.tokens_per_s if fits else None,
                    }
                )
        resident = simulate(_without_loads(results["belady"].forwards), on_hardware, link, rest)
        rows += _baselines(footprint, hardware, resident, len(steps), batch)
    write_results(args, hardware, footprint, rows)
    return 0


def decode_batches(request_ids: torch.Tensor, batch: int) -> list[list[int]]:
    """Trace rows per forward: requests taken `batch` at a time, forward j holding the j-th
    token of each (a request's tokens are consecutive rows)."""
    ids = request_ids.tolist()
    requests: list[list[int]] = []
    for row, request in enumerate(ids):
        if not requests or ids[row - 1] != request:
            requests.append([])
        requests[-1].append(row)
    forwards = []
    for start in range(0, len(requests), batch):
        group = requests[start : start + batch]
        for j in range(max(len(r) for r in group)):
            forwards.append([r[j] for r in group if j < len(r)])
    return forwards


def _inputs(args: argparse.Namespace):
    if not args.model_shape.is_file():
        raise PlanError(f"plan: --model-shape {args.model_shape} is not a config.json file")
    try:
        footprint = ModelFootprint.of(json.loads(args.model_shape.read_text()), args.expert_dtype)
    except (ValueError, KeyError) as error:
        raise PlanError(f"plan: --model-shape {args.model_shape}: {error}") from None
    trace = _read_trace(args.trace)
    manifest = trace[0]
    have = (len(manifest["layers"]), manifest["num_experts"], manifest["top_k"])
    want = (len(footprint.moe_layers), footprint.num_experts, footprint.top_k)
    if have != want and not args.fit_trace:
        raise PlanError(
            "plan: the trace routes {} MoE layers x {} experts, top-{}; the model shape has {} x "
            "{}, top-{}: give a trace (or .npz) of this model, or --fit-trace".format(*have, *want)
        )
    names = [p for p in args.policies.split(",") if p]
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise PlanError(f"plan: unknown policies {unknown}; valid: {', '.join(POLICIES)}")
    if have != want:
        predictive = [p for p in names if p in PREDICTIVE_POLICIES or p == "static"]
        if predictive:
            raise PlanError(
                f"plan: {', '.join(predictive)} cannot run on a fitted trace (their predictor or "
                "hot set belongs to the traced model); use lru-ondemand and belady"
            )
        trace = fit_routing(*trace, *want)
    return footprint, trace, _policies(args, names, trace), _hardware(args, footprint)


def _read_trace(path: Path) -> tuple[dict, dict]:
    try:
        if path.suffix == ".npz":
            return read_routing_npz(str(path))
        return read_trace(str(path))
    except (OSError, ValueError, KeyError) as error:
        raise PlanError(f"plan: cannot read the trace {path}: {error}") from None


def _policies(args: argparse.Namespace, names: list[str], trace: tuple[dict, dict]) -> dict:
    from vllm_expertflow.core.predictor import load_predictor

    manifest, tensors = trace
    specs = {}
    for name in [*names, "belady"]:  # Belady's loads are every row's floor
        predictor, hot = None, None
        if name == "gate":
            predictor = _gate_predictor(args, manifest)
        elif name in PREDICTIVE_POLICIES:
            if args.predictor is None:
                raise PlanError(f"plan: {name} needs --predictor FILE (from train-predictor)")
            predictor = load_predictor(str(args.predictor), manifest.get("config_hash"))
        if predictor is not None:
            needs_hidden = f"hidden.{manifest['layers'][0]}" not in tensors
            if needs_hidden and name != "transition":
                raise PlanError(
                    f"plan: {name} predicts from router inputs, which a routing file lacks; "
                    "use a trace folder recorded by `vllm-expertflow trace`"
                )
        if name == "static":
            if args.static_experts is None:
                raise PlanError("plan: static needs --static-experts FILE (a JSON hot set)")
            hot = [tuple(k) for k in json.loads(args.static_experts.read_text())]
        specs[name] = replay_spec(name, predictor, hot, args.prefetch_depth)
    return specs


def _gate_predictor(args: argparse.Namespace, manifest: dict) -> GatePredictor:
    """Speculative gating with the traced model's own routers, from its checkpoint."""
    folder = args.gate_model
    if folder is None or not (folder / "config.json").is_file():
        raise PlanError(
            "plan: gate needs --gate-model DIR, the checkpoint folder of the traced model"
        )
    if routing_config_hash(str(folder)) != manifest.get("config_hash"):
        raise PlanError(
            f"plan: --gate-model {folder} is not the model the trace was recorded from; give "
            "that model's checkpoint folder"
        )
    try:
        return GatePredictor(load_gate_weights(str(folder)), args.prefetch_depth)
    except ValueError as error:
        raise PlanError(f"plan: --gate-model {folder}: {error}") from None


def _hardware(args: argparse.Namespace, footprint: ModelFootprint) -> Hardware:
    if args.hardware in PRESETS:
        return PRESETS[args.hardware]
    if args.hardware == "local":
        return measure_local(args.store_dir, footprint.expert_bytes)
    path = Path(args.hardware)
    try:
        return Hardware(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as error:
        raise PlanError(
            f"plan: --hardware {args.hardware} is neither a preset ({', '.join(PRESETS)}, local) "
            f"nor a JSON file of {', '.join(Hardware.__dataclass_fields__)}: {error}"
        ) from None


def measure_local(store_dir: Path | None, expert_bytes: int) -> Hardware:
    """This CPU and the disk under `store_dir`, measured now: O_DIRECT reads of expert-sized
    records (the disk store's reads), a bf16 matrix-vector product over 32 MiB of weights, a
    bf16 matmul."""
    import psutil

    directory = str(store_dir or tempfile.gettempdir())
    record = -(-expert_bytes // 4096) * 4096
    count = max(4, min(32, (256 * 2**20) // record))
    with tempfile.NamedTemporaryFile(dir=directory) as f:
        f.write(os.urandom(4096) * (record * count // 4096))
        f.flush()
        os.fsync(f.fileno())
        fd = os.open(f.name, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        try:
            buffer = mmap.mmap(-1, record)
            start = time.perf_counter()
            for i in range(count):
                os.preadv(fd, [buffer], i * record)
            seconds_per_record = (time.perf_counter() - start) / count
            small = memoryview(buffer)[:4096]
            start = time.perf_counter()
            for i in range(count):
                os.preadv(fd, [small], i * record + 4096)
            latency = (time.perf_counter() - start) / count
        finally:
            os.close(fd)
    # Decode streams weights through a matrix-vector product: its rate, not a copy's, is the
    # bandwidth a layer gets (on this CPU a bf16 GEMV reaches about 30 GB/s, a copy 40).
    weights = torch.randn(16 * 2**20 // 256, 256, dtype=torch.bfloat16)
    token = torch.randn(1, 256, dtype=torch.bfloat16)
    torch.nn.functional.linear(token, weights)
    start = time.perf_counter()
    for _ in range(32):
        torch.nn.functional.linear(token, weights)
    memory_gbps = 32 * weights.nbytes / (time.perf_counter() - start) / 1e9
    a = torch.randn(1024, 1024, dtype=torch.bfloat16)
    a @ a
    start = time.perf_counter()
    for _ in range(4):
        a @ a
    tflops = 4 * 2 * 1024**3 / (time.perf_counter() - start) / 1e12
    return Hardware(
        name="local",
        link_gbps=record / max(seconds_per_record - latency, 1e-9) / 1e9,
        link_latency_us=latency * 1e6,
        io_queues=1,
        memory_gbps=memory_gbps,
        tflops=tflops,
        memory_gib=psutil.virtual_memory().available / 2**30,
        layer_overhead_us=20.0,
        source=f"measured on this machine; disk under {directory}",
    )


def _usable_bytes(hardware: Hardware) -> float:
    return hardware.memory_gib * 2**30 * MEMORY_UTILIZATION * (1 - KV_SHARE)


def _pool_fits(footprint: ModelFootprint, hardware: Hardware, slots: int) -> bool:
    weights = footprint.weight_bytes_besides_experts + slots * footprint.expert_bytes
    return weights <= _usable_bytes(hardware)


def _rest_seconds(footprint: ModelFootprint, hardware: Hardware) -> float:
    return max(
        footprint.rest_bytes / (hardware.memory_gbps * 1e9),
        footprint.rest_flops_per_token / (hardware.tflops * 1e12),
    )


def _without_loads(forwards: list[list[LayerStep]]) -> list[list[LayerStep]]:
    return [[LayerStep(s.layer, s.tokens, s.experts_run) for s in forward] for forward in forwards]


def _baselines(
    footprint: ModelFootprint,
    hardware: Hardware,
    resident: TimelineResult,
    num_forwards: int,
    batch: int,
) -> list[dict]:
    """All experts resident (`resident`: the trace's forwards without loads), and vLLM's
    --cpu-offload-gb: what does not fit stays in host memory and crosses the link on every
    forward."""
    total = footprint.weight_bytes_besides_experts + footprint.all_experts_bytes
    offloaded = max(0.0, total - _usable_bytes(hardware))
    crossing = offloaded / (hardware.link_gbps * 1e9) * num_forwards
    common = {"batch": batch, "hit_rate": None, "loads_vs_belady": None, "stall_share": None}
    return [
        {
            **common,
            "policy": "all-resident",
            "cache_fraction": 1.0,
            "fits": offloaded == 0,
            "loads": 0,
            "bytes_moved": 0,
            "tokens_per_s": resident.tokens_per_s if offloaded == 0 else None,
        },
        {
            **common,
            "policy": "cpu-offload",
            "cache_fraction": None,
            "fits": True,
            "loads": None,
            "bytes_moved": int(offloaded * num_forwards),
            "tokens_per_s": resident.tokens / (resident.seconds + crossing),
        },
    ]


def write_results(
    args: argparse.Namespace, hardware: Hardware, footprint: ModelFootprint, rows: list[dict]
) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "planned, not measured": True,
        "trace": str(args.trace),
        "model_shape": str(args.model_shape),
        "expert_dtype": args.expert_dtype,
        "hardware": asdict(hardware),
        "expert_bytes": footprint.expert_bytes,
        "all_experts_bytes": footprint.all_experts_bytes,
        "rows": rows,
    }
    write_text_atomically(str(args.out / "results.json"), json.dumps(results, indent=1))
    _plot(rows, hardware, args.out / "plan.png")
    for row in rows:
        tps = row["tokens_per_s"]
        logger.info(
            "plan: %-13s cache %-5s batch %d: %s tok/s",
            row["policy"],
            row["cache_fraction"],
            row["batch"],
            "does not fit" if tps is None else f"{tps:.1f}",
        )
    print(f"plan: wrote {args.out / 'results.json'} and {args.out / 'plan.png'}")


def _plot(rows: list[dict], hardware: Hardware, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({row["batch"] for row in rows})
    figure, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        mine = [r for r in rows if r["batch"] == batch]
        for policy in dict.fromkeys(r["policy"] for r in mine):
            points = [
                (r["cache_fraction"], r["tokens_per_s"])
                for r in mine
                if r["policy"] == policy and r["tokens_per_s"] is not None
            ]
            if policy in ("all-resident", "cpu-offload"):
                for _, value in points:
                    ax.axhline(
                        value,
                        linestyle="--",
                        label=policy,
                        color="gray" if policy == "cpu-offload" else "black",
                    )
            elif points:
                ax.plot(*zip(*points, strict=True), marker="o", label=policy)
        ax.set(xlabel="pool (share of all experts)", ylabel="decode tok/s (planned)")
        ax.set_title(f"{hardware.name}, batch {batch}")
        ax.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
