"""One config-driven decoder for the Llama family of architectures (see registry.py for the table)."""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loraplex.model import gemm
from loraplex.model.attention import PagedAttention, paged_attention
from loraplex.model.context import get_forward_context
from loraplex.model.layers import GatedMLP, Linear, PackedLinear, RMSNorm, RotaryEmbedding
from loraplex.model.registry import arch_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecoderConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    activation: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    norm_offset: float
    scale_embeddings: bool
    tie_embeddings: bool
    layer_windows: tuple[int | None, ...]
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, hf: Any) -> DecoderConfig:
        name, spec = arch_spec(getattr(hf, "architectures", None))
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        window = getattr(hf, "sliding_window", None)
        layer_types = getattr(hf, "layer_types", None)
        if layer_types:
            windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
        elif spec.sliding_window:
            windows = (window,) * hf.num_hidden_layers
        else:
            windows = (None,) * hf.num_hidden_layers
        attention_bias = bool(getattr(hf, "attention_bias", False))
        return cls(
            architecture=name,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate_size=hf.intermediate_size,
            rms_norm_eps=hf.rms_norm_eps,
            activation=getattr(hf, "hidden_activation", None) or hf.hidden_act,
            qkv_bias=spec.qkv_bias if spec.qkv_bias is not None else attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=spec.qk_norm,
            norm_offset=spec.norm_offset,
            scale_embeddings=spec.scale_embeddings,
            tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            layer_windows=windows,
            max_position_embeddings=hf.max_position_embeddings,
        )


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.split = [q_size, kv_size, kv_size]
        self.qkv_proj = PackedLinear(cfg.hidden_size, self.split, cfg.qkv_bias)
        self.o_proj = Linear(q_size, cfg.hidden_size, cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.window = cfg.layer_windows[layer]
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.attend: PagedAttention = paged_attention  # CausalLM.use_attention picks the backend
    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)      # [tokens, heads, head_dim]
        k = k.view(tokens, self.num_kv_heads, self.head_dim)   # [tokens, kv_heads, head_dim]
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope.rotate(q, cos, sin), rope.rotate(k, cos, sin)
        ctx = get_forward_context()
        k_cache, v_cache = ctx.kv_cache.layer(self.layer)
        out = self.attend(q, k, v, k_cache, v_cache, ctx.attn, self.scale, self.window)
        return self.o_proj(out.reshape(tokens, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.activation, cfg.mlp_bias)

    def forward(self, h: torch.Tensor, rope: RotaryEmbedding, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    """Named like HF's `model.` submodule so checkpoint names map one to one."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)


class CausalLM(nn.Module):
    def __init__(self, cfg: DecoderConfig, hf_config: Any, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, False)
        self.rope = RotaryEmbedding(hf_config, cfg.head_dim, max_positions)
        self.embed_scale = math.sqrt(cfg.hidden_size) if cfg.scale_embeddings else None
        self.lora_head: nn.Module | None = None
        """Installed by the LoRA manager once an adapter targets lm_head."""

    def use_attention(self, attend: PagedAttention) -> None:
        """Run every layer's paged attention with `attend` (loraplex.model.attention.attention_op)."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.attend = attend

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                long_rope: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: [tokens] → hidden states [tokens, hidden] (final norm applied)."""
        h = self.model.embed_tokens(input_ids)
        if self.embed_scale is not None:
            # Gemma rounds the scale to the activation dtype before multiplying.
            h = h * torch.tensor(self.embed_scale, dtype=h.dtype)
        cos, sin = self.rope.lookup(positions, long_rope)
        # Once per forward rather than per layer: the tables are float32, the activations may not be.
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        for layer in self.model.layers:
            h = layer(h, self.rope, cos, sin)
        return self.model.norm(h)

    def base_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The base LM head alone (no adapter's), float32: what Medusa heads that share it read through."""
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        return torch.nn.functional.linear(hidden, self.model.embed_tokens.weight).float()

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The base LM head for drafts (Medusa heads that share it), float32 out. A draft needs only its top
        token and verification decides what is kept, so a float32 model on a CPU that multiplies bfloat16
        natively reads a bfloat16 copy of the head (`_draft_head`): half the bytes per step (the demo model,
        4 rows: 1.0 ms instead of 2.5). Elsewhere `base_logits`."""
        if self._draft_head is None:
            return self.base_logits(hidden)
        return gemm.linear(hidden.to(torch.bfloat16), self._draft_head, None).float()

    @functools.cached_property
    def _draft_head(self) -> torch.Tensor | None:
        """`draft_logits`' bfloat16 prepacked head, made on first use; None where bfloat16 is not native."""
        weight = self.model.embed_tokens.weight
        if weight.dtype != torch.float32 or not gemm.bf16_native(weight.device):
            return None
        plain = weight if self.lm_head is None else self.lm_head.dense_t().t()
        packed = gemm.prepack(plain.to(torch.bfloat16))
        log.info("Medusa drafts read a bfloat16 copy of the LM head (%.0f MiB)", packed.numel() * 2 / 2**20)
        return packed

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [rows, hidden] → logits [rows, vocab] in float32 (call inside the forward context)."""
        if self.lm_head is not None:
            logits = self.lm_head(hidden)
        else:
            logits = torch.nn.functional.linear(hidden, self.model.embed_tokens.weight)
        if self.lora_head is not None:
            logits = self.lora_head(logits, hidden)
        return logits.float()
