"""Building blocks of the decoder: norms, rotary embeddings, packed linears, the gated MLP."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from loraplex.model import gemm
from loraplex.model.quant import QuantizedWeight


class RMSNorm(nn.Module):
    """RMS norm computed in float32. `offset` is 1.0 for Gemma, whose checkpoints store `weight - 1`."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self._effective: torch.Tensor | None = None

    def finalize(self) -> None:
        """Fold the offset into a float32 weight once the checkpoint is loaded."""
        self._effective = self.weight.detach().float() + self.offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self._effective is not None, "RMSNorm used before finalize()"
        return F.rms_norm(x.float(), (x.shape[-1],), self._effective, self.eps).to(x.dtype)


_deferred = contextvars.ContextVar("deferred_linear_weights", default=False)


@contextlib.contextmanager
def deferred_weights() -> Iterator[None]:
    """PackedLinears built inside hold no float weight until a checkpoint tensor first arrives for them
    (`load_shard`): a loader that quantizes each layer as soon as it is complete then never holds the whole
    model in float (the load's peak is the quantized model plus a layer or two in float)."""
    token = _deferred.set(True)
    try:
        yield
    finally:
        _deferred.reset(token)


class PackedLinear(nn.Module):
    """A linear layer whose output concatenates several checkpoint projections (q|k|v or gate|up).

    `shard_sizes` gives each projection's output width; checkpoints that store the projections
    separately load shard by shard, fused checkpoints (Phi-3) load whole. Weights load as
    `[out, in]` like the checkpoint, then `finalize()` stores them for the linear backend
    (`loraplex.model.gemm`): transposed, `[in, out]`, for ATen (CPU GEMMs at decode batch sizes run up to
    2x faster on that layout than on `[out, in]`), or prepacked for oneDNN.
    """

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.shard_sizes = shard_sizes
        self.shard_offsets = [sum(shard_sizes[:i]) for i in range(len(shard_sizes))]
        out = sum(shard_sizes)
        self.deferred = _deferred.get()  # the float weight allocated by the first load_shard
        self.weight = nn.Parameter(torch.empty(0 if self.deferred else (out, in_features)), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out), requires_grad=False) if bias else None
        self.weight_t: torch.Tensor | None = None  # [in, out], aten backend
        self.packed: torch.Tensor | None = None  # the weight prepacked, onednn backend
        self.quantized: QuantizedWeight | None = None  # the weight quantized (loraplex.model.quant), replacing the others

    def load_shard(self, param: nn.Parameter, tensor: torch.Tensor, shard: int | None) -> None:
        if self.deferred and param is self.weight:
            self.deferred = False
            param.data = torch.empty(sum(self.shard_sizes), self.in_features, dtype=param.dtype, device=param.device)
        if shard is None:
            target = param.data
        else:
            start = self.shard_offsets[shard]
            target = param.data[start:start + self.shard_sizes[shard]]
        if target.shape != tensor.shape:
            raise ValueError(f"checkpoint tensor of shape {tuple(tensor.shape)} does not fit "
                             f"a parameter slice of shape {tuple(target.shape)}")
        target.copy_(tensor)

    def finalize(self, backend: str = "aten") -> None:
        """Store the loaded weight for `backend` (`aten` or `onednn`, see `loraplex.model.gemm`)."""
        if backend == "onednn":
            self.packed = gemm.prepack(self.weight.data)
        else:
            self.weight_t = self.weight.data.t().contiguous()
        # The [out, in] copy is no longer needed; keep an empty placeholder so the parameter name stays.
        self.weight.data = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def use_quantized(self, weight: QuantizedWeight) -> None:
        """Multiply with `weight` (quantized) from now on; the float copies are dropped."""
        self.quantized, self.weight_t, self.packed = weight, None, None

    def dense_t(self) -> torch.Tensor:
        """The weight as `[in, out]` whatever the backend (built anew for onednn and quantized: for rare uses)."""
        if self.weight_t is not None:
            return self.weight_t
        if self.quantized is not None:
            return self.quantized.dense_t().to(self.dtype)
        assert self.packed is not None, "PackedLinear used before finalize()"
        return gemm.unpack_t(self.packed, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return gemm.linear(x, self.packed, self.bias)
        if self.quantized is not None:
            return self.quantized.linear(x, self.bias)
        assert self.weight_t is not None, "PackedLinear used before finalize()"
        if self.bias is None:
            return x @ self.weight_t
        return torch.addmm(self.bias, x, self.weight_t)


class Linear(PackedLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, [out_features], bias)


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, activation: str, bias: bool) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = PackedLinear(hidden, [intermediate, intermediate], bias)
        self.down_proj = Linear(intermediate, hidden, bias)
        self.act = ACT2FN[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)  # [tokens, inter] each
        return self.down_proj(self.act(gate) * up)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, rotate-half layout, with the rope scaling variants of HF transformers.

    The inverse frequencies come from transformers' own `ROPE_INIT_FUNCTIONS`, so every scaling type
    they define (linear, llama3, yarn, longrope, dynamic) means the same here. cos/sin are
    precomputed for every position up to `max_positions`.
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, hf_config: Any, head_dim: int, max_positions: int) -> None:
        super().__init__()
        params = dict(getattr(hf_config, "rope_parameters", None) or {})
        rope_type = params.get("rope_type", "default")
        partial = params.get("partial_rotary_factor") or getattr(hf_config, "partial_rotary_factor", None) or 1.0
        self.rotary_dim = int(head_dim * partial)
        positions = torch.arange(max_positions, dtype=torch.float32)
        if rope_type == "default":
            base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float32) / self.rotary_dim))
            cos, sin = self._tables(positions, inv_freq, 1.0)
        elif rope_type == "longrope":
            # Phi-3: short factors within the original context, long factors beyond it.
            original = getattr(hf_config, "original_max_position_embeddings", None) or params.get(
                "original_max_position_embeddings", max_positions)
            short_f, scale = ROPE_INIT_FUNCTIONS[rope_type](hf_config, None, seq_len=1)
            long_f, _ = ROPE_INIT_FUNCTIONS[rope_type](hf_config, None, seq_len=original + 1)
            cos_s, sin_s = self._tables(positions, short_f, scale)
            cos_l, sin_l = self._tables(positions, long_f, scale)
            self.long_from = int(original)
            cos = torch.cat([cos_s, cos_l])
            sin = torch.cat([sin_s, sin_l])
        elif rope_type in ROPE_INIT_FUNCTIONS:
            # dynamic NTK is evaluated once at the longest supported length (as vLLM does).
            inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](hf_config, None, seq_len=max_positions)
            cos, sin = self._tables(positions, inv_freq, scale)
        else:
            raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, "
                             f"{', '.join(sorted(ROPE_INIT_FUNCTIONS))}")
        self.rope_type = rope_type
        self.max_positions = max_positions
        self.register_buffer("cos", cos, persistent=False)  # [positions, rotary_dim]
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def _tables(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.outer(positions, inv_freq.float())  # [positions, rotary_dim / 2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * scale, emb.sin() * scale

    def lookup(self, positions: torch.Tensor, seq_lens_over: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows `[tokens, rotary_dim]` for `positions`; for longrope, `seq_lens_over` marks
        tokens whose sequence has outgrown the original context (they take the long table)."""
        index = positions
        if self.rope_type == "longrope" and seq_lens_over is not None:
            index = positions + seq_lens_over.long() * self.max_positions
        return self.cos[index], self.sin[index]

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [tokens, heads, head_dim]; cos/sin: [tokens, rotary_dim] in x's dtype."""
        cos = cos.unsqueeze(1)
        sin = sin.unsqueeze(1)
        rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        half = self.rotary_dim // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        out = rot * cos + rotated * sin
        return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out
