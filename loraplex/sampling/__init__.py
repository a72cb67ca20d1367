"""Next-token sampling for the engine's step loop."""

from loraplex.sampling.filters import MIN_TEMPERATURE, apply_filters, apply_temperature
from loraplex.sampling.penalties import apply_penalties
from loraplex.sampling.sampler import LOGPROB_FLOOR, Sampler, SamplerOutput

__all__ = ["LOGPROB_FLOOR", "MIN_TEMPERATURE", "Sampler", "SamplerOutput", "apply_filters", "apply_penalties", "apply_temperature"]
