"""Next-token sampling for the engine's step loop."""

from loraplex.sampling.sampler import (
    Sampler,
    SamplerOutput,
    apply_filters,
    apply_penalties,
    apply_temperature,
)

__all__ = ["Sampler", "SamplerOutput", "apply_filters", "apply_penalties", "apply_temperature"]
