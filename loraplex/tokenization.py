"""Prompts to token ids, the same way for the offline API and the server."""

from __future__ import annotations

from typing import Any


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of a conversation rendered by the model's own chat template, ready for the reply."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; send a plain prompt instead")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template already holds the special tokens; tokenizing must not add them a second time.
    return list(tokenizer(text, add_special_tokens=False).input_ids)
