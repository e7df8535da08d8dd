"""The memory plan: parameters counted from config.json, bytes per trainer rank and engine, refusals that say
what does not fit and what to do."""

from __future__ import annotations

import json

import pytest

from agentbench_npu.config import resolve
from agentbench_npu.errors import ConfigError
from agentbench_npu.models.loading import load_causal_lm, resolve_model_dir
from agentbench_npu.plan import check, count_parameters, plan
from agentbench_npu.recipes import Layer, model_recipe, profile_layer
from tests.unit.test_megatron_convert import QWEN3_4B, QWEN3_30B_A3B, QWEN25_3B


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_the_count_is_the_real_models_parameter_count(name):
    path = resolve_model_dir(name)
    model = load_causal_lm(path)
    assert count_parameters(json.loads((path / "config.json").read_text())) == sum(p.numel() for p in model.parameters())


def test_the_published_sizes_of_the_recipe_models():
    # model cards: Qwen3-4B 4.0 B (3.6 B non-embedding), Qwen3-30B-A3B 30.5 B, Qwen2.5-3B 3.09 B
    assert count_parameters(QWEN3_4B) == 4_022_468_096
    assert round(count_parameters(QWEN3_30B_A3B) / 1e9, 1) == 30.5
    assert round(count_parameters(QWEN25_3B) / 1e9, 2) == 3.09


def config(*sections: dict) -> object:
    layers = [profile_layer("a2")] + [Layer(s, f"test {i}") for i, s in enumerate(sections)]
    return resolve("base", layers, {})


def test_a_trainer_rank_holds_16_bytes_a_parameter_split_by_tensor_parallel():
    torch_plan = plan(config({"run": {"trainer": "torch"}}), QWEN3_4B)
    assert torch_plan.trainer_gib == pytest.approx(4_022_468_096 * 16 / 2**30)
    split = plan(config({"run": {"trainer": "megatron"}, "megatron": {"tensor_parallel": 2},
                         "cluster": {"train_devices": 8}}), QWEN3_4B)
    assert split.trainer_gib == pytest.approx(torch_plan.trainer_gib / 2) and split.fits
    assert split.engine_gib == pytest.approx(4_022_468_096 * 2 / 2**30)  # the profile's bf16 engine
    assert split.usable_gib == pytest.approx(64 * 0.8)


def test_expert_parallelism_splits_the_experts_and_tensor_parallelism_everything():
    from agentbench_npu.plan import count_expert_parameters

    experts = count_expert_parameters(QWEN3_30B_A3B)
    assert experts == 48 * 128 * 3 * 2048 * 768 and count_expert_parameters(QWEN3_4B) == 0
    split = plan(config({"run": {"trainer": "megatron"}, "megatron": {"tensor_parallel": 4, "expert_parallel": 4},
                         "cluster": {"train_devices": 16}}), QWEN3_30B_A3B)
    dense = count_parameters(QWEN3_30B_A3B) - experts
    assert split.trainer_gib == pytest.approx((dense / 4 + experts / 16) * 16 / 2**30)
    assert "experts / TP x EP 16" in split.trainer_how


def test_the_engine_counts_beside_the_trainer_unless_it_releases_its_memory():
    beside = plan(config({"run": {"engine": "reference"}}), QWEN25_3B)
    released = plan(config({"run": {"engine": "sglang"}}), QWEN25_3B)
    assert beside.need_gib == pytest.approx(beside.trainer_gib + beside.engine_gib)
    assert released.need_gib == pytest.approx(released.trainer_gib)


def test_what_does_not_fit_is_refused_with_the_numbers_and_the_way_out():
    with pytest.raises(ConfigError, match=r"profile a2: a trainer rank needs 59\.9 GiB .* 64 GiB devices leave "
                                          r"51\.2 GiB .*--trainer megatron --set megatron.tensor_parallel=N"):
        check(config({"run": {"trainer": "torch", "engine": "sglang"}}), QWEN3_4B, "a2")
    engine = {"run": {"engine": "sglang"}, "engine": {"tp_size": 4}}
    with pytest.raises(ConfigError, match=r"raise megatron.tensor_parallel \(up to 4"):
        check(config(engine, {"run": {"trainer": "megatron"}, "megatron": {"tensor_parallel": 2},
                              "cluster": {"train_devices": 8}}), QWEN3_30B_A3B, "a2")
    with pytest.raises(ConfigError, match=r"raise megatron.expert_parallel \(it must divide the 2 data-parallel"):
        check(config(engine, {"run": {"trainer": "megatron"}, "megatron": {"tensor_parallel": 4},
                              "cluster": {"train_devices": 8}}), QWEN3_30B_A3B, "a2")
    with pytest.raises(ConfigError, match=r"cannot split it further \(its 4 key/value heads\), nor expert parallelism "
                                          r"with these trainer ranks.*add trainer ranks"):
        check(config(engine, {"run": {"trainer": "megatron"}, "megatron": {"tensor_parallel": 4, "expert_parallel": 2},
                              "cluster": {"train_devices": 8}}), QWEN3_30B_A3B, "a2")
    # without training only the engine must fit: 57 GiB of bf16 weights need splitting over devices
    with pytest.raises(ConfigError, match=r"an engine needs 56\.9 GiB .*on one device.*--set engine.tp_size=N"):
        check(config({"run": {"mode": "eval", "engine": "reference"}}), QWEN3_30B_A3B, "a2")
    # an eval run's trainer holds float32 weights only (no gradients, no Adam)
    evaluating = plan(config({"run": {"mode": "eval"}}), QWEN3_4B)
    assert evaluating.trainer_gib == pytest.approx(4_022_468_096 * 4 / 2**30)
    # colocated, an engine worker shares one device with a trainer rank: a launched server cannot split
    with pytest.raises(ConfigError, match=r"engine.tp_size is 2, and colocated the Ray executor gives each engine"):
        check(config({"run": {"engine": "sglang", "trainer": "megatron"}, "engine": {"tp_size": 2},
                      "megatron": {"tensor_parallel": 2}}), QWEN3_4B, "a2")
    assert check(config({"run": {"engine": "sglang", "trainer": "megatron"}, "engine": {"tp_size": 2},
                         "megatron": {"tensor_parallel": 2}, "cluster": {"mode": "disaggregated"}}), QWEN3_4B,
                 "a2").fits
    attached = config({"run": {"engine": "sglang", "trainer": "megatron"}, "engine": {"tp_size": 2},
                       "megatron": {"tensor_parallel": 2}},
                      {"engine": {"url": "http://127.0.0.1:1"}, "cluster": {"rollout_devices": 1}})
    assert check(attached, QWEN3_4B, "a2").fits


def test_model_recipes_are_found_by_config_json_and_only_for_the_models_they_name():
    assert model_recipe(QWEN3_4B)[0] == "qwen3-4b"
    assert model_recipe(QWEN3_30B_A3B)[0] == "qwen3-30b-a3b"
    assert model_recipe(QWEN25_3B)[0] == "qwen2.5-3b"
    assert model_recipe({**QWEN3_4B, "num_hidden_layers": 28}) is None  # another Qwen3 size
    assert model_recipe(json.loads((resolve_model_dir("tiny") / "config.json").read_text())) is None
