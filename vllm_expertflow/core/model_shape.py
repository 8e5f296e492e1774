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
