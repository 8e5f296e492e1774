"""Checks of the options against the model and this machine, before any engine starts.

Everything here can be known in the caller's process: files exist and parse and belong to the
model, the cache holds one token's experts, the store's folder is writable and has room. A
failure raises `ExpertFlowConfigError` with one line naming the problem and the fix.
"""

from __future__ import annotations

import json
import os
import shutil

from .checkpoint import is_expert_tensor, routing_config_hash, tensor_bytes
from .config import ExpertFlowConfig, ExpertFlowConfigError
from .model_shape import MoEShape
from .store_catalog import checkpoint_expert_digest, list_stores


def preflight(config: ExpertFlowConfig, model_dir: str, shape: MoEShape | None) -> None:
    """`model_dir` may be a hub id (not a folder): then only what needs no file is checked."""
    local = os.path.isdir(model_dir)
    if shape is not None:
        _check_cache(config, shape)
        if config.static_experts is not None:
            _check_static_experts(config.static_experts, shape)
    if config.predictor.endswith(".safetensors"):
        _check_predictor(config.predictor, routing_config_hash(model_dir) if local else None)
    if config.store == "disk":
        _check_store_dir(config.resolved_store_dir, model_dir if local else None)


def _check_cache(config: ExpertFlowConfig, shape: MoEShape) -> None:
    if config.cache_experts is not None and config.cache_experts < shape.top_k:
        raise ExpertFlowConfigError(
            f"expertflow: cache_experts={config.cache_experts} is smaller than the model's top-k "
            f"of {shape.top_k}; use cache_experts >= {shape.top_k}"
        )


def _check_static_experts(path: str, shape: MoEShape) -> None:
    try:
        with open(path) as f:
            pairs = json.load(f)
    except FileNotFoundError:
        raise ExpertFlowConfigError(
            f"expertflow: static_experts file {path} does not exist; `vllm-expertflow bench` "
            "writes one (a JSON list of [layer, expert] pairs, hottest first)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExpertFlowConfigError(
            f"expertflow: static_experts file {path} is not valid JSON ({e}); it must be a list "
            "of [layer, expert] pairs, hottest first"
        ) from None
    if not isinstance(pairs, list):
        raise ExpertFlowConfigError(
            f"expertflow: static_experts file {path} must hold a list of [layer, expert] pairs"
        )
    bad = [pair for pair in pairs if not _is_pair_of(pair, shape)]
    if bad:
        shown = ", ".join(json.dumps(pair) for pair in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ExpertFlowConfigError(
            f"expertflow: static_experts file {path} names {shown}{more}, not [layer, expert] "
            f"pairs of this model ({shape.num_layers} layers, {shape.num_experts} experts)"
        )


def _is_pair_of(pair: object, shape: MoEShape) -> bool:
    return (
        isinstance(pair, list)
        and len(pair) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
        and 0 <= pair[0] < shape.num_layers
        and 0 <= pair[1] < shape.num_experts
    )


def _check_predictor(path: str, model_config_hash: str | None) -> None:
    from .predictor import load_predictor

    if not os.path.isfile(path):
        raise ExpertFlowConfigError(
            f"expertflow: predictor file {path} does not exist; train one with "
            "`vllm-expertflow train-predictor` or use predictor=gate"
        )
    try:
        load_predictor(path, model_config_hash)
    except ValueError as e:  # another model's predictor, or not a predictor file
        raise ExpertFlowConfigError(str(e)) from None
    except Exception as e:  # safetensors' own error for a truncated or foreign file
        raise ExpertFlowConfigError(
            f"expertflow: predictor file {path} cannot be read ({e}); train it again with "
            "`vllm-expertflow train-predictor`"
        ) from None


def _check_store_dir(store_dir: str, model_dir: str | None) -> None:
    existing = store_dir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or (existing == store_dir and not os.path.isdir(store_dir)):
        raise ExpertFlowConfigError(
            f"expertflow: store_dir {store_dir} is not a directory; set store_dir to a folder"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExpertFlowConfigError(
            f"expertflow: store_dir {store_dir} is not writable; set store_dir to a folder "
            "this user can write"
        )
    if model_dir is None or _has_a_store_of(store_dir, model_dir):
        return
    needed = expert_bytes(model_dir)
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise ExpertFlowConfigError(
            f"expertflow: the disk store of {os.path.basename(model_dir)} needs about {needed} "
            f"bytes but {store_dir} has {free} bytes free; free space or set store_dir to a "
            "larger disk"
        )


def _has_a_store_of(store_dir: str, model_dir: str) -> bool:
    """A complete store of these experts (in any kernel layout) is there: it is reused."""
    experts = checkpoint_expert_digest(model_dir)
    return any(
        store.complete and (store.fingerprint or {}).get("experts") == experts
        for store in list_stores(store_dir)
    )


def expert_bytes(model_dir: str) -> int:
    """Bytes of the checkpoint's routed-expert tensors, read from the safetensors headers."""
    return sum(size for name, size in tensor_bytes(model_dir).items() if is_expert_tensor(name))
