"""ExpertFlow GPU check: kernel correctness, prefetch-copy bandwidth and a decode-step loop.

    python tests/gpu/check.py [--trace DIR] [--steps N] [--batch T]
    python tests/gpu/check.py --cpu-smoke      # correctness only, CPU, Triton interpreter

Needs torch and Triton only (safetensors, if present, to read a routing trace). Sized to finish
in under five minutes on one H100/H200. Exits non-zero on any mismatch or failed capture.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

# The interpreter must be chosen before Triton decorates the kernels.
if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODELS = {
    # name: (hidden, intermediate, experts, top_k)
    "Mixtral-8x7B": (4096, 14336, 8, 2),
    "Qwen3-30B-A3B": (2048, 768, 128, 8),
}
FRACTIONS = (1.0, 0.5, 0.25)


def _import_project():
    """The installed package, or the source tree when the repository was only copied here."""
    if importlib.util.find_spec("vllm_expertflow") is None:
        sys.path.insert(0, str(REPO))
    if importlib.util.find_spec("vllm_expertflow.kernels") is None:
        spec = importlib.util.spec_from_file_location(
            "vllm_expertflow.kernels",
            REPO / "kernels" / "__init__.py",
            submodule_search_locations=[str(REPO / "kernels")],
        )
        sys.modules["vllm_expertflow.kernels"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["vllm_expertflow.kernels"])


_import_project()
from vllm_expertflow.kernels.fused_moe_uva import (  # noqa: E402
    MAX_TOKENS,
    fused_moe_uva,
    fused_moe_uva_reference,
)

from vllm_expertflow.core.device_page_table import DevicePageTable  # noqa: E402
from vllm_expertflow.core.int4 import Int4Packing  # noqa: E402
from vllm_expertflow.core.moe_step import GraphStep  # noqa: E402
from vllm_expertflow.core.policy import LRUPolicy  # noqa: E402
from vllm_expertflow.core.pool import ExpertPool  # noqa: E402
from vllm_expertflow.core.stats import OffloadStats  # noqa: E402
from vllm_expertflow.core.store import RamStore  # noqa: E402


class CheckFailed(AssertionError):
    pass


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise CheckFailed(what)
    print(f"  ok  {what}")


# --- (i) correctness ---------------------------------------------------------------------------


def check_device_page_table(device: torch.device, gen: torch.Generator) -> None:
    table = DevicePageTable([1, 4, 7], 16, device)
    expected = torch.full((3, 16), -1, dtype=torch.int32)
    storage = table.table.data_ptr()
    for _ in range(64):
        row = int(torch.randint(3, (1,), generator=gen))
        expert = int(torch.randint(16, (1,), generator=gen))
        slot = int(torch.randint(-1, 9, (1,), generator=gen))
        if slot < 0:
            table.clear([1, 4, 7][row], expert)
        else:
            table.set([1, 4, 7][row], expert, slot)
        expected[row, expert] = slot
    _expect(torch.equal(table.to_host(), expected), "DevicePageTable set/clear")
    _expect(table.table.data_ptr() == storage, "DevicePageTable never reallocates")


def check_remap(device: torch.device, gen: torch.Generator) -> None:
    """The host step's remap (one gather on the device) against a host lookup."""
    table = DevicePageTable([3], 64, device)
    slots = torch.randperm(64, generator=gen)
    for expert, slot in enumerate(slots.tolist()):
        table.set(3, expert, slot)
    for tokens, top_k, dtype in ((1, 8, torch.int32), (300, 2, torch.int64)):
        ids = torch.randint(64, (tokens, top_k), generator=gen, dtype=dtype)
        remapped = table.remap(3, ids.to(device)).cpu()
        _expect(remapped.dtype == dtype, f"remap keeps {dtype}")
        _expect(torch.equal(remapped, slots[ids.long()].to(dtype)), f"remap T={tokens} k={top_k}")


def _moe_case(shape, device, gen, pin: bool):
    tokens, top_k, experts, slots, hidden, inter = shape

    def weights(*dims: int, on_device: bool) -> torch.Tensor:
        w = (torch.randn(*dims, generator=gen) / hidden**0.5).bfloat16()
        return w.to(device) if on_device else (w.pin_memory() if pin else w)

    x = torch.randn(tokens, hidden, generator=gen).bfloat16().to(device)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    topk_weights = (torch.rand(tokens, top_k, generator=gen) + 0.1).to(device)
    row = torch.full((experts,), -1, dtype=torch.int32)
    resident = torch.randperm(experts, generator=gen)[: slots // 2 + 1]
    row[resident] = torch.randperm(slots, generator=gen)[: len(resident)].int()
    return (
        x,
        ids.int().to(device),
        topk_weights,
        row.to(device),
        weights(slots, 2 * inter, hidden, on_device=True),
        weights(slots, hidden, inter, on_device=True),
        weights(experts, 2 * inter, hidden, on_device=False),
        weights(experts, hidden, inter, on_device=False),
    )


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return torch.allclose(out.float().cpu(), ref.float(), atol=2e-2, rtol=2e-2)


def check_fused_moe(device: torch.device, gen: torch.Generator, shapes) -> None:
    for shape in shapes:
        args = _moe_case(shape, device, gen, pin=device.type == "cuda")
        out = fused_moe_uva(*args)
        _expect(_close(out, fused_moe_uva_reference(*args)), f"fused_moe_uva {shape}")


def check_fused_moe_graph(device: torch.device, gen: torch.Generator) -> None:
    """A captured step keeps reading the live device page table: one graph replays with
    misses, then again after the residents were evicted and the misses loaded."""
    args = list(_moe_case((8, 4, 16, 6, 256, 192), device, gen, pin=True))
    w13_pool, w2_pool, w13_host, w2_host = args[4:]
    table = DevicePageTable([0], len(args[3]), device)
    table.table[0].copy_(args[3])
    args[3] = table.row(0)
    graph, out = _capture(lambda: fused_moe_uva(*args))
    graph.replay()
    _expect(_close(out, fused_moe_uva_reference(*args)), "fused_moe_uva replayed with misses")
    before = table.to_host()[0]
    for expert in (before >= 0).nonzero().flatten().tolist():
        table.clear(0, expert)
    missing = (before < 0).nonzero().flatten().tolist()[: w13_pool.shape[0]]
    for slot, expert in enumerate(missing):
        w13_pool[slot].copy_(w13_host[expert])
        w2_pool[slot].copy_(w2_host[expert])
        table.set(0, expert, slot)
    graph.replay()
    _expect(_close(out, fused_moe_uva_reference(*args)), "fused_moe_uva replayed after remap")


def check_int4_unpack(device: torch.device, gen: torch.Generator) -> None:
    """Packed int4 slots expand on the device: bit for bit the CPU's expansion (itself tested
    against compressed-tensors), symmetric and with zero points; timed on a GPU."""
    experts, rows, cols, group = 4, 1536, 2048, 128  # Qwen3-30B-A3B's fused gate/up
    packed = torch.randint(-(2**31), 2**31 - 1, (experts, rows, cols // 8), generator=gen)
    packed = packed.to(torch.int32)
    scale = (torch.rand(experts, rows, cols // group, generator=gen) / 50).to(torch.bfloat16)
    zero_point = torch.randint(
        -(2**31), 2**31 - 1, (experts, rows // 8, cols // group), generator=gen
    ).to(torch.int32)
    for symmetric in (True, False):
        packing = Int4Packing(group, symmetric)
        zeros = None if symmetric else zero_point
        dense = torch.empty(experts, rows, cols, dtype=torch.bfloat16)
        expected = packing.dequantize(packed, scale, zeros, dense)
        on_device = [t.to(device) if t is not None else None for t in (packed, scale, zeros)]
        out = torch.empty(experts, rows, cols, dtype=torch.bfloat16, device=device)
        packing.dequantize(*on_device, out)
        kind = "symmetric" if symmetric else "zero points"
        _expect(torch.equal(out.cpu(), expected), f"int4 unpack on {device} ({kind})")
        if device.type == "cuda":
            seconds = _seconds(functools.partial(packing.dequantize, *on_device, out))
            print(f"      {experts * rows * cols / seconds / 1e9:.1f} G weights/s expanded")


def _seconds(run, repeats: int = 5) -> float:
    """Best wall seconds of `run()` on the current CUDA stream."""
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def check_correctness(device: torch.device, gen: torch.Generator, moe_shapes) -> None:
    print(f"(i) correctness on {device}")
    check_device_page_table(device, gen)
    check_remap(device, gen)
    check_fused_moe(device, gen, moe_shapes)
    check_int4_unpack(device, gen)
    check_decode_loop(device.type, gen)
    if device.type == "cuda":
        check_fused_moe_graph(device, gen)


# --- (ii) copy bandwidth -----------------------------------------------------------------------


def _bandwidth(copy, nbytes: int, repeats: int = 3) -> float:
    """Best GB/s of `copy()` over a few runs, timed by events on the current stream; `copy`
    returns a callable that does the copies, so its set-up stays out of the timing."""
    best = float("inf")
    for _ in range(repeats):
        run = copy()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        run()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return nbytes / best / 1e9


def measure_bandwidth(layer: MoeLayer, count: int) -> tuple[float, float]:
    """(the pool's demand loads: side stream, an event each; one plain copy) in GB/s."""
    nbytes = count * layer.expert_bytes
    flat_host = layer.store.layer_tensors(0)["w13"].view(-1)[: nbytes // 2]

    def per_expert():
        pool = layer.pool(count)  # empty: every expert is a load
        return lambda: pool.release(pool.ensure_resident(0, list(range(count))))

    def plain():
        flat_dev = torch.empty_like(flat_host, device="cuda")
        return lambda: flat_dev.copy_(flat_host, non_blocking=True)

    return _bandwidth(per_expert, nbytes), _bandwidth(plain, nbytes)


# --- (iii) decode loop -------------------------------------------------------------------------


class MoeLayer:
    """One MoE layer with real shapes, in ExpertFlow's pinned RAM store, and its step inputs."""

    def __init__(
        self, shape: tuple[int, int, int, int], batch: int, gen: torch.Generator, device: str
    ) -> None:
        hidden, inter, experts, top_k = shape
        self.experts, self.top_k, self.device = experts, top_k, device
        self.store = RamStore(experts, pin_memory=device == "cuda")
        # Drawn on the device: filling gigabytes with randn on the CPU is too slow.
        w13 = torch.randn(experts, 2 * inter, hidden, device=device, dtype=torch.bfloat16)
        w2 = torch.randn(experts, hidden, inter, device=device, dtype=torch.bfloat16)
        self.store.write_layer(0, {"w13": w13.div_(hidden**0.5), "w2": w2.div_(inter**0.5)})
        del w13, w2
        self.store.finish_writing()
        self.expert_bytes = self.store.layout.nbytes
        self.x = torch.randn(batch, hidden, generator=gen).bfloat16().to(device)
        self.topk_weights = torch.rand(batch, top_k, generator=gen).to(device) + 0.1
        self.topk_ids = torch.zeros(batch, top_k, dtype=torch.int32, device=device)

    def pool(self, num_slots: int) -> ExpertPool:
        """The engine's pool: LRU, with its device page table."""
        device = torch.device(self.device)
        return ExpertPool(self.store, num_slots, device, [0], LRUPolicy(), OffloadStats())

    def graph_step(self, pool: ExpertPool) -> GraphStep:
        """The engine's graph step on this layer, with the kernel the adapter injects."""
        return GraphStep(pool, self.store, fused_moe_uva, MAX_TOKENS)

    def run(self, step: GraphStep) -> torch.Tensor:
        return step.run(0, self.x, self.topk_weights, self.topk_ids)


def _capture(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out


def run_loop(layer: MoeLayer, routing: torch.Tensor, fraction: float, graphed: bool):
    """(ms per step, distinct experts missed per step) over the routing, 3 steps of warm-up."""
    capacity = max(layer.top_k, round(fraction * layer.experts))
    pool = layer.pool(capacity)
    popular = torch.bincount(routing.flatten().long(), minlength=layer.experts)
    pool.admit(0, popular.argsort(descending=True)[:capacity].tolist())
    pool.drain()
    step = layer.graph_step(pool)
    run = functools.partial(layer.run, step)
    run = _capture(run)[0].replay if graphed else run
    step.routing_log.collect()  # forget the warm-up and capture runs
    warmup = 3
    for index, ids in enumerate(routing):
        if index == warmup:
            _synchronize(layer.device)
            start, misses = time.perf_counter(), pool.stats.layer(0).misses
        layer.topk_ids.copy_(ids, non_blocking=True)
        out = run()
        step.between_forwards()
    _synchronize(layer.device)
    steps = len(routing) - warmup
    misses = pool.stats.layer(0).misses - misses
    _expect_step_output(layer, pool, step, out)
    return (time.perf_counter() - start) * 1e3 / steps, misses / steps


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _expect_step_output(layer: MoeLayer, pool: ExpertPool, step: GraphStep, out) -> None:
    """The last step's output equals the same step computed from host memory alone: slots the
    loop loaded hold the right experts and the page table points at them. Silent if so."""
    everything_missed = torch.full((layer.experts,), -1, dtype=torch.int32)
    reference = fused_moe_uva_reference(
        layer.x,
        layer.topk_ids,
        layer.topk_weights,
        everything_missed,
        pool.w13,
        pool.w2,
        step.store.layer_tensors(0)["w13"],
        step.store.layer_tensors(0)["w2"],
    )
    if not _close(out, reference):
        raise CheckFailed("decode loop: the last step differs from the all-host reference")


def check_decode_loop(device: str, gen: torch.Generator) -> None:
    """A short LRU decode loop at a quarter of the experts, against the all-host reference."""
    layer = MoeLayer((128, 96, 16, 4), 4, gen, device)
    routing = synthetic_routing(layer.experts, layer.top_k, 4, 8, gen)
    run_loop(layer, routing, 0.25, graphed=False)
    print("  ok  decode loop (pool, graph step, routing log, admit) at cache 0.25")


def synthetic_routing(experts: int, top_k: int, batch: int, steps: int, gen) -> torch.Tensor:
    """Zipf-skewed expert popularity; each token keeps last step's experts 70% of the time."""
    popularity = 1.0 / torch.arange(1, experts + 1).float() ** 1.1
    popularity = popularity[torch.randperm(experts, generator=gen)]
    current = torch.multinomial(popularity.expand(batch, -1), top_k, generator=gen)
    routing = []
    for _ in range(steps):
        fresh = torch.multinomial(popularity.expand(batch, -1), top_k, generator=gen)
        keep = torch.rand(batch, 1, generator=gen) < 0.7
        current = torch.where(keep, current, fresh)
        routing.append(current.int())
    return torch.stack(routing)


def trace_routing(directory: str, experts: int, top_k: int, batch: int, steps: int):
    """The first MoE layer's recorded top-k ids, cut into steps of `batch` tokens; None when
    the trace is of another shape of model or safetensors is missing."""
    try:
        from safetensors import safe_open
    except ImportError:
        return None
    manifest = json.loads((Path(directory) / "manifest.json").read_text())
    if manifest["num_experts"] != experts or manifest["top_k"] != top_k:
        return None
    key = f"topk_ids.{manifest['layers'][0]}"
    rows = []
    for shard in manifest["shards"]:
        with safe_open(str(Path(directory) / shard), framework="pt") as file:
            rows.append(file.get_tensor(key).int())
    ids = torch.cat(rows)[: batch * steps]
    if len(ids) < batch * steps:
        return None
    return ids.view(steps, batch, top_k)


def run_model(model: str, args, gen: torch.Generator) -> tuple[list[tuple], float]:
    layer = MoeLayer(MODELS[model], args.batch, gen, "cuda")
    experts, top_k = layer.experts, layer.top_k
    # About a gigabyte of whole experts; the plain copy of as many bytes fits in w13 alone.
    count = min(experts * 2 // 3, max(1, 10**9 // layer.expert_bytes))
    per_expert_bw, plain_bw = measure_bandwidth(layer, count)
    print(
        f"(ii) {model}: per-expert copies {per_expert_bw:.1f} GB/s, one copy "
        f"{plain_bw:.1f} GB/s, ratio {per_expert_bw / plain_bw:.2f} (target >= 0.9)"
    )
    steps = args.steps + 3
    routing = args.trace and trace_routing(args.trace, experts, top_k, args.batch, steps)
    source = "trace" if routing is not None else "synthetic"
    if routing is None:
        routing = synthetic_routing(experts, top_k, args.batch, steps, gen)
    routing = routing.pin_memory()
    rows = []
    for graphed in (False, True):
        resident_ms = None
        for fraction in FRACTIONS:
            ms, misses = run_loop(layer, routing, fraction, graphed)
            resident_ms = resident_ms or ms
            floor_ms = misses * layer.expert_bytes / plain_bw / 1e6
            mode = "graph" if graphed else "eager"
            rows.append((model, source, mode, fraction, ms, ms / resident_ms, misses, floor_ms))
    del layer
    torch.cuda.empty_cache()
    return rows, per_expert_bw / plain_bw


def print_table(rows: list[tuple]) -> None:
    print(
        f"\n{'model':<14} {'routing':<9} {'mode':<5} {'cache':>5} {'step ms':>8} "
        f"{'x resident':>10} {'miss/step':>9} {'floor ms':>8} {'x floor':>7}"
    )
    for model, source, mode, fraction, ms, vs_resident, misses, floor_ms in rows:
        vs_floor = f"{ms / floor_ms:7.2f}" if floor_ms else f"{'-':>7}"
        print(
            f"{model:<14} {source:<9} {mode:<5} {fraction:>5.2f} {ms:>8.2f} "
            f"{vs_resident:>10.2f} {misses:>9.1f} {floor_ms:>8.2f} {vs_floor}"
        )
    print("floor: the missed experts' bytes at the plain-copy bandwidth")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="correctness only, on CPU")
    parser.add_argument("--trace", help="routing trace directory (see core/tracer.py)")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per run")
    parser.add_argument("--batch", type=int, default=8, help="decode tokens per step (<= 64)")
    args = parser.parse_args()
    seed = torch.seed() % 2**31
    print(f"seed {seed}")
    gen = torch.Generator().manual_seed(seed)
    if args.cpu_smoke:
        check_correctness(torch.device("cpu"), gen, [(3, 2, 8, 4, 64, 32), (2, 3, 6, 3, 48, 40)])
        print("cpu smoke: all checks passed")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke for the CPU correctness checks")
        return 2
    moe_shapes = [(1, 2, 8, 4, 4096, 1024), (7, 8, 64, 20, 512, 200), (64, 8, 128, 40, 256, 96)]
    check_correctness(torch.device("cuda"), gen, moe_shapes)
    rows, ratios = [], []
    for model in MODELS:
        model_rows, ratio = run_model(model, args, gen)
        rows += model_rows
        ratios.append(ratio)
    print_table(rows)
    if min(ratios) < 0.9:
        print(f"WARNING: per-expert copy bandwidth ratio {min(ratios):.2f} is below 0.9")
    return 0


if __name__ == "__main__":
    sys.exit(main())
