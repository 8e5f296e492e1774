"""golden/stock_tokens.json is used only for the inputs it was made for (no engine needed; the
stock engine itself is compared with it in test_plugin.py)."""

import json

import pytest
from make_golden import GOLDEN, REGENERATE, load_golden


def test_the_committed_golden_file_matches_this_checkout():
    golden = load_golden()
    assert len(golden["outputs"]["greedy"]["token_ids"]) == len(golden["greedy"]["prompts"])


@pytest.mark.parametrize(
    "path, value",
    [
        (("environment", "vllm"), "0.31.0"),
        (("model", "files_sha256", "model.safetensors"), "0" * 64),
        (("greedy", "prompts", 3), "another prompt"),
        (("greedy", "engine", "max_num_batched_tokens"), 128),
        (("prompt_logprobs", "sampling"), "SamplingParams(n=2)"),
    ],
)
def test_a_golden_file_made_for_other_inputs_is_refused_in_one_line(tmp_path, path, value):
    golden = json.loads(GOLDEN.read_text())
    node = golden
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    changed = tmp_path / GOLDEN.name
    changed.write_text(json.dumps(golden))
    with pytest.raises(ValueError) as error:
        load_golden(changed)
    message = str(error.value)
    assert "\n" not in message
    where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")
    assert f"({where} differs)" in message and REGENERATE in message


def test_a_missing_golden_file_says_how_to_make_it(tmp_path):
    with pytest.raises(ValueError, match="regenerate it with"):
        load_golden(tmp_path / "nope.json")
