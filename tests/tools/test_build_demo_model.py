"""Tests for `vllm-expertflow build-demo-model` (tiny runs) and the committed demo model."""

from __future__ import annotations

import json
import pydoc_data.topics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_expertflow.tools.build_demo_model import (
    BuildError,
    Corpus,
    TrainSettings,
    build_demo_model,
    folder_size,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMITTED_MODEL = REPO_ROOT / "examples" / "models" / "expertflow-demo-moe"
MAX_COMMITTED_BYTES = 48 * 1000 * 1000
TINY = TrainSettings(steps=3, seq_len=32, batch_size=2, seed=7)


@pytest.fixture(scope="module")
def tiny_corpus() -> Corpus:
    # Python's own docs ship with the interpreter, so the test needs no download.
    topics = pydoc_data.topics.topics
    return Corpus(
        train_docs=[topics[k] for k in ("if", "for", "while", "try", "with", "class")],
        heldout_shakespeare=topics["assert"],
        heldout_pydoc=topics["return"],
    )


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Corpus) -> list[Path]:
    root = tmp_path_factory.mktemp("demo")
    outs = [root / "a", root / "b"]
    for out in outs:
        build_demo_model(out, TINY, corpus=tiny_corpus)
    return outs


def _assert_required_shape(config: dict) -> None:
    assert config["model_type"] == "qwen3_moe"
    assert config["num_hidden_layers"] >= 6
    assert config.get("num_experts", config.get("num_local_experts")) >= 32
    assert config["num_experts_per_tok"] >= 4
    assert config["hidden_size"] % 32 == 0
    assert config["moe_intermediate_size"] % 32 == 0
    assert config["mlp_only_layers"] == []
    assert config["decoder_sparse_step"] == 1


def test_tiny_build_writes_loadable_model(tiny_models: list[Path]) -> None:
    out = tiny_models[0]
    config = json.loads((out / "config.json").read_text())
    _assert_required_shape(config)
    assert config["num_hidden_layers"] == 6
    assert config["dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is True

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_experts == 32
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|endoftext|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "user: hi\nassistant:"
    ids = tokenizer("if x:", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 3

    report = json.loads((out / "training_report.json").read_text())
    assert report["steps"] == TINY.steps and report["seed"] == TINY.seed
    assert set(report["heldout_perplexity"]) == {"shakespeare", "pydoc"}
    assert len(report["routing"]) == 6
    assert (out / "heldout_shakespeare.txt").read_text().strip()
    assert (out / "heldout_pydoc.txt").read_text().strip()


def test_same_seed_gives_identical_weights(tiny_models: list[Path]) -> None:
    first, second = (load_file(out / "model.safetensors") for out in tiny_models)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_refuses_to_overwrite_without_force(tiny_models: list[Path], tiny_corpus: Corpus) -> None:
    with pytest.raises(BuildError, match="already exists"):
        build_demo_model(tiny_models[0], TINY, corpus=tiny_corpus)


def test_rejects_empty_training() -> None:
    with pytest.raises(BuildError):
        TrainSettings(steps=0)


def test_committed_demo_model_shape_and_size() -> None:
    config = json.loads((COMMITTED_MODEL / "config.json").read_text())
    _assert_required_shape(config)
    assert folder_size(COMMITTED_MODEL) <= MAX_COMMITTED_BYTES
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (COMMITTED_MODEL / name).is_file()
