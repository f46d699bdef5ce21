"""Chat prompts: a conversation checked (a string is one user turn; the last turn is the user's; a
pack's system message added), and its tokens through the tokenizer's chat template. What
`EditedModel.chat` and the server's /v1/chat/completions both send to the model."""

from __future__ import annotations

import jinja2

from ..data.prompts import PromptFormat
from ..errors import ConfigError


def is_batch(messages) -> bool:
    """Whether chat() was given several conversations (a list of strings or of message lists)."""
    return (isinstance(messages, (list, tuple)) and bool(messages)
            and all(isinstance(m, (str, list, tuple)) for m in messages))


def conversation(messages, fmt: PromptFormat) -> list[dict]:
    """Chat messages checked: a string is one user turn; the last turn must be the user's. A
    pack fitted under a chat format with a system message gets it when the caller gives none."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, (list, tuple)) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ConfigError(f"chat takes a string or a list of {{'role': str, 'content': str}} messages, "
                          f"found {messages!r:.80}")
    if not messages or messages[-1]["role"] != "user":
        raise ConfigError(f"chat needs a conversation that ends with a user message, found roles "
                          f"{[m['role'] for m in messages]}")
    if fmt.chat and fmt.system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": fmt.system}, *messages]
    return list(messages)


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The tokens of a conversation through the tokenizer's chat template, ready for the assistant's turn."""
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except (ValueError, jinja2.TemplateError) as error:
        raise ConfigError(f"chat needs the tokenizer's chat template, which failed: {error}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template wrote the special tokens
