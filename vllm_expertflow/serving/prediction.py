"""Which experts a prompt will use, estimated before any engine sees it (speculative gating).

Each MoE layer's gate is applied to the RMS-normalised token embeddings of the prompt. The
residual stream starts as those embeddings and changes slowly, so this picks out the experts
the real router favours for the prompt's tokens well enough to route on, for the cost of one
embedding lookup and a `[T, H] x [H, E]` product per layer.
"""

from __future__ import annotations

import glob
import json
import os

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from ..core.checkpoint import load_gate_weights
from .routing import Demand

EMBED_KEY = "model.embed_tokens.weight"


def load_embeddings(model_dir: str) -> torch.Tensor:
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            if EMBED_KEY in f.keys():
                return f.get_tensor(EMBED_KEY).float()
    raise ValueError(f"expertflow: no {EMBED_KEY} in {model_dir}")


class PromptExpertPredictor:
    def __init__(self, model_dir: str, max_tokens: int = 512) -> None:
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
        self.top_k = config["num_experts_per_tok"]
        self.eps = config.get("rms_norm_eps", 1e-6)
        self.max_tokens = max_tokens
        self.tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        self.embeddings = load_embeddings(model_dir)
        self.gates = {layer: w.float() for layer, w in load_gate_weights(model_dir).items()}

    def predict(self, text: str) -> Demand:
        """Weight per `(layer, expert)`: the share of the prompt's top-k picks it gets."""
        ids = self.tokenizer.encode(text).ids[-self.max_tokens :]
        if not ids:
            return {}
        hidden = self.embeddings[torch.tensor(ids)]
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        picks_per_layer = len(ids) * self.top_k
        demand: Demand = {}
        for layer, gate in self.gates.items():
            picks = (hidden @ gate.T).topk(self.top_k, dim=-1).indices.flatten()
            counts = torch.bincount(picks, minlength=gate.shape[0]).tolist()
            scale = 1.0 / (picks_per_layer * len(self.gates))
            for expert, count in enumerate(counts):
                if count:
                    demand[(layer, expert)] = count * scale
        return demand


def prompt_text(body: dict) -> str:
    """The text of a completions or chat request that the model will read."""
    if "messages" in body:
        parts = []
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):  # multi-part content: keep the text parts
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(content if isinstance(content, str) else "")
        return "\n".join(parts)
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        return "\n".join(p for p in prompt if isinstance(p, str))
    return prompt if isinstance(prompt, str) else ""
