"""Request bodies of the HTTP API (pydantic): the native LoRAX/TGI format and the OpenAI format.

Field names and ranges follow ../shared/API.md. Unknown fields are ignored, as LoRAX and TGI do, so
clients that send newer fields keep working; every known field is type- and range-checked and a bad
value is a 422 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loraplex.engine.request import MAX_LOGPROBS, MAX_STOP_SEQUENCES

DEFAULT_MAX_NEW_TOKENS = 20
MAX_N = 16


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    json_schema: dict[str, Any] | None = None
    """OpenAI's spelling: `{"name", "schema", "strict"}`."""


class MergedAdapters(_Body):
    ids: list[str] = Field(min_length=1)
    weights: list[float] = Field(min_length=1)
    merge_strategy: Literal["linear", "ties", "dare_linear", "dare_ties"] = "linear"
    density: float = Field(default=1.0, gt=0, le=1)
    majority_sign_method: Literal["total", "frequency"] = "total"


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
    truncate: int | None = Field(default=None, gt=0)
    return_full_text: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_k_alternatives: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    top_n_tokens: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """TGI's name for `return_k_alternatives`."""
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _one_adapter_kind(self) -> GenerateParameters:
        if self.adapter_id and self.merged_adapters is not None:
            raise ValueError("give at most one of `adapter_id` and `merged_adapters`")
        return self


class GenerateRequest(_Body):
    inputs: str = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class TokenizeRequest(_Body):
    inputs: str


class StreamOptions(_Body):
    include_usage: bool = False


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
    user: str | None = None
    # Extensions beyond OpenAI's fields (vLLM and LoRAX accept them too).
    top_k: int | None = Field(default=None, gt=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    ignore_eos: bool = False
    adapter_source: Literal["hub", "local", "s3"] | None = None
    api_token: str | None = None

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


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class AdapterAdminRequest(_Body):
    adapter_id: str = Field(min_length=1)
    adapter_source: Literal["hub", "local", "s3"] | None = None
    api_token: str | None = None
