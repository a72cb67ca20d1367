"""Medusa heads carried by an adapter (speculative decoding's `medusa` drafts), in the format LoRAX serves.

An adapter folder (alone, or beside a PEFT LoRA's `adapter_config.json` / `adapter_model.safetensors`)
holds `config.json` with `medusa_num_heads` and `medusa_num_layers`, and `medusa_lm_head.safetensors` with,
for head i and block j < medusa_num_layers, `{i}.{j}.linear.weight` [hidden, hidden] and
`{i}.{j}.linear.bias` [hidden]: a residual block x + SiLU(W x + b). A head of *version 1* also has its own
output projection `{i}.{medusa_num_layers}.weight` [vocab, hidden]; a head of *version 2* (one block, no
such tensor) reads its logits through the base model's LM head. Given the final (normed) hidden state of
the position that picked token t + 1, head i proposes token t + 2 + i (Cai et al., 2024, "Medusa").

The heads only propose: every draft is verified by the model (loraplex/engine/speculative.py), so heads
that guess badly cost speed, never correctness.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loraplex.lora.adapter import AdapterInvalid

if TYPE_CHECKING:
    from loraplex.model.decoder import DecoderConfig

HEADS_FILE = "medusa_lm_head.safetensors"
CONFIG_FILE = "config.json"
MEDUSA_FILES = (CONFIG_FILE, HEADS_FILE)
"""The files of Medusa heads in an adapter folder (the remote sources fetch them with the LoRA's)."""
MAX_HEADS = 16
MAX_LAYERS = 8


@dataclass(frozen=True)
class MedusaHeads:
    blocks: tuple[tuple[tuple[torch.Tensor, torch.Tensor], ...], ...]
    """Per head, its residual blocks' (weight [hidden, hidden], bias [hidden])."""
    out: tuple[torch.Tensor, ...] | None
    """Per head, its output projection [vocab, hidden] (version 1); None: the base LM head (version 2)."""
    size_bytes: int

    @property
    def num_heads(self) -> int:
        return len(self.blocks)

    def to(self, device: torch.device, dtype: torch.dtype) -> MedusaHeads:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        return MedusaHeads(tuple(tuple((move(w), move(b)) for w, b in head) for head in self.blocks),
                           None if self.out is None else tuple(move(o) for o in self.out), self.size_bytes)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, hidden] → each head's hidden [heads, rows, hidden] (before the output projection)."""
        outs = []
        for head in self.blocks:
            h = x
            for w, b in head:
                h = h + torch.nn.functional.silu(torch.nn.functional.linear(h, w, b))
            outs.append(h)
        return torch.stack(outs)


def has_medusa(path: Path) -> bool:
    return (Path(path) / HEADS_FILE).is_file()


def load_medusa(path: Path, base: DecoderConfig) -> MedusaHeads:
    """The Medusa heads of adapter folder `path` for a model shaped like `base`. AdapterInvalid, naming the
    file and field or tensor, for anything that is not exactly the format (a wrong head count, a shape,
    a missing config)."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise AdapterInvalid(f"adapter has {HEADS_FILE} but no {CONFIG_FILE} (with medusa_num_heads, medusa_num_layers)")
    try:
        config = json.loads(config_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterInvalid(f"{CONFIG_FILE} of the Medusa heads is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterInvalid(f"{CONFIG_FILE} of the Medusa heads must be a JSON object")
    heads = _count(config, "medusa_num_heads", MAX_HEADS)
    layers = _count(config, "medusa_num_layers", MAX_LAYERS)
    hidden, vocab = base.hidden_size, base.vocab_size
    # Refused before it is read: the most the config's heads can take (float32, own output projections).
    most = heads * (layers * (hidden + 1) + vocab) * hidden * 4 + (1 << 20)
    try:
        size = (path / HEADS_FILE).stat().st_size
    except OSError as e:  # the reason alone: the message must not carry the server's paths
        raise AdapterInvalid(f"{HEADS_FILE} cannot be read: {e.strerror}") from None
    if size > most:
        raise AdapterInvalid(f"{HEADS_FILE} has {size} bytes, more than {heads} heads of {layers} layers take "
                             f"for this base model (at most {most})")
    try:
        tensors = load_file(str(path / HEADS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterInvalid(f"{HEADS_FILE} cannot be read as safetensors: {e}") from None
    v1 = f"0.{layers}.weight" in tensors
    expected = {f"{i}.{j}.linear.{p}" for i in range(heads) for j in range(layers) for p in ("weight", "bias")}
    if v1:
        expected |= {f"{i}.{layers}.weight" for i in range(heads)}
    elif layers != 1:
        raise AdapterInvalid(f"{HEADS_FILE} has no output projection {layers}-th tensor ('0.{layers}.weight'): "
                             f"heads sharing the LM head (version 2) have medusa_num_layers 1, not {layers}")
    missing, extra = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or extra:
        raise AdapterInvalid(f"{HEADS_FILE} does not match medusa_num_heads {heads}, medusa_num_layers {layers}: "
                             + "; ".join(part for part in (f"missing {', '.join(missing[:4])}" if missing else "",
                                                           f"unexpected {', '.join(extra[:4])}" if extra else "")
                                         if part))
    for name, t in tensors.items():
        shape = (hidden,) if name.endswith("bias") else (vocab, hidden) if not name.endswith("linear.weight") else (
            hidden, hidden)
        if tuple(t.shape) != shape:
            raise AdapterInvalid(f"{HEADS_FILE}: {name} has shape {list(t.shape)}, expected {list(shape)} for this "
                                 f"base model (hidden {hidden}, vocab {vocab})")
        if not t.is_floating_point():
            raise AdapterInvalid(f"{HEADS_FILE}: {name} is {t.dtype}, expected a floating-point tensor")
        if not bool(torch.isfinite(t).all()):
            raise AdapterInvalid(f"{HEADS_FILE}: {name} has non-finite values")
    blocks = tuple(tuple((tensors[f"{i}.{j}.linear.weight"].float(), tensors[f"{i}.{j}.linear.bias"].float())
                         for j in range(layers)) for i in range(heads))
    out = tuple(tensors[f"{i}.{layers}.weight"].float() for i in range(heads)) if v1 else None
    return MedusaHeads(blocks, out, sum(t.numel() * 4 for t in tensors.values()))


def _count(config: dict[str, object], field: str, most: int) -> int:
    value = config.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise AdapterInvalid(f"{CONFIG_FILE}: {field} must be an integer from 1 to {most}, got {value!r}")
    return value


def medusa_tensors(heads: int, layers: int, hidden: int, vocab: int | None, generator: torch.Generator | None = None,
                   std: float = 0.0) -> dict[str, torch.Tensor]:
    """Tensors of a Medusa head set in the file's naming (`vocab` None: version 2), random normal with `std`
    (0: the zero-initialised heads training starts from). Tests and the training script write files with it."""
    out: dict[str, torch.Tensor] = {}
    scale = std / math.sqrt(hidden) if std else 0.0
    for i in range(heads):
        for j in range(layers):
            out[f"{i}.{j}.linear.weight"] = torch.randn(hidden, hidden, generator=generator) * scale
            out[f"{i}.{j}.linear.bias"] = torch.randn(hidden, generator=generator) * scale
        if vocab is not None:
            out[f"{i}.{layers}.weight"] = torch.randn(vocab, hidden, generator=generator) * (std or 1.0) / math.sqrt(hidden)
    return out
