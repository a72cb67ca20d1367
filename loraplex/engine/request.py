"""Requests, sampling parameters and outputs: the vocabulary shared by the engine, the API and users."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256
MAX_LOGPROBS = 20


class FinishReason(enum.StrEnum):
    """Why a sequence stopped; values are the native API's `finish_reason` strings."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    ABORTED = "aborted"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop. Validated at construction (ValueError names the value).

    `temperature == 0` means greedy; the sampling filters then do not apply. Penalties follow the
    usual definitions: `repetition_penalty` as in HF transformers (over prompt and output tokens),
    `frequency_penalty` / `presence_penalty` as in the OpenAI API (over output tokens only).
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    """Same seed, same prompt, same parameters: the same tokens, alone or batched with others."""
    stop: tuple[str, ...] = ()
    """Stop strings; the output text ends before the first one found."""
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    """None: no logprobs. k >= 0: the chosen token's logprob plus the k most likely alternatives."""
    watermark: bool = False
    """Bias sampling towards a token-dependent "green" half of the vocabulary so the text can be detected
    as machine-generated (Kirchenbauer et al. 2023; gamma 0.5, delta 2.0 as in TGI)."""
    prompt_logprobs: bool = False
    """Also report each prompt token's logprob given the tokens before it (the first has none)."""
    skip_special_tokens: bool = True
    json_schema: str | None = None
    """Constrain the output to JSON matching this JSON schema (text; `{"type": "object"}` = any object).
    The sequence ends as soon as the JSON is complete, even with `ignore_eos`."""
    speculate: bool = True
    """Whether this request drafts tokens when the server runs speculative decoding. Drafts never change the
    output; a request whose text copies and repeats nothing may turn them off to spare the verification."""

    def __post_init__(self) -> None:
        # Accept lists from callers; store tuples so the params stay hashable and immutable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0,
               f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        _check(_finite(self.temperature) and self.temperature >= 0,
               f"temperature must be >= 0, got {self.temperature!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               f"top_k must be an integer >= 0 (0 disables), got {self.top_k!r}")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_finite(self.typical_p) and 0 < self.typical_p <= 1,
               f"typical_p must be in (0, 1], got {self.typical_p!r}")
        _check(_finite(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _check(_finite(value) and -2 <= value <= 2, f"{name} must be in [-2, 2], got {value!r}")
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
               f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        _check(len(self.stop) <= MAX_STOP_SEQUENCES,
               f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(self.stop)}")
        for s in self.stop:
            _check(isinstance(s, str) and 0 < len(s) <= MAX_STOP_SEQUENCE_CHARS,
                   f"stop sequences must be non-empty strings of at most {MAX_STOP_SEQUENCE_CHARS} "
                   f"characters, got {s!r}")
        for t in self.stop_token_ids:
            _check(isinstance(t, int) and t >= 0, f"stop_token_ids must be integers >= 0, got {t!r}")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
               f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.json_schema is not None:
            # Imported here: the sampling package imports this module.
            from loraplex.sampling.structured import check_json_schema

            check_json_schema(self.json_schema)
        # Not a field: read by the sampler for every row at every step, so computed once.
        object.__setattr__(self, "plain_greedy", self.greedy and self.logprobs is None and not self.penalized)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether a penalty or the watermark changes the logits."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or self.watermark)

    plain_greedy: bool = field(init=False, repr=False, compare=False, default=False)
    """Greedy with no penalty and no logprobs: the token is the argmax of the raw logits."""


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's logprob and, when asked, the most likely alternatives at that step."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token_id, logprob) pairs, most likely first."""


@dataclass(slots=True)
class RequestOutput:
    """What the engine reports for a request: cumulative so far, `finished` once it is done."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[float | None] | None = None
    """With `params.prompt_logprobs`: per prompt token, its logprob given the ones before (None for the first)."""
    seed: int | None = None
    """The seed actually used (drawn at random when the request gave none)."""
    prompt: str | None = None
    error: Exception | None = None
    draft_tokens: int = 0
    """Speculative decoding: draft tokens proposed for this request so far."""
    accepted_draft_tokens: int = 0
    """Of those, the ones accepted (each one a step saved)."""
    verify_steps: int = 0
    """Steps that verified drafts of this request."""
    """Why the request failed (finished without output), e.g. an AdapterError when its adapter could not load."""
