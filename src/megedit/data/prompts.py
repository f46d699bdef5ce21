"""How a query is shown to the LM, in one place, so every method sees exactly the same text.

A format turns a raw query into prompt token ids, an answer into the token ids that follow the
prompt, and says which tokens end an answer. It is recorded in every report.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass

from ..errors import ConfigError


def format_fields(template: str) -> list[str] | None:
    """The replacement fields of a str.format template as written ('{}' -> '', '{query}' -> 'query',
    '{0!r:>5}' -> '0!r:>5'); None when its braces do not parse."""
    try:
        return [name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
                for _, name, spec, conversion in string.Formatter().parse(template) if name is not None]
    except ValueError:
        return None


@dataclass(frozen=True)
class PromptFormat:
    name: str
    template: str = "{query}"  # wraps the raw query (ignored by chat formats)
    chat: bool = False  # use the tokenizer's chat template (instruct models)
    system: str | None = None  # chat only: a system message (None: the template's own default; "" an empty one)
    answer_prefix: str = " "  # text between the wrapped prompt and the answer
    stop: str = "newline"  # what a trained answer ends with outside chat: "newline" or "eos" (the tokenizer's EOS)

    def __post_init__(self) -> None:
        if self.stop not in ("newline", "eos"):
            raise ConfigError(f"prompt format {self.name!r}: stop must be 'newline' or 'eos', found {self.stop!r}")
        if set(format_fields(self.template) or ()) != {"query"}:
            raise ConfigError(f"prompt format {self.name!r}: the template must hold '{{query}}' and no other "
                              f"'{{...}}' field, found {self.template!r}")

    def text(self, query: str, tokenizer) -> str:
        if not self.chat:
            return self.template.format(query=query)
        messages = ([{"role": "system", "content": self.system}] if self.system is not None else []) + [
            {"role": "user", "content": query}
        ]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prompt_ids(self, query: str, tokenizer) -> list[int]:
        # a chat template writes its own special tokens; plain text gets the tokenizer's usual ones
        return tokenizer(self.text(query, tokenizer), add_special_tokens=not self.chat)["input_ids"]

    def opening_ids(self, tokenizer) -> list[int]:
        """The tokens every prompt of this chat format begins with, whatever the query (the system
        turn and the user's header); none outside chat."""
        if not self.chat:
            return []
        first, second = (self.prompt_ids(probe, tokenizer) for probe in _PROBES)
        n = next((k for k, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))
        return first[:n]

    def answer_ids(self, answer: str, tokenizer, with_stop: bool = False) -> list[int]:
        """Tokens of the answer as it follows the prompt; `with_stop` adds the end-of-answer token
        (what an edit is trained to produce, so that generation stops after the new answer)."""
        ids = tokenizer(self.answer_prefix + answer, add_special_tokens=False)["input_ids"]
        return ids + [self.stop_token(tokenizer)] if with_stop else ids

    def stop_token(self, tokenizer) -> int:
        """The token an answer ends with: end-of-turn (EOS) for chat and for `stop="eos"`, else a newline."""
        if self.chat or (self.stop == "eos" and tokenizer.eos_token_id is not None):
            return tokenizer.eos_token_id
        return tokenizer("\n", add_special_tokens=False)["input_ids"][-1]

    def to_dict(self) -> dict:
        return asdict(self)


_PROBES = ("0", "Q")  # two user turns that share no first token: where their prompts part is where the query starts

PRESETS = {
    # the query as it is: CounterFact's cloze prefixes ("The mother tongue of X is"). Answers end with EOS,
    # not a newline: an edited answer then also ends a chat turn or a free generation (docs/method.md)
    "raw": PromptFormat("raw", stop="eos"),
    # the authors' short-answer wrapping for question-style data (ZsRE)
    "qa": PromptFormat("qa", template="Answer the following question in less than 5 words: {query} \nAnswer:",
                       stop="eos"),
    # the tokenizer's own chat template, answer as the assistant's turn
    "chat": PromptFormat("chat", chat=True, answer_prefix=""),
}

# what each data kind is scored with unless the user picks another format
DEFAULT_FOR_KIND = {"counterfact": "raw", "rome": "raw", "zsre": "qa", "jsonl": "raw"}


def get_format(name_or_format: str | PromptFormat) -> PromptFormat:
    if isinstance(name_or_format, PromptFormat):
        return name_or_format
    if name_or_format not in PRESETS:
        raise ConfigError(f"unknown prompt format {name_or_format!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name_or_format]


def stop_tokens(tokenizer) -> set[int]:
    """Tokens that end a generated answer: EOS and every token whose text holds a newline."""
    stops = {i for token, i in tokenizer.get_vocab().items() if "\n" in tokenizer.convert_tokens_to_string([token])}
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    return stops
