"""What the expertflow backend can serve: one check, run where vLLM's config is built.

`check(vllm_config)` raises what the backend cannot serve as one line naming the fix.
Everything the backend refuses is decided here, from the options, the device and the
checkpoint's HF config, before any engine process starts.
"""

from __future__ import annotations

from typing import Any

from vllm_expertflow.core.config import ExpertFlowConfig, ExpertFlowConfigError
from vllm_expertflow.core.model_shape import NUM_EXPERTS_KEYS, MoEShape
from vllm_expertflow.core.preflight import preflight

# Model families whose routed experts carry biases (vLLM's `has_bias`).
_EXPERT_BIAS_MODELS = ("gpt_oss",)


def check(vllm_config: Any) -> ExpertFlowConfig:
    """The backend's options for this config; raises ExpertFlowConfigError naming the fix."""
    config = ExpertFlowConfig.from_dict((vllm_config.additional_config or {}).get("expertflow"))
    model = vllm_config.model_config
    quantized = model is not None and model.quantization is not None
    biased = model is not None and has_expert_biases(model.hf_config)
    config.resolved_step(vllm_config.device_config.device_type, quantized, biased)
    if model is None:
        return config
    shape = MoEShape.of(model.hf_config)
    if shape is None:
        raise ExpertFlowConfigError(
            f"expertflow: {model.model} has no routed experts (its config sets none of "
            f"{', '.join(NUM_EXPERTS_KEYS)}), so there is nothing to offload; drop "
            "--moe-backend expertflow for this model"
        )
    if quantized and biased:
        raise ExpertFlowConfigError(
            f"expertflow: {model.model} has quantized experts with biases, which the int4 "
            "store does not carry; serve its bf16 checkpoint or use another --moe-backend"
        )
    if quantized:
        check_checkpoint(model.quantization, getattr(model.hf_config, "quantization_config", None))
    preflight(config, model.model, shape)
    return config


def has_expert_biases(hf_config: Any) -> bool:
    """Whether the model's routed experts have biases (stored and loaded with each expert)."""
    text = getattr(hf_config, "text_config", None) or hf_config
    return getattr(text, "model_type", "") in _EXPERT_BIAS_MODELS


def check_expert_scheme(weights: Any, activations: Any | None) -> None:
    """Refuses, in one line, quantized experts the int4 codec cannot expand."""
    if activations is not None or weights.num_bits != 4 or weights.strategy != "group":
        got = f"{weights.num_bits}-bit {weights.strategy}" + (
            " with quantized activations" if activations is not None else ""
        )
        raise ExpertFlowConfigError(
            f"expertflow: quantized experts must be int4 weights with group scales (W4A16), got "
            f"{got}; `vllm-expertflow quantize` writes such checkpoints"
        )


def check_checkpoint(quantization: str | None, quantization_config: dict | None) -> None:
    """Checks a checkpoint's quantization where the engine config is built: one clear line."""
    if quantization is None:
        return
    if quantization != "compressed-tensors":
        raise ExpertFlowConfigError(
            f"expertflow: {quantization} checkpoints are not supported; offloaded experts must be "
            "compressed-tensors W4A16 (`vllm-expertflow quantize` writes them)"
        )
    from compressed_tensors.quantization import QuantizationArgs

    for group in (quantization_config or {}).get("config_groups", {}).values():
        activations = group.get("input_activations")
        check_expert_scheme(
            QuantizationArgs(**group["weights"]),
            QuantizationArgs(**activations) if activations else None,
        )
