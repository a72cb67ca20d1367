"""Request bodies of the HTTP API (pydantic): the native LoRAX/TGI format and the OpenAI format.

Field names and ranges follow ../shared/API.md; every known field is type- and range-checked and a bad
value is a 422 naming the field.

Unknown fields are refused with a 422 naming them, on both APIs, so that a misspelled parameter
(`adapter` for `adapter_id`) is an error rather than a silently different answer. OpenAI's API does
the same (it answers 400 "Unrecognized request argument supplied"; we use 422, like every other
validation error here). What the published clients send is accepted, and what they send that we do
not implement is listed below and ignored, on purpose:

- native `parameters`: `lorax-client` 0.6.3 and `text-generation` 0.7.0 send every field of their
  request models, `null` when unset. All are known here; `null` means "the default" everywhere
  (`merged_adapters.merge_strategy` and `majority_sign_method` included). TGI's `grammar` is honoured
  when it is JSON (as `response_format`) and refused when it is a regex. Nothing else is accepted: a
  field that would change the answer (LoRAX server's `adapter_parameters`, a misspelling) must not be
  dropped silently.
- OpenAI: `OPENAI_IGNORED` are fields the OpenAI SDK and agent frameworks send that do not change
  what a single server replica generates (end-user ids, storage and routing hints, and
  `parallel_tool_calls`: at most one call is made per reply, which satisfies both values). Chat
  messages also accept the fields an SDK response object carries when it is sent back
  (`refusal`, `annotations`, `audio`, `function_call`), which are ignored.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from loraplex.engine.request import MAX_LOGPROBS, MAX_STOP_SEQUENCES

DEFAULT_MAX_NEW_TOKENS = 20
MAX_N = 16
OPENAI_IGNORED = ("user", "metadata", "store", "parallel_tool_calls", "service_tier", "prompt_cache_key",
                  "safety_identifier")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    json_schema: dict[str, Any] | None = None
    """OpenAI's spelling: `{"name", "schema", "strict"}`."""


class Grammar(_Body):
    """TGI's `grammar`: `{"type": "json", "value": <schema>}` is honoured; regexes are not supported."""

    type: Literal["json", "regex"]
    value: str | dict[str, Any]

    def as_response_format(self) -> ResponseFormat:
        if self.type != "json":
            raise ValueError('grammar of type "regex" is not supported; use a "json" grammar or response_format')
        schema = json.loads(self.value) if isinstance(self.value, str) else self.value
        if not isinstance(schema, dict):
            raise ValueError("grammar.value must be a JSON schema object")
        return ResponseFormat(type="json_object", schema=schema)


class MergedAdapters(_Body):
    ids: list[str] = Field(min_length=1)
    weights: list[float] = Field(min_length=1)
    merge_strategy: Literal["linear", "ties", "dare_linear", "dare_ties"] = "linear"
    density: float = Field(default=1.0, gt=0, le=1)
    majority_sign_method: Literal["total", "frequency"] = "total"

    @field_validator("merge_strategy", "density", "majority_sign_method", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        """lorax-client sends null for every option the caller left unset."""
        return cls.model_fields[info.field_name].default if value is None and info.field_name else value


class GenerateParameters(_Body):
    adapter_id: str | None = None
    adapter_source: Literal["hub", "local", "s3"] | None = None
    api_token: str | None = None
    merged_adapters: MergedAdapters | None = None
    do_sample: bool = False
    temperature: float | None = Field(default=None, ge=0)
    top_k: int | None = Field(default=None, gt=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    typical_p: float | None = Field(default=None, gt=0, lt=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    best_of: int | None = Field(default=None, gt=0)
    watermark: bool = False
    max_new_tokens: int | None = Field(default=None, gt=0)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    ignore_eos_token: bool = False
    speculate: bool = True
    """loraplex: draft tokens when the server runs speculative decoding (README); output is the same."""
    truncate: int | None = Field(default=None, gt=0)
    return_full_text: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_k_alternatives: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    top_n_tokens: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """TGI's name for `return_k_alternatives`."""
    response_format: ResponseFormat | None = None
    grammar: Grammar | None = None
    """TGI's spelling of `response_format` (JSON only)."""

    @model_validator(mode="after")
    def _one_adapter_kind(self) -> GenerateParameters:
        if self.adapter_id and self.merged_adapters is not None:
            raise ValueError("give at most one of `adapter_id` and `merged_adapters`")
        if self.grammar is not None:
            if self.response_format is not None:
                raise ValueError("give at most one of `grammar` and `response_format`")
            self.response_format = self.grammar.as_response_format()
        return self


class GenerateRequest(_Body):
    inputs: str = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class TokenizeRequest(_Body):
    inputs: str


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool | None = None
    """Ignored: no obfuscation padding is sent."""


class OpenAISampling(_Body):
    model: str = ""
    """The adapter to use; the base model's id or an empty string means no adapter."""
    max_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None
    """Refused when non-empty (not implemented); `{}` and null are accepted."""
    # Ignored (see OPENAI_IGNORED).
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    parallel_tool_calls: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Extensions beyond OpenAI's fields (vLLM and LoRAX accept them too).
    top_k: int | None = Field(default=None, gt=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    ignore_eos: bool = False
    adapter_source: Literal["hub", "local", "s3"] | None = None
    api_token: str | None = None
    speculate: bool = True
    """loraplex: draft tokens when the server runs speculative decoding (README); output is the same."""

    @model_validator(mode="after")
    def _stop_count(self) -> OpenAISampling:
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(self.stop)}")
        return self


class CompletionRequest(OpenAISampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None


class FunctionCall(_Body):
    name: str = Field(min_length=1)
    arguments: str
    """JSON text, as OpenAI sends it."""


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    """Absent or null (an assistant turn that only calls tools) renders as ""."""
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    """An assistant turn's calls, sent back in the tool-call round trip."""
    tool_call_id: str | None = None
    """A `tool` turn: the call this is the result of."""
    # Ignored: what the SDK's response message carries when a client appends it to the conversation.
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: Any = None
    function_call: Any = None


class ChatCompletionRequest(OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_max(self) -> ChatCompletionRequest:
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise ValueError(f"max_tokens ({self.max_tokens}) and max_completion_tokens "
                             f"({self.max_completion_tokens}) disagree; give one of them")
        return self


class AdapterAdminRequest(_Body):
    adapter_id: str = Field(min_length=1)
    adapter_source: Literal["hub", "local", "s3"] | None = None
    api_token: str | None = None


class DynamicLoRARequest(_Body):
    """vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` body, which the inference gateway's
    adapter syncer sends. loraplex names an adapter by its id, so `lora_name` is that id (the name a
    client then sends as `model`); `lora_path`, if given, must name the same adapter: there are no aliases."""

    lora_name: str = Field(min_length=1)
    lora_path: str | None = None


def max_new_tokens(prompt_tokens: int, requested: int | None, default: int | None, limit: int,
                   name: str) -> int:
    """The one max-tokens policy of both APIs: how many tokens a request may generate.

    `limit` is the most tokens one request may hold, prompt and generated together (`--max-total-tokens`,
    capped by the model's length and the KV cache). A number the client gave is honoured or refused (ValueError naming the
    numbers), never silently shortened, as TGI does; without one, `default` (None: up to the limit, as
    OpenAI's chat does) is shortened to what fits.
    """
    if prompt_tokens >= limit:
        raise ValueError(f"the prompt has {prompt_tokens} tokens; at most {limit - 1} fit, leaving room for one "
                         f"new token within the limit of {limit} tokens (prompt + {name})")
    room = limit - prompt_tokens
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise ValueError(f"prompt + {name} must be <= {limit} tokens: the prompt has {prompt_tokens} tokens "
                         f"and {name} is {requested} (at most {room} here)")
    return requested
