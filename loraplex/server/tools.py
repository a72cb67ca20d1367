"""OpenAI function calling through constrained decoding.

`tool_choice`:
- "required": the reply is constrained to one call `{"name": <one of the tools>, "arguments": <its
  parameters' schema>}`; a named function (`{"type": "function", "function": {"name"}}`) to that one;
- "auto", or absent while tools are given (OpenAI's default): the reply is constrained to an
  either-or: that call object, or a JSON string holding a plain-text answer. The model decides which;
  a string becomes the message's `content` (finish reason "stop"), an object a `tool_calls` entry
  (finish reason "tool_calls");
- "none": the tools are ignored and the reply is free text.

Why a constrained either-or and not parsing the model family's own format (Hermes'
`<tool_call>{...}</tool_call>` in free text, as vLLM's tool parsers do): a parser can only pass on
what the model wrote, and a model not tuned for tools (the demo model, most LoRA fine-tunes) writes
malformed calls, which would then reach the client as a call it cannot execute or as text that looks
like one. Constrained, every call the server returns names a given tool and its arguments follow
that tool's schema, whatever the model, with the grammar engine the server already has for
`response_format`. The cost: a text answer is written as a JSON string (decoded before it is
returned), which models tuned on a native tool format do not write as fluently, and replies with
tools cannot be streamed yet. The tools and the reply format are described to the model in a
system message (`tool_prompt`); earlier calls and results in the conversation are rendered by
loraplex.tokenization.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from loraplex.engine.request import FinishReason


@dataclass(frozen=True)
class ToolMode:
    schema: str
    """The JSON schema a reply must follow."""
    prompt: str
    """The system text that tells the model the tools and that format."""


def tool_mode(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None) -> ToolMode | None:
    """How a reply must look for these tools (None: plain text). ValueError names the problem."""
    if tool_choice not in (None, "none", "auto") and not tools:
        raise ValueError(f"tool_choice {tool_choice!r} needs tools")
    if not tools or tool_choice == "none":
        return None
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                             f"\"parameters\": {{...}}}}}}")
        parameters = fn.get("parameters", {"type": "object"})
        if not isinstance(parameters, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        functions[fn["name"]] = parameters
    described = [t["function"] for t in tools]
    may_answer = tool_choice in (None, "auto")
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if name not in functions:
            raise ValueError(f"tool_choice names function {name!r}, which is not among the tools {sorted(functions)}")
        functions = {name: functions[name]}
        described = [f for f in described if f["name"] == name]
    elif not may_answer and tool_choice != "required":
        raise ValueError(f'tool_choice must be "none", "auto", "required" or a named function, got {tool_choice!r}')
    calls: list[dict[str, Any]] = [
        {"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
         "required": ["name", "arguments"], "additionalProperties": False} for name, parameters in functions.items()]
    if may_answer:
        calls.append({"type": "string"})
    schema = json.dumps(calls[0] if len(calls) == 1 else {"anyOf": calls})
    return ToolMode(schema, _prompt(described, may_answer))


def _prompt(functions: list[dict[str, Any]], may_answer: bool) -> str:
    listing = "\n".join(json.dumps(f) for f in functions)
    reply = ("Reply with JSON only: to call a function, an object {\"name\": <function name>, \"arguments\": "
             "<arguments object>}; to answer without calling one, your answer as a JSON string."
             if may_answer else
             "Reply with JSON only: an object {\"name\": <function name>, \"arguments\": <arguments object>} "
             "that calls one of them.")
    return f"You can call functions. Their signatures are within <tools></tools>:\n<tools>\n{listing}\n</tools>\n{reply}"


def with_tool_prompt(messages: list[dict[str, Any]], prompt: str) -> list[dict[str, Any]]:
    """The conversation with the tool prompt added to its system message (or as one, first)."""
    if messages and messages[0]["role"] in ("system", "developer"):
        first = messages[0]
        content = first.get("content") or ""
        return [{**first, "content": f"{content}\n\n{prompt}" if content else prompt}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def tool_call_message(text: str, finish_reason: FinishReason | None) -> tuple[dict[str, Any], str | None]:
    """The assistant message and finish reason for a constrained reply: a tool call for a complete call
    object, the text for a JSON string. Cut short (max_tokens or a stop sequence), it is not JSON: what
    it holds so far is the content, with finish reason "length" or "stop"."""
    try:
        reply = json.loads(text)
    except json.JSONDecodeError:
        reply = None
    if isinstance(reply, dict):  # complete, so it follows the schema (even if max_tokens ended it there)
        return {"role": "assistant", "content": None, "tool_calls": [{
            "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": reply["name"], "arguments": json.dumps(reply["arguments"])}}]}, "tool_calls"
    if isinstance(reply, str):
        content = reply
    elif text.startswith('"'):  # a text answer cut short: as much of the string as decodes
        content = _partial_string(text)
    else:
        content = text
    return {"role": "assistant", "content": content}, "length" if finish_reason is FinishReason.LENGTH else "stop"


def _partial_string(text: str) -> str:
    for end in range(len(text), max(0, len(text) - 8), -1):  # a cut escape (at most 6 characters) is dropped
        try:
            value = json.loads(text[:end] + '"')
        except json.JSONDecodeError:
            continue
        if isinstance(value, str):
            return value
    return text
