import pytest
import torch

from vllm_expertflow.core.predictor import (
    CONTEXT_INPUTS,
    GatePredictor,
    LearnedPredictor,
    PredictorMismatchError,
    TransitionPredictor,
    load_predictor,
    predictor_recall,
    rank_for_batch,
    routed_one_hot,
    save_predictor,
    trace_context,
)
from vllm_expertflow.core.tracer import RoutingTracer, read_trace

E, K, H = 8, 2, 16


def write_trace(
    directory, hidden: dict, topk: dict, tokens_per_request: int = 50, outputs: dict | None = None
):
    """A trace through the real tracer: one request per `tokens_per_request` rows; the MoE
    outputs default to the router inputs."""
    metadata = {
        "model": "synthetic",
        "config_hash": "hash-a",
        "layers": sorted(hidden),
        "num_experts": E,
        "top_k": K,
        "hidden_size": H,
    }
    num_tokens = next(iter(hidden.values())).shape[0]
    tracer = RoutingTracer(str(directory), metadata, max_tokens=num_tokens)
    for start in range(0, num_tokens, tokens_per_request):
        rows = slice(start, start + tokens_per_request)
        for layer in sorted(hidden):
            h = hidden[layer][rows]
            tracer.record(
                layer, h, topk[layer][rows], outputs.get(layer, h)[rows] if outputs else h
            )
    tracer.close()
    return read_trace(str(directory))


def shifted_routing(num_tokens: int, seed: int = 0):
    """Layer 1 routes to (layer 0's experts + 1) mod E: a deterministic transition."""
    g = torch.Generator().manual_seed(seed)
    first = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(num_tokens)])
    topk = {0: first, 1: (first + 1) % E}
    hidden = {layer: torch.randn(num_tokens, H, generator=g) for layer in topk}
    return hidden, topk


def linear_routing(num_tokens: int, seed: int = 0):
    """Every layer routes by a linear map of one shared hidden state; gates are perturbed."""
    g = torch.Generator().manual_seed(seed)
    true_maps = {layer: torch.randn(E, H, generator=g) for layer in (0, 1, 2)}
    hidden_state = torch.randn(num_tokens, H, generator=g)
    hidden = {layer: hidden_state for layer in true_maps}
    topk = {layer: (hidden_state @ w.T).topk(K).indices for layer, w in true_maps.items()}
    # The gates the predictor starts from only loosely match how routing really happens.
    gates = {layer: w + 1.5 * torch.randn(E, H, generator=g) for layer, w in true_maps.items()}
    return hidden, topk, gates


def test_transition_predictor_recovers_a_planted_transition(tmp_path):
    manifest, tensors = write_trace(tmp_path, *shifted_routing(400))
    predictor = TransitionPredictor.fit(manifest, tensors, max_depth=1)
    assert predictor_recall(predictor, tensors, depth=1, num_predicted=K) == (1.0, 1.0)
    assert predictor.target_layer(1, 1) is None


def test_untrained_learned_predictor_is_the_gate_predictor():
    _, _, gates = linear_routing(1)
    hidden = torch.randn(5, H)
    topk = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [0, 7]])
    gate = GatePredictor(gates, max_depth=2)
    for hidden_units, routed in ((0, False), (8, True)):
        learned = LearnedPredictor(gates, 2, hidden_units=hidden_units, routed_features=routed)
        for layer, depth in ((0, 1), (0, 2), (1, 1)):
            expected = gate.scores(layer, depth, hidden, topk)
            assert torch.allclose(learned.scores(layer, depth, hidden, topk), expected)


def test_training_improves_recall_on_a_planted_linear_pattern(tmp_path):
    hidden, topk, gates = linear_routing(3000)
    _, train = write_trace(tmp_path / "train", hidden, topk)
    held = {f"hidden.{layer}": h[-500:] for layer, h in hidden.items()}
    held |= {f"topk_ids.{layer}": t[-500:] for layer, t in topk.items()}
    train = {key: value[:-500] for key, value in train.items()}
    predictor = LearnedPredictor(gates, max_depth=1)
    before = predictor_recall(predictor, held, 1, K)[0]
    predictor.fit(train, epochs=40, lr=3e-2, progress=False)
    after = predictor_recall(predictor, held, 1, K)[0]
    assert after > max(before + 0.1, 0.85), (before, after)


def test_training_is_deterministic(tmp_path):
    hidden, topk, gates = linear_routing(400)
    _, tensors = write_trace(tmp_path, hidden, topk)
    weights = []
    for _ in range(2):
        predictor = LearnedPredictor(gates, 1, hidden_units=4, routed_features=True)
        predictor.fit(tensors, epochs=1, seed=3, progress=False)
        weights.append(predictor.heads.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_save_load_round_trip_for_both_kinds(tmp_path):
    hidden, topk, gates = linear_routing(300)
    manifest, tensors = write_trace(tmp_path / "trace", hidden, topk)
    learned = LearnedPredictor(
        gates, 2, hidden_units=4, routed_features=True, origin={"config_hash": "hash-a"}
    )
    learned.fit(tensors, epochs=1, progress=False)
    with_context = LearnedPredictor(
        gates, 2, 4, True, {"config_hash": "hash-a"}, context_inputs=CONTEXT_INPUTS
    )
    with_context.fit(tensors, epochs=1, progress=False)
    transition = TransitionPredictor.fit(manifest, tensors, max_depth=2)
    probe_hidden, probe_topk = tensors["hidden.0"][:7].float(), tensors["topk_ids.0"][:7]
    context = {name: c[:7] for name, c in trace_context(tensors, 0).items()}
    for predictor in (learned, with_context, transition):
        path = str(tmp_path / f"{type(predictor).__name__}.safetensors")
        save_predictor(predictor, path)
        loaded = load_predictor(path, "hash-a")
        assert type(loaded) is type(predictor)
        assert loaded.layers == predictor.layers and loaded.max_depth == 2
        assert loaded.context_inputs == predictor.context_inputs
        for depth in (1, 2):
            expected = predictor.scores(0, depth, probe_hidden, probe_topk, context)
            assert torch.allclose(
                loaded.scores(0, depth, probe_hidden, probe_topk, context), expected
            )


def test_load_refuses_a_predictor_of_another_model(tmp_path):
    manifest, tensors = write_trace(tmp_path / "trace", *shifted_routing(100))
    path = str(tmp_path / "p.safetensors")
    save_predictor(TransitionPredictor.fit(manifest, tensors, 1), path)
    with pytest.raises(PredictorMismatchError) as error:
        load_predictor(path, "hash-b")
    message = str(error.value)
    assert "\n" not in message
    assert "hash-a" in message and "hash-b" in message and "train-predictor" in message


def test_trace_context_takes_the_previous_token_only_from_the_same_request():
    tensors = {
        "request_ids": torch.tensor([0, 0, 0, 1, 1, 1]),
        "positions": torch.tensor([0, 1, 3, 0, 1, 2]),  # request 0 skips position 2 (sampled)
        "hidden.0": torch.arange(6.0).unsqueeze(1),
        "moe_output.0": -torch.arange(6.0).unsqueeze(1),
    }
    context = trace_context(tensors, 0)
    assert context["prev_hidden"].flatten().tolist() == [0, 0, 0, 0, 3, 4]
    assert context["prev_moe_output"].flatten().tolist() == [0, 0, 0, 0, -3, -4]
    assert torch.equal(context["moe_output"], tensors["moe_output.0"])
    with pytest.raises(ValueError, match="record it again"):
        trace_context({k: v for k, v in tensors.items() if k != "moe_output.0"}, 0)


def test_context_lets_the_learned_predictor_see_the_previous_token(tmp_path):
    """Layer 1 routes by the previous token's layer-0 output, which layer 0 alone cannot show."""
    g = torch.Generator().manual_seed(0)
    num_tokens = 3000
    hidden = {layer: torch.randn(num_tokens, H, generator=g) for layer in (0, 1)}
    outputs = {0: torch.randn(num_tokens, H, generator=g)}
    true_map = torch.randn(E, H, generator=g)
    previous = torch.cat([torch.zeros(1, H), outputs[0][:-1]])
    topk = {0: (hidden[0] @ true_map.T).topk(K).indices, 1: (previous @ true_map.T).topk(K).indices}
    _, tensors = write_trace(tmp_path, hidden, topk, tokens_per_request=num_tokens, outputs=outputs)
    train = {key: value[:2500] for key, value in tensors.items()}
    held = {key: value[2500:] for key, value in tensors.items()}
    gates = {layer: torch.randn(E, H, generator=g) for layer in (0, 1)}
    recalls = {}
    for context_inputs in ((), CONTEXT_INPUTS):
        predictor = LearnedPredictor(gates, 1, 64, True, context_inputs=context_inputs)
        predictor.fit(train, epochs=20, lr=1e-2, progress=False)
        recalls[context_inputs] = predictor_recall(predictor, held, 1, K)[0]
    assert recalls[CONTEXT_INPUTS] > max(0.7, recalls[()] + 0.3), recalls


def test_learned_heads_compute_in_float32_under_a_bf16_default_dtype():
    """vLLM builds the pool, and so the predictor, while its default dtype is the model's."""
    _, _, gates = linear_routing(1)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        predictor = LearnedPredictor(gates, 1, hidden_units=8, context_inputs=CONTEXT_INPUTS)
    finally:
        torch.set_default_dtype(previous)
    hidden = torch.randn(3, H, dtype=torch.bfloat16)
    context = dict.fromkeys(CONTEXT_INPUTS, hidden)
    scores = predictor.scores(0, 1, hidden, torch.zeros(3, K, dtype=torch.long), context)
    assert scores.dtype == torch.float32 and scores.shape == (3, E)


def test_rank_for_batch_orders_by_votes():
    scores = torch.tensor([[5.0, 4.0, 0.0, 0.0], [5.0, 0.0, 4.0, 0.0], [5.0, 4.0, 0.0, 0.0]])
    ranked = rank_for_batch(scores, top_k=2)
    assert [e for e, _ in ranked] == [0, 1, 2]
    assert ranked[0][1] == 1.0


def test_one_tokens_ranking_is_the_batch_rule_applied_to_it():
    scores = torch.randn(1, E, generator=torch.Generator().manual_seed(0))
    # Two copies of the token take the general rule (votes, then mean probability).
    assert rank_for_batch(scores, top_k=K) == rank_for_batch(scores.repeat(2, 1), top_k=K)


@pytest.mark.parametrize(
    "hidden_units, routed, context",
    [(0, False, ()), (0, True, ()), (12, False, ()), (12, True, CONTEXT_INPUTS)],
)
def test_fused_heads_score_every_depth_as_the_heads_do(tmp_path, hidden_units, routed, context):
    g = torch.Generator().manual_seed(1)
    gates = {layer: torch.randn(E, H, generator=g) for layer in (0, 1, 2)}
    predictor = LearnedPredictor(gates, 2, hidden_units, routed, context_inputs=context)
    with torch.no_grad():  # trained-like weights everywhere (an untrained MLP outputs zeros)
        for parameter in predictor.heads.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=g))
    hidden = torch.randn(5, H, generator=g)
    topk = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(5)])
    inputs = {name: torch.randn(5, H, generator=g) for name in context}
    routed_hot = routed_one_hot(topk, E)
    heads = {d: predictor.heads[f"0_{d}"] for d in (1, 2)}
    expected = {d: head(hidden, list(inputs.values()), routed_hot) for d, head in heads.items()}
    fused = predictor.ranked_depths(0, [1, 2], hidden, topk, K, inputs)
    for depth in (1, 2):
        scores = predictor.scores(0, depth, hidden, topk, inputs)
        torch.testing.assert_close(scores, expected[depth].detach(), rtol=1e-4, atol=1e-4)
        assert fused[depth - 1] == rank_for_batch(scores, K)
    # Training changes the weights: what was fused before is not used after.
    trace_hidden = {layer: torch.randn(40, H, generator=g) for layer in (0, 1, 2)}
    trace_topk = {
        layer: torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(40)])
        for layer in (0, 1, 2)
    }
    _, trace = write_trace(tmp_path, trace_hidden, trace_topk, tokens_per_request=10)
    predictor.fit(trace, epochs=1, lr=0.5, progress=False)
    trained = heads[1](hidden, list(inputs.values()), routed_hot).detach()
    assert not torch.allclose(trained, expected[1].detach(), atol=1e-2)
    scores = predictor.scores(0, 1, hidden, topk, inputs)
    torch.testing.assert_close(scores, trained, rtol=1e-4, atol=1e-4)
