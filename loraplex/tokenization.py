"""Prompts to token ids, the same way for the offline API and the server.

Chat conversations go through the model's own chat template. Messages come in OpenAI's shape, and
the tool-call round trip (an assistant turn with `tool_calls` and no content, then `tool` turns with
the results) must render whatever the template knows:

- content that is absent or null renders as "";
- a template that handles tool calls itself (it mentions `tool_calls`) gets them as HF templates expect
  them: `{"type": "function", "function": {"name", "arguments": <object>}}` on the assistant turn and
  `tool` turns as they are;
- any other template (SmolLM2's, the demo model's, among them) gets them as text in the Hermes format
  that SmolLM2 and most open models are tuned on: each call is appended to the assistant turn's text as
  `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, and a run of `tool` turns becomes one
  user turn holding `<tool_response>\n{"name": ..., "content": ...}\n</tool_response>` per result.

A template that still cannot render the conversation (a template that raises on role order, say) is
the request's problem: ValueError naming what the template said, never an internal error.
"""

from __future__ import annotations

import json
from typing import Any

from jinja2 import TemplateError


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of a conversation rendered by the model's own chat template, ready for the reply."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; send a plain prompt instead")
    native = "tool_calls" in str(tokenizer.chat_template)
    prepared = _native_tool_messages(messages) if native else _text_tool_messages(messages)
    try:
        text = tokenizer.apply_chat_template(prepared, add_generation_prompt=True, tokenize=False)
    except (TemplateError, TypeError, KeyError, IndexError) as e:  # the template's verdict on these messages
        raise ValueError(f"the model's chat template cannot render these messages: {type(e).__name__}: {e}") from None
    # The template already holds the special tokens; tokenizing must not add them a second time.
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _content(message: dict[str, Any]) -> str:
    content = message.get("content")
    return "" if content is None else str(content)


def _arguments(call: dict[str, Any]) -> Any:
    """A call's arguments as an object where they are JSON text (OpenAI's wire form), else as given."""
    arguments = call.get("function", {}).get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _native_tool_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        m = {**m, "content": _content(m)}
        if m.get("tool_calls"):
            m["tool_calls"] = [{"id": c.get("id"), "type": "function", "function": {
                "name": c.get("function", {}).get("name"), "arguments": _arguments(c)}} for c in m["tool_calls"]]
        out.append(m)
    return out


def tool_call_text(name: str, arguments: Any) -> str:
    """One call in the Hermes text form."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def _text_tool_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    names: dict[Any, Any] = {}  # call id → function name, so a result can say which function it answers
    results_open = False  # the last turn out is a user turn of tool results that the next result joins
    for m in messages:
        if m["role"] == "tool":
            name = names.get(m.get("tool_call_id"), m.get("name"))
            result = json.dumps({"name": name, "content": _content(m)} if name else {"content": _content(m)})
            block = "<tool_response>\n" + result + "\n</tool_response>"
            if results_open:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            results_open = True
            continue
        results_open = False
        text = _content(m)
        calls = m.get("tool_calls") or []
        for c in calls:
            names[c.get("id")] = c.get("function", {}).get("name")
        if calls:
            blocks = [tool_call_text(c.get("function", {}).get("name"), _arguments(c)) for c in calls]
            text = "\n".join([text, *blocks] if text else blocks)
        out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")} | {"content": text})
    return out
