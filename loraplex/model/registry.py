"""Which Hugging Face architectures the decoder serves, and the options each one turns on.

Everything a checkpoint's config.json states (head_dim, attention_bias, sliding_window, activation,
rope scaling, tied embeddings …) is read from it; this table holds only what the architecture
implies without saying.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    qkv_bias: bool | None = None
    """Force q/k/v biases on (Qwen2); None reads `attention_bias` from the config."""
    qk_norm: bool = False
    """RMS-norm each head of q and k before rotary (Qwen3)."""
    norm_offset: float = 0.0
    """Norm weights are stored as `weight - offset` (Gemma: 1.0)."""
    scale_embeddings: bool = False
    """Multiply token embeddings by sqrt(hidden_size) (Gemma)."""
    sliding_window: bool = False
    """Honour `sliding_window` on every layer that `layer_types` does not mark otherwise (Mistral)."""


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(),
    "MistralForCausalLM": ArchSpec(sliding_window=True),
    "Qwen2ForCausalLM": ArchSpec(qkv_bias=True),
    "Qwen3ForCausalLM": ArchSpec(qk_norm=True),
    "GemmaForCausalLM": ArchSpec(norm_offset=1.0, scale_embeddings=True),
    "Phi3ForCausalLM": ArchSpec(),
}


class UnsupportedArchitecture(ValueError):
    pass


def arch_spec(architectures: list[str] | None) -> tuple[str, ArchSpec]:
    for name in architectures or []:
        if name in ARCHITECTURES:
            return name, ARCHITECTURES[name]
    raise UnsupportedArchitecture(
        f"unsupported architecture {architectures!r}; loraplex serves {', '.join(sorted(ARCHITECTURES))}")
