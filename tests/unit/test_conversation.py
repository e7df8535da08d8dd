"""`ChatEpisode` (conversation.py): a multi-turn chat kept as messages AND as the token log RL trains on, with
the tiny model's real tokenizer and chat template, and the policy scripted (`ScriptedPolicy`, tests/support).

Covered:
- the token log: prompt ids are the template's render of the opening messages; the policy's sampled ids are
  appended as sampled (never re-encoded) with loss mask 1 and its log-probs; a tool or user message is appended
  as environment tokens (mask 0, log-prob 0) whose ids are exactly `encode(delta)` of the rendered delta; the
  engine's context on a later turn is prompt + every response id so far;
- the assistant message a turn becomes (`assistant_message`): a canonical call is parsed into `tool_calls` and
  re-renders with no prefix break; a call spaced differently from the template, or text after a call, breaks
  the prefix: counted, an example kept, the engine goes on from the template's rendering, and `finish()`
  excludes the trajectory from training; an unparseable `<tool_call>` stays as raw text (no break) and counts
  as malformed;
- the response budget: it cuts an observation (or leaves no room to sample) and `sample` returns None without
  asking the engine; a turn cut by `max_new_tokens` is not `finished`;
- `scripted()` (gold turns): the template's text for the message, as environment tokens;
- `assistant_text` and `chat_segments`, and the chat form of `encode_demonstrations`: a whole chat cut into
  prompt and segments gives exactly the ids and trained flags that a ChatEpisode rollout of the same chat
  records, so warm start and rollout cut tokens at the same boundaries.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest

from agentbench_npu.conversation import ChatEpisode, assistant_message, assistant_text, chat_segments, render_text
from agentbench_npu.errors import UserError
from agentbench_npu.models.loading import load_tokenizer, resolve_model_dir
from agentbench_npu.scenario import RolloutContext
from agentbench_npu.training.warm_start import encode_demonstrations
from agentbench_npu.types import SamplingParams
from tests.support.scripted_policy import POLICY_LOGPROB, ScriptedPolicy

EOS = "<|im_end|>"
LOOKUP = {"type": "function", "function": {
    "name": "lookup", "description": "Look a word up.",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}
TOOLS = [LOOKUP]
OPENING = [{"role": "system", "content": "You are a helpful agent."}, {"role": "user", "content": "What is a cat?"}]
# a call exactly as the template renders one (see the tiny model's chat template)
CANONICAL_CALL = '<tool_call>\n{"name": "lookup", "arguments": {"q": "cat"}}\n</tool_call>'
TOOL_RESULT = {"role": "tool", "name": "lookup", "content": "A cat is a small animal."}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model_dir("tiny", 0))


def context(tok: Any, policy: Any, max_new_tokens: int = 128) -> RolloutContext:
    return RolloutContext(engine=policy, tokenizer=tok, sampling=SamplingParams(max_new_tokens=max_new_tokens),
                          options={}, rng=random.Random(0))


def encode(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def rendered(tok: Any, messages: list[dict], tools: list[dict] | None = TOOLS) -> str:
    """The template's text of `messages`, with the next assistant header: rendered here, not by the episode."""
    return tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)


class SpellingTokenizer:
    """The real tokenizer, except that `encode` spells text one character a token (special tokens whole): a
    policy whose ids are NOT the canonical encoding of its text, as an engine's sampled ids often are not."""

    def __init__(self, tok: Any):
        self.tok = tok

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        for i, piece in enumerate(text.split(EOS)):
            if i:
                ids.append(self.tok.eos_token_id)
            for ch in piece:
                ids += self.tok.encode(ch, add_special_tokens=False)
        return ids

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# == the token log ===================================================================================
def test_the_prompt_is_the_template_render_of_the_opening_messages(tok):
    ctx = context(tok, ScriptedPolicy(tok, []))
    convo = ChatEpisode.start(ctx, OPENING, TOOLS, 512)
    text = rendered(tok, OPENING)
    assert convo.traj.prompt_ids == encode(tok, text) == convo.context
    assert convo.shown == text
    assert '"name": "lookup"' in tok.decode(convo.traj.prompt_ids), "the tools render into the prompt"
    assert convo.traj.response_ids == [] and convo.room == 512
    bare = ChatEpisode.start(ctx, OPENING, None, 512)
    assert bare.traj.prompt_ids == encode(tok, rendered(tok, OPENING, None)) != convo.traj.prompt_ids


def test_sampled_ids_are_kept_as_sampled_with_their_logprobs_and_tool_results_are_masked_template_deltas(tok):
    spelled = SpellingTokenizer(tok)
    turns = [CANONICAL_CALL + EOS, "A cat is a small animal." + EOS]
    policy = ScriptedPolicy(spelled, turns)
    ctx = context(tok, policy)

    async def go():
        convo = ChatEpisode.start(ctx, OPENING, TOOLS, 1024)
        first = await convo.sample(ctx.sampling)
        convo.add(TOOL_RESULT)
        second = await convo.sample(ctx.sampling)
        return convo, first, second

    convo, first, second = run(go())
    out1, out2 = (list(o) for o in policy.outputs)
    assert out1 == spelled.encode(turns[0]) != encode(tok, turns[0]), "the script spells: not the canonical ids"
    # the delta the template puts between the two turns, computed here from two renders
    before = rendered(tok, OPENING)
    after_call = rendered(tok, OPENING + [first.message, TOOL_RESULT])
    delta = after_call[len(before + turns[0]):]
    assert delta == "\n<|im_start|>user\n<tool_response>\nA cat is a small animal.\n</tool_response><|im_end|>\n" \
                    "<|im_start|>assistant\n"
    traj = convo.finish()
    assert traj.response_ids == out1 + encode(tok, delta) + out2, "sampled ids as sampled, never re-encoded"
    assert traj.loss_mask == [1] * len(out1) + [0] * len(encode(tok, delta)) + [1] * len(out2)
    assert traj.rollout_logprobs == ([POLICY_LOGPROB] * len(out1) + [0.0] * len(encode(tok, delta))
                                     + [POLICY_LOGPROB] * len(out2))
    assert traj.weight_version == 3 and traj.metadata["prefix_breaks"] == 0
    assert "excluded_from_training" not in traj.metadata
    # the engine read exactly the prompt, then the prompt and everything recorded before turn 2
    first_request, second_request = policy.requests
    assert list(first_request.input_ids) == traj.prompt_ids
    assert list(second_request.input_ids) == traj.prompt_ids + traj.response_ids[:-len(out2)]
    assert convo.context == traj.prompt_ids + traj.response_ids
    assert traj.response_text == turns[0] + delta + turns[1]
    # the turns: messages for the next render, and what the engine returned
    assert first.message == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "lookup", "arguments": {"q": "cat"}}}]}
    assert first.malformed_calls == 0 and first.finished and first.text == turns[0]
    assert second.message == {"role": "assistant", "content": "A cat is a small animal."}
    assert [m["role"] for m in convo.messages] == ["system", "user", "assistant", "tool", "assistant"]


def test_a_user_reply_is_appended_as_environment_tokens_of_the_rendered_delta(tok):
    policy = ScriptedPolicy(tok, ["Which cat do you mean?" + EOS, "Then: a small animal." + EOS])
    ctx = context(tok, policy)
    reply = {"role": "user", "content": "The house cat."}

    async def go():
        convo = ChatEpisode.start(ctx, OPENING, None, 1024)
        first = await convo.sample(ctx.sampling)
        convo.add(reply)
        await convo.sample(ctx.sampling)
        return convo, first

    convo, first = run(go())
    traj = convo.finish()
    out1, out2 = (list(o) for o in policy.outputs)
    shown = rendered(tok, OPENING, None) + "Which cat do you mean?" + EOS
    delta = rendered(tok, OPENING + [first.message, reply], None)[len(shown):]
    assert delta == "\n<|im_start|>user\nThe house cat.<|im_end|>\n<|im_start|>assistant\n"
    assert traj.response_ids == out1 + encode(tok, delta) + out2
    assert traj.loss_mask == [1] * len(out1) + [0] * len(encode(tok, delta)) + [1] * len(out2)
    assert list(policy.requests[1].input_ids) == traj.prompt_ids + out1 + encode(tok, delta)


def test_text_turns_keep_their_whitespace_so_the_next_render_matches_the_sampled_text(tok):
    """A chat API strips content; the episode must not, or the re-render would no longer be what was sampled."""
    turn = "  Hello there.  \n" + EOS
    policy = ScriptedPolicy(tok, [turn, "Bye." + EOS])
    ctx = context(tok, policy)

    async def go():
        convo = ChatEpisode.start(ctx, OPENING, None, 1024)
        first = await convo.sample(ctx.sampling)
        convo.add({"role": "user", "content": "ok"})
        await convo.sample(ctx.sampling)
        return convo, first

    convo, first = run(go())
    assert first.message["content"] == "  Hello there.  \n"
    traj = convo.finish()
    assert traj.metadata["prefix_breaks"] == 0 and traj.num_trainable == sum(map(len, policy.outputs))


# == the assistant message a turn becomes, and prefix stability ======================================
def test_assistant_message_parses_canonical_calls_and_counts_blocks_that_do_not_parse():
    message, malformed = assistant_message(CANONICAL_CALL + EOS, EOS)
    assert message == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "lookup", "arguments": {"q": "cat"}}}]}
    assert malformed == 0
    bad = "<tool_call>\n{not json}\n</tool_call>"
    assert assistant_message(bad + EOS, EOS) == ({"role": "assistant", "content": bad}, 1)
    unterminated = 'Let me look. <tool_call>{"name": "lookup", "arguments": {"q": "cat"}}'
    assert assistant_message(unterminated, EOS) == ({"role": "assistant", "content": unterminated}, 1)
    both, malformed = assistant_message(f"{bad}\n{CANONICAL_CALL}{EOS}", EOS)
    assert malformed == 1 and [c["function"]["name"] for c in both["tool_calls"]] == ["lookup"]
    assert both["content"] == bad
    # text without a call stays exactly as written (only the end of turn goes)
    assert assistant_message("  hi \n" + EOS, EOS) == ({"role": "assistant", "content": "  hi \n"}, 0)


def test_assistant_text_is_what_the_template_renders_for_the_message_up_to_the_end_of_turn(tok):
    call = assistant_message(CANONICAL_CALL + EOS, EOS)[0]
    assert assistant_text(tok, OPENING, call, TOOLS) == CANONICAL_CALL + EOS
    assert assistant_text(tok, OPENING, {"role": "assistant", "content": "Hi."}, None) == "Hi." + EOS
    spaced = {"role": "assistant", "content": "Let me look.", "tool_calls": call["tool_calls"]}
    assert assistant_text(tok, OPENING, spaced, TOOLS) == f"Let me look.\n{CANONICAL_CALL}{EOS}"


def test_a_canonical_call_re_renders_with_no_prefix_break(tok):
    policy = ScriptedPolicy(tok, [CANONICAL_CALL + EOS, "Done." + EOS])
    ctx = context(tok, policy)

    async def go():
        convo = ChatEpisode.start(ctx, OPENING, TOOLS, 1024)
        await convo.sample(ctx.sampling)
        convo.add(TOOL_RESULT)
        await convo.sample(ctx.sampling)
        return convo

    convo = run(go())
    traj = convo.finish()
    assert convo.breaks == [] and traj.metadata["prefix_breaks"] == 0
    assert traj.metadata["prefix_break_examples"] == []
    assert tok.decode(policy.requests[1].input_ids) == rendered(tok, convo.messages[:-1])
    assert traj.num_trainable == sum(map(len, policy.outputs)) > 0


@pytest.mark.parametrize("turn, seen, shown", [
    ('<tool_call>\n{"name":"lookup","arguments":{"q":"cat"}}\n</tool_call>' + EOS,
     '"lookup","arguments":{"q":"cat"}}', ' "lookup", "arguments": {"q": "cat"}}'),
    (CANONICAL_CALL + " Let me check." + EOS, "<tool_call>", "Let me check.\n<tool_call>"),
], ids=["compact-json", "text-after-call"])
def test_a_turn_the_template_re_renders_differently_breaks_the_prefix_and_is_excluded_from_training(
        tok, turn, seen, shown):
    policy = ScriptedPolicy(tok, [turn, "Done." + EOS])
    ctx = context(tok, policy)

    async def go():
        convo = ChatEpisode.start(ctx, OPENING, TOOLS, 1024)
        first = await convo.sample(ctx.sampling)
        convo.add(TOOL_RESULT)
        await convo.sample(ctx.sampling)
        return convo, first

    convo, first = run(go())
    assert first.message["tool_calls"][0]["function"] == {"name": "lookup", "arguments": {"q": "cat"}}
    assert first.malformed_calls == 0
    # from the break on, the engine reads the template's rendering, as a chat API would show the history
    template_view = rendered(tok, convo.messages[:-1])
    assert tok.decode(policy.requests[1].input_ids) == template_view
    assert (turn[:-len(EOS)] in tok.decode(policy.requests[1].input_ids)) is False
    traj = convo.finish(extra="kept")
    assert traj.metadata["prefix_breaks"] == 1 and len(convo.breaks) == 1
    (example,) = traj.metadata["prefix_break_examples"]
    assert example["seen"].startswith(seen) and example["rendered"].startswith(shown)
    assert (example["after"] + example["seen"]) in rendered(tok, OPENING) + turn
    assert (example["after"] + example["rendered"]) in template_view
    # kept for scoring and reports, trained on nothing
    assert traj.num_trainable == 0 and set(traj.loss_mask) == {0} and set(traj.rollout_logprobs) == {0.0}
    assert "1 time(s)" in traj.metadata["excluded_from_training"] and traj.metadata["extra"] == "kept"
    assert len(traj.response_ids) == len(traj.loss_mask) == len(traj.rollout_logprobs)


def test_an_unparseable_tool_call_keeps_its_raw_text_is_counted_as_malformed_and_breaks_nothing(tok):
    bad = '<tool_call>\n{"name": "lookup", "arguments": {"q": }\n</tool_call>'
    policy = ScriptedPolicy(tok, [bad + EOS, CANONICAL_CALL + EOS])
    ctx = context(tok, policy)

    async def go():
        convo = ChatEpisode.start(ctx, OPENING, TOOLS, 1024)
        first = await convo.sample(ctx.sampling)
        convo.add({"role": "tool", "content": "Error: a tool call must be JSON"})
        await convo.sample(ctx.sampling)
        return convo, first

    convo, first = run(go())
    assert first.message == {"role": "assistant", "content": bad} and first.malformed_calls == 1
    traj = convo.finish()
    assert traj.metadata["prefix_breaks"] == 0 and "excluded_from_training" not in traj.metadata
    assert tok.decode(policy.requests[1].input_ids).count(bad) == 1
    assert traj.num_trainable == sum(map(len, policy.outputs))


# == the response budget =============================================================================
@pytest.mark.parametrize("short", [3, 0], ids=["cuts-the-observation", "no-room-left-to-sample"])
def test_the_response_budget_cuts_an_observation_and_sample_returns_none_without_asking_the_engine(tok, short):
    turn = CANONICAL_CALL + EOS
    first_ids = encode(tok, turn)
    message = assistant_message(turn, EOS)[0]
    delta = rendered(tok, OPENING + [message, TOOL_RESULT])[len(rendered(tok, OPENING) + turn):]
    delta_ids = encode(tok, delta)
    budget = len(first_ids) + len(delta_ids) - short
    policy = ScriptedPolicy(tok, [turn, "never asked" + EOS])
    ctx = context(tok, policy)

    async def go():
        convo = ChatEpisode.start(ctx, OPENING, TOOLS, budget)
        await convo.sample(ctx.sampling)
        convo.add(TOOL_RESULT)
        return convo, await convo.sample(ctx.sampling)

    convo, second = run(go())
    assert second is None
    assert len(policy.requests) == 1, "nothing was sampled past the budget"
    traj = convo.finish()
    assert traj.response_length == budget and convo.room == 0
    assert traj.response_ids == first_ids + delta_ids[:len(delta_ids) - short]
    assert traj.loss_mask == [1] * len(first_ids) + [0] * (len(delta_ids) - short)


def test_each_turn_may_use_only_what_the_budget_leaves_and_a_turn_cut_short_is_not_finished(tok):
    turn = "A cat is a small animal, a pet of many homes." + EOS
    policy = ScriptedPolicy(tok, [turn])
    ctx = context(tok, policy, max_new_tokens=100)
    budget = len(encode(tok, turn)) - 4

    async def go():
        convo = ChatEpisode.start(ctx, OPENING, None, budget)
        return convo, await convo.sample(ctx.sampling)

    convo, first = run(go())
    assert policy.requests[0].sampling.max_new_tokens == budget < 100
    assert first.result.finish_reason == "length" and not first.finished
    assert convo.traj.response_ids == encode(tok, turn)[:budget]


# == scripted (gold) turns ===========================================================================
def test_a_scripted_turn_appends_the_templates_text_as_environment_tokens(tok):
    ctx = context(tok, ScriptedPolicy(tok, []))  # asking it for a turn would raise
    gold = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": {"q": "cat"}}}]}
    closing = {"role": "assistant", "content": "A cat is a small animal."}
    convo = ChatEpisode.start(ctx, OPENING, TOOLS, 1024)
    first = convo.scripted(gold)
    convo.add(TOOL_RESULT)
    second = convo.scripted(closing)
    assert first.text == CANONICAL_CALL + EOS and first.result is None and first.finished
    assert first.message == gold and first.malformed_calls == 0
    assert second.text == "A cat is a small animal." + EOS
    traj = convo.finish()
    delta = rendered(tok, OPENING + [gold, TOOL_RESULT])[len(rendered(tok, OPENING) + first.text):]
    assert traj.response_ids == encode(tok, first.text) + encode(tok, delta) + encode(tok, second.text)
    assert traj.num_trainable == 0 and set(traj.rollout_logprobs) == {0.0}
    assert traj.metadata["prefix_breaks"] == 0 and "excluded_from_training" not in traj.metadata
    assert convo.messages == OPENING + [gold, TOOL_RESULT, closing]
    # no room for the whole gold turn: None, nothing appended
    tight = ChatEpisode.start(ctx, OPENING, TOOLS, len(encode(tok, first.text)) - 1)
    assert tight.scripted(gold) is None and tight.traj.response_ids == []


# == warm start cuts a chat where a rollout cuts it ==================================================
CHAT = OPENING + [
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "lookup", "arguments": {"q": "cat"}}}]},
    TOOL_RESULT,
    {"role": "assistant", "content": "Checking twice.", "tool_calls": [
        {"type": "function", "function": {"name": "lookup", "arguments": {"q": "small animal"}}},
        {"type": "function", "function": {"name": "lookup", "arguments": {"q": "pet"}}}]},
    {"role": "tool", "name": "lookup", "content": "Small animals: cats, mice."},
    {"role": "tool", "name": "lookup", "content": "Pets: cats, dogs."},
    {"role": "assistant", "content": "A cat is a small animal, often a pet. Anything else?"},
    {"role": "user", "content": "No, thanks."},
    {"role": "assistant", "content": "Goodbye!"},
]


def rollout_of(tok: Any, chat: list[dict], tools: list[dict] | None) -> tuple[Any, ScriptedPolicy]:
    """A ChatEpisode of `chat`: the policy writes each assistant turn as the template renders it, and the
    environment adds every other message, as an agent loop does."""
    first = next(i for i, m in enumerate(chat) if m["role"] == "assistant")
    turns = [assistant_text(tok, chat[:i], m, tools) for i, m in enumerate(chat) if m["role"] == "assistant"]
    policy = ScriptedPolicy(tok, turns)
    ctx = context(tok, policy, max_new_tokens=256)

    async def go():
        convo = ChatEpisode.start(ctx, chat[:first], tools, 4096)
        for m in chat[first:]:
            if m["role"] == "assistant":
                assert await convo.sample(ctx.sampling) is not None
            else:
                convo.add(m)
        return convo.finish()

    return run(go()), policy


@pytest.mark.parametrize("tools", [TOOLS, None], ids=["tools", "no-tools"])
def test_chat_segments_and_a_rollout_of_the_same_chat_give_the_same_ids_and_trained_flags(tok, tools):
    prompt, segments = chat_segments(tok, CHAT, tools)
    traj, policy = rollout_of(tok, CHAT, tools)
    assert traj.metadata["prefix_breaks"] == 0
    assert encode(tok, prompt) == traj.prompt_ids == encode(tok, rendered(tok, OPENING, tools))
    ids = [i for text, _ in segments for i in encode(tok, text)]
    trained = [int(t) for text, t in segments for _ in encode(tok, text)]
    assert ids == traj.response_ids
    assert trained == traj.loss_mask
    # four assistant turns trained, alternating with the untrained messages between them
    assert [t for _, t in segments] == [True, False, True, False, True, False, True]
    assert [text for text, t in segments if t] == policy_texts(tok, policy)
    assert prompt + "".join(text for text, _ in segments) == tok.apply_chat_template(
        CHAT, tools=tools, add_generation_prompt=False, tokenize=False).rstrip("\n")


def policy_texts(tok: Any, policy: ScriptedPolicy) -> list[str]:
    return [tok.decode(list(o), skip_special_tokens=False) for o in policy.outputs]


def test_a_chat_demonstration_encodes_as_the_rollout_of_that_chat(tok):
    """encode_demonstrations' chat form: (prompt, response, trained) exactly the rollout's (prompt, response,
    loss mask); the last assistant turn already ends with the end of turn, nothing is added after it."""
    ((prompt, ids, trained),) = encode_demonstrations(tok, [{"messages": CHAT, "tools": TOOLS}])
    traj, _ = rollout_of(tok, CHAT, TOOLS)
    assert prompt == traj.prompt_ids
    assert ids == traj.response_ids and ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) >= 4
    assert [int(t) for t in trained] == traj.loss_mask
    # without tools the prompt carries no tool list, and the cut is the same as that rollout's
    ((prompt2, ids2, trained2),) = encode_demonstrations(tok, [{"messages": CHAT}])
    traj2, _ = rollout_of(tok, CHAT, None)
    assert (prompt2, ids2, [int(t) for t in trained2]) == (traj2.prompt_ids, traj2.response_ids, traj2.loss_mask)
    assert "<tools>" not in tok.decode(prompt2) and "<tools>" in tok.decode(prompt)


def test_chat_segments_of_a_chat_without_an_assistant_turn_is_the_whole_chat_as_prompt(tok):
    prompt, segments = chat_segments(tok, OPENING, TOOLS)
    assert prompt == render_text(tok, OPENING, TOOLS, add_generation_prompt=True) and segments == []
    assert json.loads(prompt.split("<tools>\n")[1].split("\n</tools>")[0]) == LOOKUP


class ThinkDroppingTokenizer:
    """The tiny tokenizer with a Qwen3-like template: assistant turns before the last user turn lose their
    `<think>` block when the chat is rendered again."""

    def __init__(self, tok: Any):
        self.tok = tok

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tok, name)

    def apply_chat_template(self, messages: list, **kwargs: Any) -> str:
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        shown = [dict(m, content=m["content"].split("</think>")[-1]) if m["role"] == "assistant" and i < last_user
                 else m for i, m in enumerate(messages)]
        return self.tok.apply_chat_template(shown, **kwargs)


THINKING_CHAT = OPENING + [{"role": "assistant", "content": "<think>small</think>A small animal."},
                           {"role": "user", "content": "And a dog?"},
                           {"role": "assistant", "content": "A loyal animal."}]


def test_a_chat_the_template_re_renders_differently_cannot_be_cut_into_a_demonstration(tok):
    with pytest.raises(ValueError, match="renders the history before assistant message 4 differently"):
        chat_segments(ThinkDroppingTokenizer(tok), THINKING_CHAT, None)
    with pytest.raises(UserError, match=r"^warm start: demonstration 2: the chat template renders"):
        encode_demonstrations(ThinkDroppingTokenizer(tok), [{"messages": OPENING + THINKING_CHAT[2:3]},
                                                            {"messages": THINKING_CHAT}])


def test_the_same_template_breaks_a_rollout_s_prefix_and_the_trajectory_is_not_trained_on(tok):
    thinking = ThinkDroppingTokenizer(tok)
    policy = ScriptedPolicy(tok, ["<think>small</think>A small animal." + EOS, "A loyal animal." + EOS])
    convo = ChatEpisode.start(context(thinking, policy), OPENING, None, 512)
    asyncio.run(convo.sample(SamplingParams(max_new_tokens=64)))
    convo.add({"role": "user", "content": "And a dog?"})
    asyncio.run(convo.sample(SamplingParams(max_new_tokens=64)))
    traj = convo.finish()
    assert traj.metadata["prefix_breaks"] == 1 and traj.num_trainable == 0
    assert traj.metadata["prefix_break_examples"][0]["seen"].startswith("<think>small</think>")
