"""A byte-level BPE tokenizer with Qwen's special tokens and chat template, trained offline from a seed.

Model hubs are out of reach on many machines this runs on, so the tiny profile builds its tokenizer
from a generated corpus in milliseconds. Real checkpoints bring their own tokenizer and template.
"""

from __future__ import annotations

import random

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Tags that agent protocols emit as one token each (Qwen keeps them as added, non-special tokens).
TAG_TOKENS = [
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<interpreter>", "</interpreter>", "<search>", "</search>", "<information>", "</information>",
    "<answer>", "</answer>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]

# Our own Jinja rendering of the Qwen chat format: <|im_start|>role\ncontent<|im_end|>\n, tools in the
# system turn, assistant tool calls as <tool_call>{json}</tool_call>, tool results as <tool_response>
# inside a user turn.
CHAT_TEMPLATE = (
    "{% set msgs = messages %}"
    "{% if tools %}"
    "<|im_start|>system\n"
    "{% if msgs[0].role == 'system' %}{{ msgs[0].content }}\n\n{% endif %}"
    "# Tools\n\nCall a function by writing <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>."
    " Available functions:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}</tools><|im_end|>\n"
    "{% elif msgs and msgs[0].role == 'system' %}"
    "<|im_start|>system\n{{ msgs[0].content }}<|im_end|>\n"
    "{% endif %}"
    "{% for m in msgs %}"
    "{% if m.role == 'system' and loop.first %}"
    "{% elif m.role == 'tool' %}"
    "{% if loop.first or msgs[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n' }}<tool_response>\n{{ m.content }}\n</tool_response>"
    "{% if loop.last or msgs[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% elif m.role == 'assistant' %}"
    "<|im_start|>assistant\n{{ m.content or '' }}"
    "{% for call in (m.tool_calls or []) %}"
    "{% set fn = call.function if call.function is defined else call %}"
    "{% if m.content or not loop.first %}{{ '\\n' }}{% endif %}"
    "<tool_call>\n{\"name\": \"{{ fn.name }}\", \"arguments\": "
    "{{ fn.arguments if fn.arguments is string else (fn.arguments | tojson) }}}\n</tool_call>"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% else %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "what is the answer compute put final in boxed please solve question result sum difference of and "
    "plus minus times number first second call tool code print python def return value error search "
    "information user assistant system order item price total cancel return exchange status name "
    "arguments interpreter output found the a an to is are was for with"
).split()


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    """Text that looks like what the tiny profile will see: chat turns, arithmetic, tool calls."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice(["+", "-", "*"])
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 10)))
        out.append(f"<|im_start|>user\nWhat is {a} {op} {b}? {words}<|im_end|>\n")
        out.append(f"<|im_start|>assistant\n{a} {op} {b} = {rng.randint(0, 9999)}. \\boxed{{{rng.randint(-999, 9999)}}}<|im_end|>\n")
        out.append(f'<tool_call>\n{{"name": "{rng.choice(_WORDS)}", "arguments": {{"code": "print({a} {op} {b})"}}}}\n</tool_call>')
        out.append(f"{words.capitalize()}. {rng.randint(0, 10**rng.randint(1, 6))}")
    return out


def build_tokenizer(vocab_size: int = 512, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE and wrap it as a transformers tokenizer with the chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TAG_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    # Tags are ordinary added tokens: one id each, but kept when decoding with skip_special_tokens.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
