import pytest

from vllm_expertflow.core.config import ExpertFlowConfig, ExpertFlowConfigError


def test_defaults_are_valid():
    config = ExpertFlowConfig.from_dict(None)
    assert config.store == "ram" and config.policy == "lru"


@pytest.mark.parametrize(
    "options, named",
    [
        ({"cache_fractoin": 0.5}, "cache_fractoin"),
        ({"cache_fraction": 1.5}, "cache_fraction"),
        ({"cache_fraction": 0}, "cache_fraction"),
        ({"cache_experts": 0}, "cache_experts"),
        ({"cache_experts": 2.5}, "cache_experts"),
        ({"store": "s3"}, "store"),
        ({"policy": "fifo"}, "policy"),
        ({"cache_bytes": -1}, "cache_bytes"),
        ({"cache_bytes": "1G"}, "cache_bytes"),
        ({"cache_fraction": 0.5, "cache_experts": 8}, "not several"),
        ({"cache_bytes": 2**20, "cache_experts": 8}, "not several"),
        ({"step": "eager"}, "step"),
        ({"int4_slots": "int8"}, "int4_slots"),
        ({"step": "graph", "store": "disk"}, "store=ram"),
        ({"step": "graph", "predictor": "gate"}, "predictor=none"),
    ],
)
def test_bad_options_get_one_line_naming_the_problem(options, named):
    with pytest.raises(ExpertFlowConfigError) as error:
        ExpertFlowConfig.from_dict(options)
    message = str(error.value)
    assert named in message and "\n" not in message


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ExpertFlowConfigError, match="valid options are cache_fraction"):
        ExpertFlowConfig.from_dict({"bogus": 1})


def test_num_slots_from_fraction_count_and_bytes():
    assert ExpertFlowConfig(cache_fraction=0.25).num_slots(6, 32, 4, 1000) == 48
    assert ExpertFlowConfig(cache_fraction=1.0).num_slots(6, 32, 4, 1000) == 192
    assert ExpertFlowConfig(cache_experts=10).num_slots(6, 32, 4, 1000) == 10
    assert ExpertFlowConfig(cache_bytes=10_999).num_slots(6, 32, 4, 1000) == 10  # whole slots only
    assert ExpertFlowConfig(cache_bytes=10**9).num_slots(6, 32, 4, 1000) == 192
    # A fraction never rounds below one token's experts.
    assert ExpertFlowConfig(cache_fraction=0.001).num_slots(6, 32, 4, 1000) == 4


def test_cache_smaller_than_top_k_is_refused():
    with pytest.raises(ExpertFlowConfigError, match="smaller than the model's top-k of 4"):
        ExpertFlowConfig(cache_experts=3).num_slots(6, 32, 4, 1000)
    with pytest.raises(ExpertFlowConfigError, match="cache_bytes >= 4000"):
        ExpertFlowConfig(cache_bytes=3999).num_slots(6, 32, 4, 1000)


def test_cache_bytes_cover_the_decode_scratch_beside_the_slots():
    # A packed int4 pool: 250-byte slots, and a 2,000-byte scratch the same budget pays for.
    assert ExpertFlowConfig(cache_bytes=10_000).num_slots(6, 32, 4, 250, 2_000) == 32
    assert ExpertFlowConfig(cache_fraction=0.25).num_slots(6, 32, 4, 250, 2_000) == 48
    with pytest.raises(ExpertFlowConfigError, match="cache_bytes >= 3000"):
        ExpertFlowConfig(cache_bytes=2_999).num_slots(6, 32, 4, 250, 2_000)


def test_auto_step_takes_the_graph_step_only_where_it_can_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert ExpertFlowConfig().resolved_step("cuda", quantized=False) == "graph"
    assert ExpertFlowConfig().resolved_step("cpu", quantized=False) == "host"
    assert ExpertFlowConfig().resolved_step("cuda", quantized=True) == "host"
    assert ExpertFlowConfig().resolved_step("cuda", quantized=False, biased=True) == "host"
    assert ExpertFlowConfig(store="disk").resolved_step("cuda", quantized=False) == "host"
    assert ExpertFlowConfig(predictor="gate").resolved_step("cuda", quantized=False) == "host"


def test_graph_step_refuses_quantized_or_biased_experts_and_a_bare_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    graph = ExpertFlowConfig(step="graph")
    with pytest.raises(ExpertFlowConfigError, match="quantized experts need step=host"):
        graph.resolved_step("cuda", quantized=True)
    with pytest.raises(ExpertFlowConfigError, match="biased experts need step=host"):
        graph.resolved_step("cuda", quantized=False, biased=True)
    with pytest.raises(ExpertFlowConfigError, match="use step=host on a CPU"):
        graph.resolved_step("cpu", quantized=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert graph.resolved_step("cpu", quantized=False) == "graph"
