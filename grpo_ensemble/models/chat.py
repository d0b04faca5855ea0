"""Conversations: checked when read, rendered by each member with its own chat template.

A prompt that is a conversation reaches a model as its tokenizer's chat template renders it,
with the generation prompt added, so that a peer with another tokenizer sees its own format;
what crosses between members is completion text. Rendered text already holds the template's
special tokens, so it is tokenized without adding them again (as TRL does).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..errors import RecipeError, UserError
from ..types import Prompt

ROLES = ("system", "user", "assistant", "tool")


def conversation_problem(messages) -> str | None:
    """What is wrong with a prompt given as a message list, or None."""
    if not isinstance(messages, list | tuple) or not messages:
        return "a conversation must be a non-empty list of messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {i} is not an object with role and content"
        # a data set's message structs may carry other keys as None (arrow fills them)
        extra = sorted(k for k in set(m) - {"role", "content"} if m[k] is not None)
        if extra:
            return f"message {i} has an unknown key {extra[0]!r} (role, content)"
        if m.get("role") not in ROLES:
            return f"message {i} has an unknown role {m.get('role')!r} (one of {', '.join(ROLES)})"
        if not isinstance(m.get("content"), str):
            return f"message {i} content is not a string"
    if messages[-1]["role"] == "assistant":
        return "the conversation ends with an assistant message: the model writes the next one"
    return None


def conversation_text(messages: Sequence) -> str:
    """A conversation as canonical JSON: equal conversations, equal text."""
    return json.dumps(list(messages), ensure_ascii=False, sort_keys=True)


def render_prompt(prompt: Prompt, tokenizer) -> str:
    """The text a model with `tokenizer` is given for `prompt`: the string itself, or the
    conversation through the tokenizer's chat template with the generation prompt."""
    if prompt.messages is None:
        return prompt.text
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"prompt {prompt.index} is a conversation, but a member's tokenizer has no chat "
            "template: give one in its recipe entry (chat_template)"
        )
    try:
        return tokenizer.apply_chat_template(
            [dict(m) for m in prompt.messages], add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # jinja2 raises its own kinds, and a template may raise too
        msg = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise UserError(f"prompt {prompt.index}: the chat template failed: {msg}") from None


def prompt_token_ids(prompt: Prompt, tokenizer) -> list[int]:
    """The prompt's token ids for a model with `tokenizer` (see `render_prompt`)."""
    text = render_prompt(prompt, tokenizer)
    return tokenizer(text, add_special_tokens=prompt.messages is None, verbose=False)["input_ids"]


def render_exchange(prompt: Prompt, completion: str, tokenizer) -> str:
    """The conversation followed by `completion` as the assistant's reply, through the
    tokenizer's chat template (no generation prompt): how a chat reward model reads a
    candidate, as TRL renders it for one."""
    messages = [dict(m) for m in prompt.messages or ()]
    messages.append({"role": "assistant", "content": completion})
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # jinja2 raises its own kinds, and a template may raise too
        msg = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise UserError(f"prompt {prompt.index}: the chat template failed: {msg}") from None


def read_chat_template(value: str | None, field: str) -> str | None:
    """A recipe's `chat_template`: inline Jinja as is, or the text of the file it names."""
    if value is None or "{{" in value or "{%" in value:
        return value
    try:
        return Path(value).expanduser().read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise RecipeError(field, f"neither Jinja nor a readable file: {value!r} ({why})") from None
