"""Next-layer expert predictors: from what MoE layer L sees, score the experts of later layers.

Every predictor answers the same question: given layer L's router input `hidden [T, H]` and its
routed `topk_ids [T, k]`, how likely is each expert of the `depth`-th MoE layer after L to be
routed for each token (`[T, E]`, higher is likelier)? Layers are named by their model index;
`layers` lists the MoE layers in order, so depth 1 after `layers[i]` is `layers[i + 1]`.

A predictor may also read a `context` of `[T, H]` tensors, named in its `context_inputs`: layer
L's MoE output and the previous token's router input and MoE output at layer L (what layer
L+1's attention will mix in). Those exist only once layer L has computed.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from .previous_tokens import previous_rows

CONTEXT_INPUTS = ("moe_output", "prev_hidden", "prev_moe_output")
Context = dict[str, torch.Tensor]


class ExpertPredictor(ABC):
    context_inputs: tuple[str, ...] = ()

    def __init__(self, layers: list[int], max_depth: int) -> None:
        self.layers = list(layers)
        self.max_depth = max_depth

    def target_layer(self, layer: int, depth: int) -> int | None:
        """The MoE layer `depth` layers after `layer`, or None past the last one."""
        index = self.layers.index(layer) + depth
        return self.layers[index] if index < len(self.layers) else None

    @abstractmethod
    def scores(
        self,
        layer: int,
        depth: int,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        context: Context | None = None,
    ) -> torch.Tensor:
        """`[T, E]` scores of the target layer's experts, one row per token."""

    def predict_experts(
        self,
        layer: int,
        depth: int,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        k: int,
        context: Context | None = None,
    ) -> torch.Tensor:
        """The `k` likeliest experts per token, `[T, k]`."""
        return self.scores(layer, depth, hidden, topk_ids, context).topk(k, dim=-1).indices

    def ranked(
        self,
        layer: int,
        depth: int,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        top_k: int,
        context: Context | None = None,
    ) -> list[tuple[int, float]]:
        """The batch's ranking of the target layer's experts (`rank_for_batch` of the scores)."""
        return rank_for_batch(self.scores(layer, depth, hidden, topk_ids, context), top_k)

    def ranked_depths(
        self,
        layer: int,
        depths: list[int],
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        top_k: int,
        context: Context | None = None,
    ) -> list[list[tuple[int, float]]]:
        """`ranked` for several depths at once (predictors that can, batch them)."""
        return [self.ranked(layer, d, hidden, topk_ids, top_k, context) for d in depths]


def rank_for_batch(scores: torch.Tensor, top_k: int) -> list[tuple[int, float]]:
    """Experts some token is predicted to route to, with the share of tokens that do, best first.

    Ties between equally voted experts go to the higher mean probability.
    """
    num_tokens, num_experts = scores.shape
    if num_tokens == 1:
        # One token: its top-k, each with every vote, best first (one op, not eight).
        return [(e, 1.0) for e in scores[0].topk(top_k).indices.tolist()]
    chosen = scores.topk(top_k, dim=-1).indices.flatten()
    share = torch.bincount(chosen, minlength=num_experts).float() / num_tokens
    order = (share + 1e-3 * scores.softmax(-1).mean(0)).argsort(descending=True)
    # Plain lists from here: indexing tensors element by element costs microseconds each.
    shares = share.tolist()
    return [(e, shares[e]) for e in order.tolist() if shares[e] > 0]


class GatePredictor(ExpertPredictor):
    """Speculative gating: layer L+d's own router applied to layer L's router input.

    Works because the residual stream changes little from one layer to the next; needs no
    training, only the gate weights `[E, H]` of every MoE layer.
    """

    def __init__(self, gates: dict[int, torch.Tensor], max_depth: int = 1) -> None:
        super().__init__(sorted(gates), max_depth)
        self._gates = {layer: w.float() for layer, w in gates.items()}

    def scores(
        self,
        layer: int,
        depth: int,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        context: Context | None = None,
    ) -> torch.Tensor:
        target = self.target_layer(layer, depth)
        gate = self._gates[target]
        return hidden.to(gate.device, torch.float32) @ gate.T


def trace_layers(manifest: dict) -> list[int]:
    return [int(layer) for layer in manifest["layers"]]


def trace_context(tensors: dict[str, torch.Tensor], layer: int) -> Context:
    """The `CONTEXT_INPUTS` of every traced token at `layer`, in float32.

    A token's previous token is the row above when it is the same request's preceding position
    (a trace may sample rows); otherwise it is zeros, as at a request's first token.
    """
    if f"moe_output.{layer}" not in tensors:
        raise ValueError(
            "expertflow: this trace has no MoE outputs (trace format 1); record it again with "
            "`vllm-expertflow trace`"
        )
    hidden = tensors[f"hidden.{layer}"].float()
    output = tensors[f"moe_output.{layer}"].float()
    requests, positions = tensors["request_ids"], tensors["positions"]
    follows = torch.zeros(len(hidden), dtype=torch.bool)
    follows[1:] = (requests[1:] == requests[:-1]) & (positions[1:] == positions[:-1] + 1)
    return {
        "moe_output": output,
        "prev_hidden": previous_rows(hidden, follows),
        "prev_moe_output": previous_rows(output, follows),
    }


def routed_one_hot(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`[T, E]` float multi-hot of the routed experts."""
    hot = torch.zeros(topk_ids.shape[0], num_experts, device=topk_ids.device)
    return hot.scatter_(1, topk_ids.long(), 1.0)


def predictor_recall(
    predictor: ExpertPredictor, tensors: dict[str, torch.Tensor], depth: int, num_predicted: int
) -> tuple[float, float]:
    """(recall, precision) of the top-`num_predicted` experts at `depth`, over every layer pair.

    Micro-averaged: every routed (token, target layer, expert) counts once. Precision is the
    share of predicted experts that were routed, i.e. the share of a prefetch that is used.
    """
    found = routed = predicted = 0
    for layer in predictor.layers:
        target = predictor.target_layer(layer, depth)
        if target is None:
            continue
        hidden = tensors[f"hidden.{layer}"].float()
        context = trace_context(tensors, layer) if predictor.context_inputs else None
        guess = predictor.predict_experts(
            layer, depth, hidden, tensors[f"topk_ids.{layer}"].long(), num_predicted, context
        )
        actual = tensors[f"topk_ids.{target}"].long()
        found += (guess.unsqueeze(-1) == actual.unsqueeze(-2)).any(-1).sum().item()
        routed += actual.numel()
        predicted += guess.numel()
    if not routed:
        return float("nan"), float("nan")
    return found / routed, found / predicted


class TransitionPredictor(ExpertPredictor):
    """Expert-id statistics: P(expert e' routed at L+d | expert e routed at L), from a trace.

    Each probability is Laplace-smoothed as a Bernoulli event, (co-routed + 1) / (routed + 2),
    so an expert never seen at L predicts 1/2 for everything rather than dividing by zero. A
    token's score for e' sums the probabilities over its k routed experts at L.
    """

    def __init__(
        self,
        layers: list[int],
        max_depth: int,
        counts: dict[tuple[int, int], torch.Tensor],
        totals: dict[int, torch.Tensor],
        origin: dict[str, str] | None = None,
    ) -> None:
        super().__init__(layers, max_depth)
        self.counts = counts
        self.totals = totals
        self.origin = dict(origin or {})
        self._probs = {
            (layer, depth): (c + 1.0) / (totals[layer].unsqueeze(1) + 2.0)
            for (layer, depth), c in counts.items()
        }

    @classmethod
    def fit(
        cls, manifest: dict, tensors: dict[str, torch.Tensor], max_depth: int
    ) -> TransitionPredictor:
        layers = trace_layers(manifest)
        num_experts = manifest["num_experts"]
        hot = {layer: routed_one_hot(tensors[f"topk_ids.{layer}"], num_experts) for layer in layers}
        counts = {}
        for i, layer in enumerate(layers):
            for depth in range(1, max_depth + 1):
                if i + depth < len(layers):
                    counts[(layer, depth)] = hot[layer].T @ hot[layers[i + depth]]
        totals = {layer: h.sum(0) for layer, h in hot.items()}
        return cls(layers, max_depth, counts, totals, _origin(manifest))

    def scores(
        self,
        layer: int,
        depth: int,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        context: Context | None = None,
    ) -> torch.Tensor:
        probs = self._probs[(layer, depth)]
        return routed_one_hot(topk_ids.to(probs.device), probs.shape[0]) @ probs

    def to(self, device: torch.device | str) -> TransitionPredictor:
        """Moves the probability tables (the counts stay on the CPU for saving)."""
        self._probs = {key: p.to(device) for key, p in self._probs.items()}
        return self


class _Head(torch.nn.Module):
    """Scores of one target layer's experts from one source layer's router input.

    The linear part starts as the target layer's gate and every extra part starts at zero, so
    an untrained head is exactly speculative gating and training only has to learn the drift.
    The MLP also reads `num_context` context tensors, each layer-normed like the router input.
    """

    def __init__(
        self,
        gate: torch.Tensor,
        num_source_experts: int,
        hidden_units: int = 0,
        routed_features: bool = False,
        num_context: int = 0,
    ) -> None:
        super().__init__()
        num_experts, hidden_size = gate.shape
        self.linear = torch.nn.Linear(hidden_size, num_experts)
        with torch.no_grad():
            self.linear.weight.copy_(gate.float())
            self.linear.bias.zero_()
        self.routed = None
        if routed_features:
            self.routed = torch.nn.Linear(num_source_experts, num_experts, bias=False)
            torch.nn.init.zeros_(self.routed.weight)
        self.mlp = None
        if hidden_units:
            extra = num_source_experts if routed_features else 0
            self.norm = torch.nn.LayerNorm(hidden_size)
            self.context_norms = torch.nn.ModuleList(
                torch.nn.LayerNorm(hidden_size) for _ in range(num_context)
            )
            self.mlp = torch.nn.Sequential(
                torch.nn.Linear(hidden_size * (1 + num_context) + extra, hidden_units),
                torch.nn.GELU(),
                torch.nn.Linear(hidden_units, num_experts),
            )
            torch.nn.init.zeros_(self.mlp[-1].weight)
            torch.nn.init.zeros_(self.mlp[-1].bias)

    def forward(
        self, hidden: torch.Tensor, context: list[torch.Tensor], routed: torch.Tensor
    ) -> torch.Tensor:
        out = self.linear(hidden)
        if self.routed is not None:
            out = out + self.routed(routed)
        if self.mlp is not None:
            features = [self.norm(hidden)]
            features += [norm(c) for norm, c in zip(self.context_norms, context, strict=True)]
            features += [routed] if self.routed is not None else []
            out = out + self.mlp(torch.cat(features, dim=-1))
        return out


class _FusedHeads:
    """One source layer's heads, every depth in one batched matmul, for inference.

    A head is `linear(h) + routed(r) + W1 gelu(W0 [norms(h, context); r] + b0) + b1`. Its
    LayerNorms' affine parts fold into W0, and the linear and routed parts ride in the same
    matmul as extra output columns, so the scores of all depths are: one LayerNorm over the
    stacked inputs, one batched matmul, a GELU and one more batched matmul (about ten tensor
    operations, against about twelve per head unfused: on the CPU their fixed cost is most of
    a predictor's time). Equal to the heads up to float rounding.
    """

    def __init__(self, heads: list[_Head]) -> None:
        first = heads[0]
        hidden_size, num_experts = first.linear.in_features, first.linear.out_features
        self.has_mlp, self.has_routed = first.mlp is not None, first.routed is not None
        self.eps = first.norm.eps if self.has_mlp else 0.0
        self.units = first.mlp[0].out_features if self.has_mlp else 0
        matrices, biases, downs = [], [], []
        with torch.no_grad():
            for head in heads:
                blocks_in, bias = [], head.linear.bias.clone()
                if self.has_mlp:
                    w0, b0 = head.mlp[0].weight.T, head.mlp[0].bias
                    norms = [head.norm, *head.context_norms]
                    normed = len(norms) * hidden_size
                    gamma = torch.cat([n.weight for n in norms])
                    beta = torch.cat([n.bias for n in norms])
                    # [normed inputs | hidden | routed] x [MLP units | expert scores]
                    z_cols = [w0[:normed] * gamma[:, None], w0.new_zeros(normed, num_experts)]
                    blocks_in.append(torch.cat(z_cols, 1))
                    bias = torch.cat([b0 + beta @ w0[:normed], bias + head.mlp[2].bias])
                    downs.append(head.mlp[2].weight.T)
                weight = head.linear.weight
                hidden_cols = [weight.new_zeros(hidden_size, self.units), weight.T]
                blocks_in.append(torch.cat(hidden_cols, 1))
                if self.has_routed:
                    routed_mlp = w0[normed:] if self.has_mlp else weight.new_zeros(num_experts, 0)
                    blocks_in.append(torch.cat([routed_mlp, head.routed.weight.T], 1))
                matrices.append(torch.cat(blocks_in, 0))
                biases.append(bias[None])
        self.matrix = torch.stack(matrices)  # [depths, inputs, units + experts]
        self.bias = torch.stack(biases)  # [depths, 1, units + experts]
        self.down = torch.stack(downs) if downs else None  # [depths, units, experts]

    def scores(
        self, hidden: torch.Tensor, context: list[torch.Tensor], routed: torch.Tensor
    ) -> torch.Tensor:
        """`[depths, T, E]` scores; inputs as the heads take them, float32."""
        inputs = [hidden]
        if self.has_mlp:
            stacked = torch.stack([hidden, *context], 1)
            normed = torch.nn.functional.layer_norm(stacked, stacked.shape[-1:], eps=self.eps)
            inputs.insert(0, normed.flatten(1))
        if self.has_routed:
            inputs.append(routed)
        joined = torch.cat(inputs, 1).expand(len(self.matrix), -1, -1)
        out = torch.baddbmm(self.bias, joined, self.matrix)
        if self.down is None:
            return out
        up, scores = out[..., : self.units], out[..., self.units :]
        return torch.baddbmm(scores, torch.nn.functional.gelu(up), self.down)


class LearnedPredictor(ExpertPredictor):
    """A small trained head per (layer, depth), initialised from the target layer's gate.

    `hidden_units` > 0 adds a one-hidden-layer residual MLP; `routed_features` adds layer L's
    routed-expert multi-hot as an input (layer L's MoE output, which depends on that choice,
    is part of what layer L+1's router sees); `context_inputs` (a subset of `CONTEXT_INPUTS`,
    needs the MLP) adds those tensors as inputs.
    """

    def __init__(
        self,
        gates: dict[int, torch.Tensor],
        max_depth: int = 1,
        hidden_units: int = 0,
        routed_features: bool = False,
        origin: dict[str, str] | None = None,
        context_inputs: Sequence[str] = (),
    ) -> None:
        super().__init__(sorted(gates), max_depth)
        unknown = set(context_inputs) - set(CONTEXT_INPUTS)
        assert not unknown, f"unknown context inputs {unknown}"
        assert hidden_units or not context_inputs, "context inputs feed the MLP"
        self.hidden_units = hidden_units
        self.routed_features = routed_features
        self.context_inputs = tuple(context_inputs)
        self.origin = dict(origin or {})
        self.num_experts = next(iter(gates.values())).shape[0]
        self.heads = torch.nn.ModuleDict()
        # (source layer, depths) -> those heads fused for inference, built on first use.
        self._fused: dict[tuple[int, tuple[int, ...]], _FusedHeads] = {}
        # MLP initialisation draws from the global RNG: fix it so a seed reproduces a file.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self._build_heads(gates)
        # Built while vLLM loads a model, the default dtype is the model's (bf16): the heads
        # compute in float32 whatever it is.
        self.heads.float().eval()

    def _build_heads(self, gates: dict[int, torch.Tensor]) -> None:
        for layer in self.layers:
            for depth in range(1, self.max_depth + 1):
                target = self.target_layer(layer, depth)
                if target is not None:
                    self.heads[_head_name(layer, depth)] = _Head(
                        gates[target],
                        self.num_experts,
                        self.hidden_units,
                        self.routed_features,
                        len(self.context_inputs),
                    )

    def scores(
        self,
        layer: int,
        depth: int,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        context: Context | None = None,
    ) -> torch.Tensor:
        return self._scores_of_depths(layer, [depth], hidden, topk_ids, context)[0]

    def ranked_depths(self, layer, depths, hidden, topk_ids, top_k, context=None):
        scores = self._scores_of_depths(layer, depths, hidden, topk_ids, context)
        return [rank_for_batch(depth_scores, top_k) for depth_scores in scores]

    def _scores_of_depths(
        self,
        layer: int,
        depths: list[int],
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        context: Context | None,
    ) -> torch.Tensor:
        """`[len(depths), T, E]`: the heads' scores, computed fused (`_FusedHeads`)."""
        key = (layer, tuple(depths))
        if key not in self._fused:
            self._fused[key] = _FusedHeads([self.heads[_head_name(layer, d)] for d in depths])
        fused = self._fused[key]
        device = fused.matrix.device
        inputs = [(context or {}).get(name) for name in self.context_inputs]
        if any(tensor is None for tensor in inputs):
            raise ValueError(f"expertflow: this learned predictor needs {self.context_inputs}")
        with torch.no_grad():
            routed = routed_one_hot(topk_ids.to(device), self.num_experts)
            inputs = [tensor.to(device, torch.float32) for tensor in inputs]
            return fused.scores(hidden.to(device, torch.float32), inputs, routed)

    def to(self, device: torch.device | str) -> LearnedPredictor:
        self.heads.to(device)
        self._fused.clear()
        return self

    def fit(
        self,
        tensors: dict[str, torch.Tensor],
        epochs: int = 20,
        lr: float = 3e-3,
        batch_size: int = 256,
        loss: str = "softmax",
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        """Trains every head on a trace, to the target layer's routed set."""
        from tqdm import tqdm

        names = list(self.heads)
        self._fused.clear()  # built from the weights training changes
        self.heads.train()
        # The heads are tiny: intra-op threads cost more in synchronisation than they save
        # (one thread measured ~100x faster per step than two on a busy two-core machine).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for name in tqdm(names, desc="train predictor heads", disable=not progress):
                self._fit_head(name, tensors, epochs, lr, batch_size, _LOSSES[loss], seed)
        finally:
            torch.set_num_threads(threads)
        self.heads.eval()

    def _fit_head(self, name, tensors, epochs, lr, batch_size, loss_fn, seed) -> None:
        layer, depth = _parse_head_name(name)
        target = self.target_layer(layer, depth)
        context = trace_context(tensors, layer) if self.context_inputs else {}
        inputs = (
            tensors[f"hidden.{layer}"].float(),
            [context[name] for name in self.context_inputs],
            routed_one_hot(tensors[f"topk_ids.{layer}"], self.num_experts),
            routed_one_hot(tensors[f"topk_ids.{target}"], self.num_experts),
        )
        # Each head has its own stream of batches, so one head's data size never shifts another's.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + layer * 1009 + depth)
        _train_head(self.heads[name], inputs, epochs, lr, batch_size, loss_fn, generator)


def _softmax_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Listwise: cross-entropy to the uniform distribution over the routed set.

    Invariant to a per-token shift of the logits, like the router's own softmax top-k.
    """
    target = target / target.sum(-1, keepdim=True)
    return -(target * logits.log_softmax(-1)).sum(-1).mean()


def _bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, target)


_LOSSES = {"softmax": _softmax_loss, "bce": _bce_loss}


def _train_head(
    head: _Head,
    inputs: tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor],
    epochs: int,
    lr: float,
    batch_size: int,
    loss_fn,
    generator: torch.Generator,
) -> None:
    hidden, context, routed, target = inputs
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    batches_per_epoch = max(1, -(-len(hidden) // batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * batches_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(hidden), generator=generator)
        for batch in order.split(batch_size):
            logits = head(hidden[batch], [c[batch] for c in context], routed[batch])
            loss = loss_fn(logits, target[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()


def _head_name(layer: int, depth: int) -> str:
    return f"{layer}_{depth}"


def _parse_head_name(name: str) -> tuple[int, int]:
    layer, depth = name.split("_")
    return int(layer), int(depth)


def _origin(manifest: dict) -> dict[str, str]:
    return {"model": str(manifest.get("model", "")), "config_hash": manifest["config_hash"]}


# Saving and loading: one safetensors file, its header metadata naming what it was made for.

PREDICTOR_FORMAT = "1"


class PredictorMismatchError(ValueError):
    """The predictor file was trained for another model."""


def save_predictor(predictor: ExpertPredictor, path: str) -> None:
    """Writes `predictor` to one safetensors file, atomically (a temporary name, then rename)."""

    from safetensors.torch import save_file

    from .files import atomic_path

    kind, state = _SAVERS[type(predictor)]
    tensors, extra = state(predictor)
    origin = getattr(predictor, "origin", {})
    metadata = {
        "format": PREDICTOR_FORMAT,
        "kind": kind,
        "model": origin.get("model", ""),
        "config_hash": origin.get("config_hash", ""),
        "layers": json.dumps(predictor.layers),
        "max_depth": str(predictor.max_depth),
        **{key: json.dumps(value) for key, value in extra.items()},
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def load_predictor(path: str, expected_config_hash: str | None) -> ExpertPredictor:
    """Reads a predictor file; refuses one made for another model config (None skips the check)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    found = metadata.get("config_hash", "")
    if expected_config_hash is not None and found != expected_config_hash:
        raise PredictorMismatchError(
            f"expertflow: predictor {path} was trained for model config hash {found or '?'} "
            f"but this model's config hash is {expected_config_hash}; re-run "
            f"`vllm-expertflow train-predictor` on traces of this model"
        )
    kind = metadata.get("kind")
    if kind not in _LOADERS:
        raise ValueError(f"expertflow: {path} is not a predictor file (kind={kind!r})")
    layers = json.loads(metadata["layers"])
    meta = {k: json.loads(v) for k, v in metadata.items() if k not in _PLAIN_METADATA}
    origin = {"model": metadata.get("model", ""), "config_hash": found}
    return _LOADERS[kind](tensors, layers, int(metadata["max_depth"]), meta, origin)


_PLAIN_METADATA = {"format", "kind", "model", "config_hash", "layers", "max_depth"}


def _transition_state(p: TransitionPredictor) -> tuple[dict, dict]:
    tensors = {f"counts.{layer}.{depth}": c for (layer, depth), c in p.counts.items()}
    tensors |= {f"totals.{layer}": t for layer, t in p.totals.items()}
    num_experts = next(iter(p.totals.values())).shape[0]
    return tensors, {"num_experts": num_experts}


def _load_transition(tensors, layers, max_depth, meta, origin) -> TransitionPredictor:
    counts, totals = {}, {}
    for key, value in tensors.items():
        kind, *index = key.split(".")
        if kind == "counts":
            counts[(int(index[0]), int(index[1]))] = value
        else:
            totals[int(index[0])] = value
    return TransitionPredictor(layers, max_depth, counts, totals, origin)


def _learned_state(p: LearnedPredictor) -> tuple[dict, dict]:
    tensors = {f"heads.{k}": v for k, v in p.heads.state_dict().items()}
    head = next(iter(p.heads.values()))
    extra = {
        "num_experts": p.num_experts,
        "hidden_size": head.linear.in_features,
        "hidden_units": p.hidden_units,
        "routed_features": p.routed_features,
        "context_inputs": list(p.context_inputs),
    }
    return tensors, extra


def _load_learned(tensors, layers, max_depth, meta, origin) -> LearnedPredictor:
    # Placeholder gates give the heads their shapes; the state dict then overwrites them.
    gates = {layer: torch.zeros(meta["num_experts"], meta["hidden_size"]) for layer in layers}
    predictor = LearnedPredictor(
        gates,
        max_depth,
        meta["hidden_units"],
        meta["routed_features"],
        origin,
        meta.get("context_inputs", ()),
    )
    predictor.heads.load_state_dict({k.removeprefix("heads."): v for k, v in tensors.items()})
    return predictor


_SAVERS = {
    TransitionPredictor: ("transition", _transition_state),
    LearnedPredictor: ("learned", _learned_state),
}
_LOADERS = {"transition": _load_transition, "learned": _load_learned}
