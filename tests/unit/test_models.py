"""The tiny model and its tokenizer: built offline, deterministic, cached as an ordinary HF checkpoint dir;
model paths that cannot be used are refused with a one-line error saying what to do."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from agentbench_npu.errors import UserError
from agentbench_npu.models import resolve_model_dir
from agentbench_npu.models.tiny import TINY_MODELS, tiny_model_dir
from agentbench_npu.models.tokenizer import SPECIAL_TOKENS, TAG_TOKENS, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def single_id(tok, text: str) -> int:
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 1, f"{text!r} encodes to {ids}"
    return ids[0]


# -- tokenizer -------------------------------------------------------------------------------------
def test_building_the_tokenizer_twice_gives_the_same_vocabulary():
    assert build_tokenizer().get_vocab() == build_tokenizer().get_vocab()


def test_a_different_seed_gives_a_different_vocabulary():
    assert build_tokenizer(seed=0).get_vocab() != build_tokenizer(seed=1).get_vocab()


def test_the_vocabulary_has_exactly_the_requested_size(tokenizer):
    assert len(tokenizer) == 512


def test_qwen_special_tokens_are_present_with_eos_im_end_and_pad_endoftext(tokenizer):
    for token in SPECIAL_TOKENS:
        single_id(tokenizer, token)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == single_id(tokenizer, "<|im_end|>")
    assert tokenizer.pad_token_id == single_id(tokenizer, "<|endoftext|>")


@pytest.mark.parametrize("tag", TAG_TOKENS)
def test_each_tag_token_encodes_to_one_id(tokenizer, tag):
    single_id(tokenizer, tag)


def test_tags_survive_decoding_without_special_tokens_while_chat_markers_are_dropped(tokenizer):
    text = '<|im_start|>assistant\n<think>x</think><tool_call>\n{"name": "f"}\n</tool_call><|im_end|>'
    decoded = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False), skip_special_tokens=True)
    assert decoded == 'assistant\n<think>x</think><tool_call>\n{"name": "f"}\n</tool_call>'


def test_ordinary_text_round_trips_through_encode_and_decode(tokenizer):
    text = "What is 12 * 34? Put it in \\boxed{408}.\n  Ünïcödé, tabs\tand émojis 🙂 too."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_encoding_adds_no_bos_token(tokenizer):
    assert tokenizer.encode("hi") == tokenizer.encode("hi", add_special_tokens=False)


# -- chat template ---------------------------------------------------------------------------------
def render(tok, messages, **kwargs) -> str:
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


def test_system_user_and_assistant_turns_render_in_the_qwen_format(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    assert render(tokenizer, messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )


def test_the_generation_prompt_opens_an_assistant_turn(tokenizer):
    rendered = render(tokenizer, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_assistant_tool_calls_render_as_tool_call_blocks_after_the_content(tokenizer):
    messages = [{"role": "assistant", "content": "Let me run it.", "tool_calls": [
        {"type": "function", "function": {"name": "python", "arguments": {"code": "print(1)"}}},
        {"type": "function", "function": {"name": "search", "arguments": '{"q": "x"}'}},
    ]}]
    assert render(tokenizer, messages) == (
        "<|im_start|>assistant\nLet me run it.\n"
        '<tool_call>\n{"name": "python", "arguments": {"code": "print(1)"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n</tool_call>'
        "<|im_end|>\n"
    )


def test_a_tool_call_without_content_starts_right_after_the_role_line(tokenizer):
    messages = [{"role": "assistant", "content": None,
                 "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]
    assert render(tokenizer, messages) == (
        '<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|im_end|>\n'
    )


def test_consecutive_tool_results_share_one_user_turn_of_tool_responses(tokenizer):
    messages = [{"role": "user", "content": "go"}, {"role": "tool", "content": "R1"},
                {"role": "tool", "content": "R2"}, {"role": "assistant", "content": "done"}]
    assert render(tokenizer, messages) == (
        "<|im_start|>user\ngo<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nR1\n</tool_response>\n<tool_response>\nR2\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\ndone<|im_end|>\n"
    )


def test_tools_are_listed_in_the_system_turn_after_the_system_message(tokenizer):
    tool = {"type": "function", "function": {"name": "python", "parameters": {"type": "object"}}}
    rendered = render(tokenizer, [{"role": "system", "content": "Sys."}, {"role": "user", "content": "u"}],
                      tools=[tool])
    system, rest = rendered.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\nSys.\n\n# Tools")
    listed = system.split("<tools>\n", 1)[1].rsplit("\n</tools>", 1)[0]
    assert [json.loads(line) for line in listed.splitlines()] == [tool]
    assert rest == "<|im_start|>user\nu<|im_end|>\n"  # the system message is not repeated


def test_a_rendered_chat_encodes_each_marker_as_one_token(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer.encode(ids, add_special_tokens=False)
    im_start, im_end = single_id(tokenizer, "<|im_start|>"), single_id(tokenizer, "<|im_end|>")
    assert ids.count(im_start) == 2 and ids.count(im_end) == 2


# -- the tiny model cache --------------------------------------------------------------------------
@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    def use(name: str):
        path = tmp_path / name
        monkeypatch.setenv("AGENTBENCH_NPU_CACHE", str(path))
        return path

    return use


def test_a_tiny_model_dir_is_an_ordinary_hf_checkpoint_in_the_cache(fresh_cache):
    cache = fresh_cache("cache")
    path = tiny_model_dir("tiny")
    assert path.parent == cache / "models"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [TINY_MODELS["tiny"]["architecture"]]
    assert config["vocab_size"] == TINY_MODELS["tiny"]["vocab_size"]
    assert resolve_model_dir(str(path)) == path  # usable as `--model DIR`
    assert not [p for p in cache.joinpath("models").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_a_tiny_model_is_built_once_and_then_reused_from_the_cache(fresh_cache):
    fresh_cache("cache")
    first = tiny_model_dir("tiny")
    weights = first / "model.safetensors"
    stamp = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    second = tiny_model_dir("tiny")
    assert second == first
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == stamp
    assert resolve_model_dir("tiny") == first


def test_two_builds_in_different_caches_give_bit_identical_weights(fresh_cache):
    fresh_cache("a")
    a = tiny_model_dir("tiny")
    fresh_cache("b")
    b = tiny_model_dir("tiny")
    assert a != b
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype
        assert torch.equal(ta[name].view(torch.uint8), tb[name].view(torch.uint8)), name
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_a_different_seed_is_a_different_model_in_a_different_dir(fresh_cache):
    fresh_cache("cache")
    s0, s1 = tiny_model_dir("tiny", seed=0), tiny_model_dir("tiny", seed=1)
    assert s0 != s1
    w0, w1 = load_file(s0 / "model.safetensors"), load_file(s1 / "model.safetensors")
    assert not torch.equal(w0["model.embed_tokens.weight"], w1["model.embed_tokens.weight"])


def test_building_a_tiny_model_leaves_the_global_torch_rng_alone(fresh_cache):
    fresh_cache("cache")
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    tiny_model_dir("tiny")
    assert torch.equal(torch.rand(4), expected)


# -- model paths that cannot be used ---------------------------------------------------------------
def user_error(path) -> str:
    with pytest.raises(UserError) as info:
        resolve_model_dir(str(path))
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_a_missing_model_path_says_it_is_neither_a_tiny_model_nor_a_directory(tmp_path):
    message = user_error(tmp_path / "Qwen3-4B")
    assert message.startswith(f"model '{tmp_path / 'Qwen3-4B'}' is neither a tiny model (tiny, tiny-moe) nor an existing directory")
    assert "pass a local HF checkpoint dir" in message


def test_a_directory_without_config_json_says_to_pass_a_checkpoint_directory(tmp_path):
    message = user_error(tmp_path)
    assert message == f"model dir '{tmp_path}' has no config.json; pass a HF checkpoint directory"


def test_a_directory_without_tokenizer_files_says_to_copy_them_from_the_base_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    message = user_error(tmp_path)
    assert message.startswith(f"model dir '{tmp_path}' has no tokenizer (tokenizer.json, ")
    assert message.endswith("copy the tokenizer files of the base model into it")


def test_a_directory_with_config_and_a_tokenizer_is_accepted(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert resolve_model_dir(str(tmp_path)) == tmp_path
