"""Next-token sampling for the engine's step loop."""

from loraplex.sampling.penalties import apply_penalties
from loraplex.sampling.sampler import (
    LOGPROB_FLOOR,
    MIN_TEMPERATURE,
    Sampler,
    SamplerOutput,
    apply_filters,
    apply_temperature,
)

__all__ = ["LOGPROB_FLOOR", "MIN_TEMPERATURE", "Sampler", "SamplerOutput", "apply_filters", "apply_penalties", "apply_temperature"]
