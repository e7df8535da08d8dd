"""parse_tool_calls: Qwen-style <tool_call> blocks out of generated text, malformed ones left alone."""

import json

from agentbench_npu.engines.chat import ToolCall, parse_tool_calls


def test_well_formed_call_is_extracted_and_content_is_the_text_around_it():
    text = 'Let me compute.\n<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(1)"}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me compute."
    assert calls == [ToolCall(name="code_interpreter", arguments={"code": "print(1)"})]


def test_several_calls_come_back_in_order():
    text = ('<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
            '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == ""
    assert [c.name for c in calls] == ["a", "b"]
    assert calls[0].arguments == {"x": 1}


def test_malformed_json_block_stays_in_content_while_good_ones_are_parsed():
    bad = '<tool_call>{"name": "a", "arguments": {"x": </tool_call>'
    good = '<tool_call>{"name": "b", "arguments": {"y": 2}}</tool_call>'
    content, calls = parse_tool_calls(f"{bad} then {good}")
    assert content == f"{bad} then"
    assert calls == [ToolCall("b", {"y": 2})]


def test_block_without_a_name_or_with_non_object_arguments_is_not_a_call():
    for body in ('{"arguments": {}}', '{"name": "f", "arguments": [1, 2]}', '"just a string"'):
        text = f"<tool_call>{body}</tool_call>"
        assert parse_tool_calls(text) == (text, [])


def test_double_encoded_arguments_are_decoded():
    text = '<tool_call>{"name": "f", "arguments": "{\\"q\\": \\"x\\"}"}</tool_call>'
    assert parse_tool_calls(text)[1] == [ToolCall("f", {"q": "x"})]


def test_text_without_calls_is_returned_stripped_with_no_calls():
    assert parse_tool_calls("  The answer is 4.\n") == ("The answer is 4.", [])


def test_unterminated_block_stays_in_content():
    text = 'thinking <tool_call>{"name": "f", "arguments": {}}'
    assert parse_tool_calls(text) == (text, [])


def test_openai_form_has_id_type_and_arguments_as_a_json_string():
    call = ToolCall("search", {"query": "Ascend 910C"}).to_openai()
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "search"
    assert json.loads(call["function"]["arguments"]) == {"query": "Ascend 910C"}
