"""OpenAI function calling through constrained decoding: the reply is forced to be one tool call.

`tool_choice` "required" constrains the output to `{"name": <one of the tools>, "arguments": <its
parameters' schema>}`, a named function to that function alone; "none" ignores the tools. "auto" (the
model decides whether to call a tool) needs a model trained for it and is refused with a clear error.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from loraplex.engine.request import FinishReason


def tool_call_schema(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None) -> str | None:
    """The JSON schema a reply must follow for these tools (None: plain text). ValueError names the problem."""
    if not tools or tool_choice == "none":
        return None
    functions = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                             f"\"parameters\": {{...}}}}}}")
        parameters = fn.get("parameters", {"type": "object"})
        if not isinstance(parameters, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        functions[fn["name"]] = parameters
    if tool_choice in (None, "auto"):
        raise ValueError('tool_choice "auto" is not supported (the model would have to decide whether to call '
                         'a tool): pass tool_choice "required" or {"type": "function", "function": {"name": ...}}')
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if name not in functions:
            raise ValueError(f"tool_choice names function {name!r}, which is not among the tools {sorted(functions)}")
        functions = {name: functions[name]}
    elif tool_choice != "required":
        raise ValueError(f'tool_choice must be "none", "required" or a named function, got {tool_choice!r}')
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
              "required": ["name", "arguments"], "additionalProperties": False}
             for name, parameters in functions.items()]
    return json.dumps(calls[0] if len(calls) == 1 else {"anyOf": calls})


def tool_call_message(text: str, finish_reason: FinishReason | None) -> tuple[dict[str, Any], str | None]:
    """The assistant message and finish reason for a constrained reply: a tool call when the JSON is
    complete; cut short by max_tokens, the partial text as content with finish reason "length"."""
    if finish_reason is FinishReason.LENGTH:
        return {"role": "assistant", "content": text}, "length"
    call = json.loads(text)
    return {"role": "assistant", "content": None, "tool_calls": [{
        "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
        "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]}, "tool_calls"
