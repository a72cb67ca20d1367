"""loraplex: one resident base model, any number of LoRA adapters per request, batched together."""

from loraplex.engine.request import FinishReason, RequestOutput, SamplingParams, TokenLogprob
from loraplex.llm import LLM

__all__ = ["LLM", "FinishReason", "RequestOutput", "SamplingParams", "TokenLogprob"]
__version__ = "0.1.0"
