"""Recording what the router sees and picks, forward by forward, into a bounded on-disk trace.

Trace format (a directory):
  manifest.json          {"format": 2, "model": ..., "config_hash": ..., "layers": [...],
                          "num_experts": E, "top_k": k, "hidden_size": H, "num_tokens": N,
                          "shards": ["shard_00000.safetensors", ...]}
  shard_XXXXX.safetensors, per recorded token (rows aligned across tensors):
      request_ids   int32 [n]      which request (numbered in order of first appearance; a
                                   forward whose rows are not known by request counts as one)
      positions     int32 [n]      token position in its request, counted from the first
                                   forward traced
      hidden.L      bfloat16 [n,H] layer L's router input
      topk_ids.L    int16 [n,k]    experts layer L's router chose
      moe_output.L  bfloat16 [n,H] layer L's routed-experts output (format 2 on)
Shards and the manifest are written under temporary names and renamed into place.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import torch
from safetensors.torch import save_file

from .files import atomic_path, write_text_atomically
from .previous_tokens import RequestSpans

FORMAT_VERSION = 2


class RoutingTracer:
    def __init__(
        self,
        directory: str,
        metadata: dict,
        max_tokens: int,
        sample_rate: float = 1.0,
        seed: int = 0,
        shard_tokens: int = 8192,
    ) -> None:
        self.directory = directory
        self.metadata = metadata
        self.max_tokens = max_tokens
        self.sample_rate = sample_rate
        self.shard_tokens = shard_tokens
        self.num_tokens = 0
        self.num_steps = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._forward_rows: torch.Tensor | None = None
        self._step: dict[str, torch.Tensor] = {}
        self._pending: list[dict[str, torch.Tensor]] = []
        self._pending_tokens = 0
        self._shards: list[str] = []
        self._request_numbers: dict[str, int] = {}
        self._tokens_seen: Counter[str] = Counter()
        os.makedirs(directory, exist_ok=True)

    def record(
        self,
        layer: int,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        moe_output: torch.Tensor,
        spans: RequestSpans | None = None,
    ) -> None:
        """Called by every MoE layer of a forward; a repeated layer starts the next forward.

        `spans` says which rows belong to which request; without it the forward is one request.
        """
        if f"topk_ids.{layer}" in self._step:
            self.end_step()
        if not self._step:
            self._start_step(hidden.shape[0], spans)
        rows = self._forward_rows
        self._step[f"hidden.{layer}"] = hidden[rows].to("cpu", torch.bfloat16)
        self._step[f"topk_ids.{layer}"] = topk_ids[rows].to("cpu", torch.int16)
        self._step[f"moe_output.{layer}"] = moe_output[rows].to("cpu", torch.bfloat16)

    def _start_step(self, num_tokens: int, spans: RequestSpans | None) -> None:
        keep = torch.rand(num_tokens, generator=self._generator) < self.sample_rate
        rows = keep.nonzero().flatten()[: max(self.max_tokens - self.num_tokens, 0)]
        self._forward_rows = rows
        requests, positions = self._requests_and_positions(num_tokens, spans)
        self._step = {"request_ids": requests[rows], "positions": positions[rows]}

    def _requests_and_positions(
        self, num_tokens: int, spans: RequestSpans | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's request number and position in its request."""
        if spans is None:
            spans = [(f"forward {self.num_steps}", 0, num_tokens)]
        requests = torch.empty(num_tokens, dtype=torch.int32)
        positions = torch.empty(num_tokens, dtype=torch.int32)
        for request, start, end in spans:
            number = self._request_numbers.setdefault(request, len(self._request_numbers))
            requests[start:end] = number
            first = self._tokens_seen[request]
            positions[start:end] = torch.arange(first, first + end - start, dtype=torch.int32)
            self._tokens_seen[request] += end - start
        return requests, positions

    def end_step(self) -> None:
        if not self._step:
            return
        self.num_steps += 1
        rows = len(self._forward_rows)
        if rows:
            self._pending.append(self._step)
            self._pending_tokens += rows
            self.num_tokens += rows
        self._step = {}
        if self._pending_tokens >= self.shard_tokens:
            self._write_shard()

    def _write_shard(self) -> None:
        if not self._pending:
            return
        keys = self._pending[0].keys()
        tensors = {k: torch.cat([step[k] for step in self._pending]).contiguous() for k in keys}
        name = f"shard_{len(self._shards):05d}.safetensors"
        with atomic_path(os.path.join(self.directory, name)) as tmp:
            save_file(tensors, tmp)
        self._shards.append(name)
        self._pending, self._pending_tokens = [], 0

    def close(self) -> dict:
        """Flushes everything and writes the manifest; returns it."""
        self.end_step()
        self._write_shard()
        manifest = {
            "format": FORMAT_VERSION,
            **self.metadata,
            "num_tokens": self.num_tokens,
            "num_steps": self.num_steps,
            "shards": self._shards,
        }
        manifest_path = os.path.join(self.directory, "manifest.json")
        write_text_atomically(manifest_path, json.dumps(manifest, indent=1))
        return manifest


def read_trace(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The manifest and every recorded tensor, shards concatenated in order."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    shards = [load_file(os.path.join(directory, name)) for name in manifest["shards"]]
    if not shards:
        raise ValueError(f"trace {directory} holds no tokens")
    tensors = {k: torch.cat([shard[k] for shard in shards]) for k in shards[0]}
    return manifest, tensors


def write_routing_npz(manifest: dict, tensors: dict[str, torch.Tensor], path: str) -> None:
    """The trace's routing as a plain routing file (see `read_routing_npz`), atomically."""
    import numpy as np

    layers = [int(layer) for layer in manifest["layers"]]
    topk = torch.stack([tensors[f"topk_ids.{layer}"].long() for layer in layers], dim=1)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            layers=np.array(layers, dtype=np.int64),
            topk_ids=topk.numpy(),
            request_ids=tensors["request_ids"].long().numpy(),
            num_experts=np.int64(manifest["num_experts"]),
        )


def read_routing_npz(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A routing file recorded by any engine, as a trace's manifest and tensors (no hidden
    states, so only policies that need routing alone can replay it).

    `.npz` keys: `layers` int [L] (the MoE layers' indices, any values), `topk_ids` int
    [T, L, k] (tokens in the order they were computed), optionally `request_ids` int [T]
    (a request's tokens consecutive; default: one request) and `num_experts` (default: the
    largest id + 1). Bad content raises ValueError naming the key.
    """
    import numpy as np

    with np.load(path) as data:
        missing = [key for key in ("layers", "topk_ids") if key not in data]
        if missing:
            raise ValueError(f"routing file {path} has no {', '.join(missing)}")
        layers = [int(layer) for layer in data["layers"]]
        topk = torch.from_numpy(data["topk_ids"].astype(np.int64))
        if topk.dim() != 3 or topk.shape[1] != len(layers) or len(topk) == 0:
            raise ValueError(
                f"routing file {path}: topk_ids must be [tokens, {len(layers)} layers, top-k], "
                f"got {list(topk.shape)}"
            )
        requests = (
            torch.from_numpy(data["request_ids"].astype(np.int64))
            if "request_ids" in data
            else torch.zeros(len(topk), dtype=torch.int64)
        )
        if requests.shape != (len(topk),):
            raise ValueError(f"routing file {path}: request_ids must be [{len(topk)}]")
        num_experts = int(data["num_experts"]) if "num_experts" in data else int(topk.max()) + 1
    if topk.min() < 0 or topk.max() >= num_experts:
        raise ValueError(f"routing file {path}: expert ids must lie in [0, {num_experts})")
    manifest = {
        "model": str(path),
        "config_hash": None,
        "layers": layers,
        "num_experts": num_experts,
        "top_k": topk.shape[2],
        "num_tokens": len(topk),
    }
    tensors = {f"topk_ids.{layer}": topk[:, i] for i, layer in enumerate(layers)}
    tensors["request_ids"] = requests
    return manifest, tensors


def fit_routing(
    manifest: dict, tensors: dict[str, torch.Tensor], num_layers: int, num_experts: int, top_k: int
) -> tuple[dict, dict[str, torch.Tensor]]:
    """A trace's routing mapped onto another shape, to plan a model no trace exists for.

    Target layer i draws on R source layers i, i+1, ... (cyclically), enough to cover its top-k
    and its experts: from each, its first top-k / R ids in the router's order, offset so the
    source layers stay apart. The ids are then spread over residue classes by layer where the
    target has more experts than that, folded where it has fewer (a row keeps its first `top_k`
    distinct ids; a row left short takes the next ids up). What carries over is the source's
    skew per layer and its reuse from token to token, not its exact sets.
    """
    source = [int(layer) for layer in manifest["layers"]]
    per_source, k_source = manifest["num_experts"], manifest["top_k"]
    combined = max(-(-top_k // k_source), -(-num_experts // per_source))
    taken = -(-top_k // combined)  # ids from each source layer
    span = combined * per_source
    out = {"request_ids": tensors["request_ids"]}
    for i in range(num_layers):
        ids = torch.cat(
            [
                tensors[f"topk_ids.{source[(i + r) % len(source)]}"][:, :taken].long()
                + r * per_source
                for r in range(combined)
            ],
            dim=1,
        )
        if num_experts >= span:
            spread = num_experts // span
            ids = ids * spread + i % spread
        else:
            ids = ids * num_experts // span
        out[f"topk_ids.{i}"] = _first_distinct(ids, top_k, num_experts)
    fitted = {
        **manifest,
        "layers": list(range(num_layers)),
        "num_experts": num_experts,
        "top_k": top_k,
        "fitted_from": {"layers": len(source), "num_experts": per_source, "top_k": k_source},
    }
    return fitted, out


def _first_distinct(ids: torch.Tensor, k: int, num_experts: int) -> torch.Tensor:
    """Each row's first `k` distinct values in order, topped up with the next ids up."""
    width = ids.shape[1]
    earlier = torch.ones(width, width, dtype=torch.bool).tril(-1)
    repeated = ((ids.unsqueeze(2) == ids.unsqueeze(1)) & earlier).any(2)
    order = (repeated.long() * width + torch.arange(width)).argsort(dim=1)
    chosen = ids.gather(1, order[:, :k]).clone()
    short = repeated.logical_not().sum(1) < k
    for position in range(1, k):
        for row in short.nonzero().flatten().tolist():
            taken = set(chosen[row, :position].tolist())
            if chosen[row, position].item() in taken:
                candidate = chosen[row, position - 1].item()
                while candidate in taken:
                    candidate = (candidate + 1) % num_experts
                chosen[row, position] = candidate
    return chosen
