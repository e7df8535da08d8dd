"""The run config: defaults ← recipe ← profile ← `--set`, typed and checked; errors name the field path."""

from __future__ import annotations

import pytest

from agentbench_npu.config import (
    Layer,
    RunConfig,
    load_toml,
    packaged_recipe,
    parse_set,
    profile_layer,
    resolve,
)
from agentbench_npu.errors import ConfigError, UserError
from agentbench_npu.training.trainer import TrainConfig

TASK_DEFAULTS = {"max_operand": 9, "ops": "+-"}


def config(*layers: Layer) -> RunConfig:
    return resolve("base", list(layers), TASK_DEFAULTS)


def overrides(*items: str) -> RunConfig:
    return config(parse_set(list(items)))


def config_error(*layers: Layer) -> str:
    """The message of the ConfigError that resolving these layers raises (checked to be one line)."""
    with pytest.raises(ConfigError) as info:
        config(*layers)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- merging ---------------------------------------------------------------------------------------
def test_with_no_layers_every_section_has_its_defaults():
    cfg = config()
    assert cfg.scenario == "base" and cfg.profile == ""
    assert cfg.run.steps == 10 and cfg.run.device == "auto" and cfg.run.out == ""
    assert cfg.rollout.max_new_tokens == 32 and cfg.rollout.top_k == -1
    assert cfg.train["lr"] == TrainConfig().lr
    assert cfg.task == TASK_DEFAULTS


def test_a_later_layer_wins_over_an_earlier_one_key_by_key():
    first = Layer({"run": {"steps": 3, "seed": 7}, "rollout": {"temperature": 0.5}}, "first")
    second = Layer({"run": {"steps": 5}}, "second")
    cfg = config(first, second)
    assert cfg.run.steps == 5  # overridden
    assert cfg.run.seed == 7  # kept from the first layer
    assert cfg.rollout.temperature == 0.5


def test_set_overrides_a_recipe_file(tmp_path):
    recipe = load_toml(write(tmp_path, "r.toml", "[train]\nlr = 1e-3\n"))
    cfg = config(recipe, parse_set(["train.lr=2e-3"]))
    assert cfg.train["lr"] == 2e-3


def test_set_values_are_typed_by_the_field_they_set():
    cfg = overrides("train.lr=1e-4", "run.steps=3", "run.device=cpu", "task.max_operand=5", "task.ops=*")
    assert cfg.train["lr"] == 1e-4 and type(cfg.train["lr"]) is float
    assert cfg.run.steps == 3 and type(cfg.run.steps) is int
    assert cfg.run.device == "cpu"
    assert cfg.task == {"max_operand": 5, "ops": "*"}


def test_an_integer_in_a_toml_file_is_accepted_for_a_float_field(tmp_path):
    cfg = config(load_toml(write(tmp_path, "r.toml", "[rollout]\ntemperature = 1\n")))
    assert cfg.rollout.temperature == 1.0 and type(cfg.rollout.temperature) is float


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("True", True), ("1", True), ("yes", True),
    ("false", False), ("FALSE", False), ("0", False), ("no", False),
])
def test_set_parses_booleans_in_their_usual_spellings(text, expected):
    assert overrides(f"run.deterministic={text}").run.deterministic is expected


def test_a_word_that_is_not_a_boolean_is_rejected_for_a_boolean_field():
    message = config_error(parse_set(["run.deterministic=maybe"]))
    assert "run.deterministic must be true or false" in message and "'maybe'" in message


def test_top_level_profile_key_is_recorded():
    assert config(Layer({"profile": "tiny"}, "x")).profile == "tiny"


# -- unknown names ---------------------------------------------------------------------------------
def test_an_unknown_key_lists_the_valid_keys_of_its_section_and_suggests_a_close_one():
    message = config_error(parse_set(["train.lrr=1e-4"]))
    assert message.startswith("--set: unknown key 'train.lrr'")
    assert "did you mean: train.lr" in message
    assert "valid keys: " in message and "train.micro_batch_size" in message and "train.kl_coef" in message


def test_sampling_keys_are_not_train_keys_because_rollout_owns_them():
    message = config_error(parse_set(["train.temperature=0.5"]))
    assert "unknown key 'train.temperature'" in message


def test_an_unknown_section_lists_the_valid_sections():
    message = config_error(parse_set(["trian.lr=1"]))
    assert "unknown section 'trian'" in message and "did you mean: train" in message
    assert "valid sections: checkpoint, cluster, data, engine, gates, hardware, megatron, model, rollout, run, sandbox, task, train, warm_start" in message


def test_an_unknown_task_option_is_an_unknown_key():
    message = config_error(parse_set(["task.max_operands=3"]))
    assert "unknown key 'task.max_operands'" in message and "did you mean: task.max_operand" in message


def test_an_unknown_key_in_a_toml_file_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "recipe.toml", '# a recipe\nscenario = "base"\n\n[rollout]\ntemperature = 0.7\ntop_pp = 0.9\n')
    message = config_error(load_toml(path))
    assert message.startswith(f"{path}:6: unknown key 'rollout.top_pp'")
    assert "did you mean: rollout.top_p" in message


def test_a_line_number_is_found_for_a_key_whose_name_also_appears_in_another_section(tmp_path):
    # `steps` is a key of [run] (line 2) and of [warm_start] (line 4): the error points at the bad one.
    path = write(tmp_path, "recipe.toml", "[run]\nsteps = 3\n[warm_start]\nsteps = 'many'\n")
    message = config_error(load_toml(path))
    assert message.startswith(f"{path}:4: warm_start.steps must be an integer")


def test_a_dotted_key_in_a_toml_file_is_located_too(tmp_path):
    path = write(tmp_path, "recipe.toml", "run.steps = 2\ntrain.lrx = 1.0\n")
    message = config_error(load_toml(path))
    assert message.startswith(f"{path}:2: unknown key 'train.lrx'")


# -- types and values ------------------------------------------------------------------------------
def test_a_non_numeric_value_for_an_integer_field_names_the_field_path():
    message = config_error(parse_set(["rollout.max_new_tokens=lots"]))
    assert message == "--set: rollout.max_new_tokens must be an integer, got 'lots'"


def test_a_non_numeric_value_for_a_float_field_names_the_field_path():
    message = config_error(parse_set(["train.lr=fast"]))
    assert "train.lr must be a number, got 'fast'" in message


def test_a_wrongly_typed_toml_value_names_the_field_path_and_file_line(tmp_path):
    path = write(tmp_path, "recipe.toml", '[rollout]\nmax_new_tokens = "12"\n')
    message = config_error(load_toml(path))
    assert message == f"{path}:2: rollout.max_new_tokens must be an integer, got '12'"


def test_a_toml_boolean_is_not_an_integer(tmp_path):
    path = write(tmp_path, "recipe.toml", "[run]\nsteps = true\n")
    assert "run.steps must be an integer, got True" in config_error(load_toml(path))


def test_a_toml_float_is_not_an_integer(tmp_path):
    path = write(tmp_path, "recipe.toml", "[run]\nsteps = 2.5\n")
    assert "run.steps must be an integer, got 2.5" in config_error(load_toml(path))


@pytest.mark.parametrize("item, expected", [
    ("run.steps=0", "run.steps must be > 0, got 0"),
    ("rollout.samples_per_prompt=-1", "rollout.samples_per_prompt must be > 0, got -1"),
    ("rollout.top_p=1.5", "rollout.top_p must be in (0, 1], got 1.5"),
    ("rollout.top_p=0", "rollout.top_p must be in (0, 1], got 0.0"),
    ("rollout.top_k=0", "rollout.top_k must be -1 (off) or >= 1, got 0"),
    ("rollout.temperature=-0.1", "rollout.temperature must be >= 0, got -0.1"),
    ("train.lr=0", "train.lr must be > 0, got 0.0"),
    ("checkpoint.keep=-1", "checkpoint.keep must be >= 0, got -1"),
    ("model.dtype=float64", "model.dtype must be one of float32, bfloat16, float16; got 'float64'"),
])
def test_out_of_range_values_are_rejected_with_the_field_path_and_the_allowed_range(item, expected):
    assert config_error(parse_set([item])) == expected


@pytest.mark.parametrize("item", ["train.lr=nan", "rollout.temperature=nan", "train.kl_coef=nan"])
def test_nan_is_not_a_valid_value_for_a_checked_number(item):
    # `nan <= 0` is False, so a range check written as `if value <= 0: raise` lets NaN through.
    message = config_error(parse_set([item]))
    assert item.split("=")[0] in message


def test_an_empty_engine_dtype_means_the_same_as_dtype_and_is_not_checked():
    assert overrides("model.engine_dtype=").model.engine_dtype == ""
    assert "model.engine_dtype must be one of" in config_error(parse_set(["model.engine_dtype=fp8"]))


# -- --set syntax ----------------------------------------------------------------------------------
def test_set_without_an_equals_sign_says_how_to_write_it():
    with pytest.raises(ConfigError, match=r"^--set 'train\.lr': expected KEY=VALUE, e\.g\. --set train\.lr=1e-4$"):
        parse_set(["train.lr"])


@pytest.mark.parametrize("item", ["lr=1", "a.b.c=1", ".lr=1", "train.=1"])
def test_set_keys_must_be_section_dot_key(item):
    with pytest.raises(ConfigError, match="keys look like section.key"):
        parse_set([item])


def test_set_keeps_everything_after_the_first_equals_sign_as_the_value():
    assert overrides("run.out=a=b").run.out == "a=b"


# -- files and profiles ----------------------------------------------------------------------------
def test_invalid_toml_names_the_file(tmp_path):
    path = write(tmp_path, "broken.toml", "[run\nsteps = 1\n")
    with pytest.raises(ConfigError) as info:
        load_toml(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid TOML:") and "\n" not in message


def test_a_missing_recipe_file_is_a_config_error_naming_it(tmp_path):
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError, match=f"^{path}: cannot read recipe"):
        load_toml(path)


def test_the_tiny_profile_is_packaged_and_sets_the_tiny_model():
    cfg = config(profile_layer("tiny"))
    assert cfg.model.name == "tiny" and cfg.warm_start.steps > 0


def test_an_unknown_profile_lists_the_available_ones_and_suggests_a_close_one():
    with pytest.raises(ConfigError) as info:
        profile_layer("tinyy")
    message = str(info.value)
    assert message.startswith("unknown profile 'tinyy'") and "did you mean: tiny" in message
    assert "available: " in message and "tiny" in message.split("available: ")[1]


def test_a_packaged_recipe_that_does_not_exist_is_none():
    assert packaged_recipe("no-such-scenario.toml") is None


def test_the_packaged_base_recipe_resolves_and_its_errors_point_into_it():
    recipe = packaged_recipe("base.toml")
    assert recipe is not None and recipe.source == "scenarios/base.toml"
    # as the CLI does: the recipe's own [task] table defines the scenario's options
    cfg = resolve("base", [recipe], dict(recipe.values["task"]))
    assert cfg.rollout.max_new_tokens == 24
    assert recipe.where("train", "lr").startswith("scenarios/base.toml:")


# -- the resolved config ---------------------------------------------------------------------------
def test_digest_does_not_depend_on_where_output_goes():
    assert overrides("run.out=a").digest() == overrides("run.out=b").digest()


def test_digest_changes_with_anything_that_changes_results():
    base = config().digest()
    assert overrides("train.lr=1e-4").digest() != base
    assert overrides("run.seed=1").digest() != base
    assert overrides("task.ops=*").digest() != base


def test_digest_is_stable_for_equal_configs():
    assert overrides("train.lr=1e-4").digest() == overrides("train.lr=0.0001").digest()


def test_train_config_takes_its_sampling_definition_from_rollout():
    cfg = overrides("rollout.temperature=0.7", "rollout.top_p=0.9", "rollout.top_k=20", "train.lr=1e-4")
    train = cfg.train_config()
    assert isinstance(train, TrainConfig)
    assert (train.temperature, train.top_p, train.top_k) == (0.7, 0.9, 20)
    assert train.lr == 1e-4


def test_config_errors_are_user_errors():
    assert issubclass(ConfigError, UserError)
    assert ConfigError("x").exit_code == 2
