"""A MoE model's shape as its Hugging Face config states it, across the families' key names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "experts_per_token", "moe_topk", "moe_k")


@dataclass(frozen=True)
class MoEShape:
    num_layers: int
    num_experts: int
    top_k: int

    @classmethod
    def of(cls, hf_config: Any) -> MoEShape | None:
        """The shape of a config object or dict (its `text_config` when it has one); None when
        it names no routed experts."""
        read = hf_config.get if isinstance(hf_config, dict) else _attribute_reader(hf_config)
        text = read("text_config", None)
        if text is not None:
            return cls.of(text)
        num_experts = _first(read, NUM_EXPERTS_KEYS)
        top_k = _first(read, _TOP_K_KEYS)
        layers = read("num_hidden_layers", None)
        if not (num_experts and top_k and layers):
            return None
        return cls(int(layers), int(num_experts), int(top_k))


def _attribute_reader(obj: Any):
    return lambda key, default: getattr(obj, key, default)


def _first(read, keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = read(key, None)
        if value:
            return value
    return None


# Bytes per weight of the routed experts: bf16, or int4 with a bf16 scale per group of 128.
EXPERT_DTYPE_BYTES = {"bf16": 2.0, "int4": 0.5 + 2 / 128}


@dataclass(frozen=True)
class ModelFootprint:
    """Bytes and FLOPs of a MoE model, from its Hugging Face config alone (no weights).

    Counts the matmul weights: attention (MLA's latent projections included), dense and shared
    MLPs, routed experts (gate, up, down), embeddings and the head; norms and biases are left
    out (well under 1%). Everything but the routed experts is bf16.
    """

    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    expert_bytes: int  # one routed expert
    moe_layer_resident_bytes: int  # per MoE layer: attention and shared experts
    moe_layer_flops_per_token: float  # per MoE layer: 2 x (resident + top-k experts' weights)
    rest_bytes: int  # dense layers, embeddings read per token (one row) and the head
    rest_flops_per_token: float
    weight_bytes_besides_experts: int  # everything that stays resident, embeddings whole

    @property
    def all_experts_bytes(self) -> int:
        return self.expert_bytes * self.num_experts * len(self.moe_layers)

    @classmethod
    def of(cls, hf_config: dict, expert_dtype: str = "bf16") -> ModelFootprint:
        config = hf_config.get("text_config") or hf_config
        shape = MoEShape.of(config)
        if shape is None:
            raise ValueError("the config names no routed experts (num_experts and top-k)")
        hidden = config["hidden_size"]
        layers = config["num_hidden_layers"]
        moe_layers = tuple(i for i in range(layers) if _is_moe_layer(config, i))
        expert_width = config.get("moe_intermediate_size") or config["intermediate_size"]
        dense_width = config.get("intermediate_size_mlp") or config.get("intermediate_size", 0)
        shared_width = _shared_expert_width(config, expert_width)
        attention = _attention_weights(config)
        expert_weights = 3 * hidden * expert_width
        resident = attention + 3 * hidden * shared_width
        dense_layer = attention + 3 * hidden * dense_width
        vocab = config["vocab_size"] * hidden
        head = 0 if config.get("tie_word_embeddings") else vocab
        dense_layers = layers - len(moe_layers)
        return cls(
            moe_layers=moe_layers,
            num_experts=shape.num_experts,
            top_k=shape.top_k,
            expert_bytes=int(expert_weights * EXPERT_DTYPE_BYTES[expert_dtype]),
            moe_layer_resident_bytes=2 * resident,
            moe_layer_flops_per_token=2.0 * (resident + shape.top_k * expert_weights),
            rest_bytes=2 * (dense_layers * dense_layer + hidden + config["vocab_size"] * hidden),
            rest_flops_per_token=2.0 * (dense_layers * dense_layer + config["vocab_size"] * hidden),
            weight_bytes_besides_experts=2
            * (len(moe_layers) * resident + dense_layers * dense_layer + vocab + head),
        )


def _is_moe_layer(config: dict, layer: int) -> bool:
    """Which layers route, in each family's own terms (every layer unless a key says not)."""
    if "moe_layers" in config and config["moe_layers"] is not None:  # Llama-4's explicit list
        return layer in config["moe_layers"]
    if layer in (config.get("mlp_only_layers") or []):  # Qwen
        return False
    if layer < (config.get("first_k_dense_replace") or 0):  # DeepSeek, GLM
        return False
    step = config.get("decoder_sparse_step") or config.get("interleave_moe_layer_step") or 1
    if (layer + 1) % step:  # Qwen's sparse step, Llama-4's interleaving: every step-th layer
        return False
    return layer % (config.get("moe_layer_freq") or 1) == 0  # DeepSeek


def _shared_expert_width(config: dict, expert_width: int) -> int:
    if config.get("shared_expert_intermediate_size"):  # Qwen2-MoE
        return config["shared_expert_intermediate_size"]
    if config.get("n_shared_experts"):  # DeepSeek, GLM
        return config["n_shared_experts"] * expert_width
    if config.get("model_type") in ("llama4_text", "llama4"):  # one shared expert
        return expert_width
    return 0


def _attention_weights(config: dict) -> int:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("kv_lora_rank"):  # DeepSeek's multi-head latent attention
        qk = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
        q_rank = config.get("q_lora_rank")
        q = hidden * q_rank + q_rank * heads * qk if q_rank else hidden * heads * qk
        kv_rank = config["kv_lora_rank"]
        kv = hidden * (kv_rank + config["qk_rope_head_dim"])
        kv += kv_rank * heads * (config["qk_nope_head_dim"] + config["v_head_dim"])
        return q + kv + heads * config["v_head_dim"] * hidden
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
