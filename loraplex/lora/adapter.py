"""Read and validate a PEFT LoRA adapter folder into per-module float32 LoRA weights.

A PEFT adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (or a legacy
`adapter_model.bin`). PEFT names each tensor after the module it wraps, relative to the wrapped
HF model, behind a `base_model.model.` prefix:

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight      A  [r, in_features]
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight      B  [out_features, r]
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector   DoRA m  [out_features]
    base_model.model.lm_head.lora_A.weight                              (lm_head likewise)

The module key (`model.layers.0.self_attn.q_proj`) is what the config's `target_modules`,
`rank_pattern` and `alpha_pattern` match against. loraplex keys the result by (layer, target)
with the seven unfused targets of LAYER_TARGETS: a fused Phi-3 `qkv_proj` / `gate_up_proj` adapter
has its B (and DoRA magnitude) rows split into the q|k|v or gate|up shards, each shard sharing A,
so downstream code sees one shape convention whatever the checkpoint layout.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from loraplex.model.decoder import DecoderConfig

if TYPE_CHECKING:
    from loraplex.lora.medusa import MedusaHeads

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"

LAYER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_TARGETS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "qkv_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp", "gate_up_proj": "mlp"}

_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\."
                     r"(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$")
_LAYER_MODULE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<parent>self_attn|mlp)\.(?P<proj>\w+)$")
# PEFT saves a copy of the (frozen) base embedding / lm_head weights when lm_head is targeted.
_BASE_COPY = re.compile(r"^(?:base_model\.model\.)?(?:lm_head|model\.embed_tokens)(?:\.base_layer)?\.weight$")

# LoraConfig fields that change the math in ways loraplex does not implement: rejected unless unset.
_UNSUPPORTED_FIELDS = ("modules_to_save", "use_qalora", "lora_bias", "target_parameters", "layer_replication",
                       "alora_invocation_tokens", "megatron_config", "trainable_token_indices", "use_bdlora",
                       "arrow_config", "kasa_config", "velora_config", "monteclora_config")
# Fields that loraplex reads (checked below), and training/init-only fields with no effect on inference.
_HANDLED_FIELDS = ("peft_type", "task_type", "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules",
                   "fan_in_fan_out", "bias", "rank_pattern", "alpha_pattern", "layers_to_transform",
                   "layers_pattern", "use_dora", "init_lora_weights")
_IGNORED_FIELDS = ("lora_dropout", "inference_mode", "revision", "base_model_name_or_path", "peft_version",
                   "auto_mapping", "megatron_core", "qalora_group_size", "loftq_config", "eva_config",
                   "corda_config", "lora_ga_config", "runtime_config", "ensure_weight_tying")
# These initialisations subtract B·A from the base weights, so the adapter only fits that residual base
# (until PEFT converts it with `path_initial_model_for_weight_conversion`, which resets the field).
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_FLOAT32_MAX = torch.finfo(torch.float32).max
_MAX_RANK = 1 << 20  # far above any real LoRA; bounds what a config may claim before any shape is checked


class AdapterError(Exception):
    """Base of the errors raised for an adapter that cannot be served."""


class AdapterNotFound(AdapterError):
    """The adapter folder does not exist."""


class AdapterInvalid(AdapterError):
    """The adapter exists but its config or weights are unusable; the message names the culprit."""


class AdapterAccessDenied(AdapterError):
    """The adapter's source refused the credentials given (or needs some): HTTP 401/403."""


class AdapterFetchError(AdapterError):
    """The adapter's source could not be reached or failed mid-transfer (HTTP 424); the cause is chained."""


@dataclass(frozen=True)
class LoRAModule:
    """One adapted linear: delta(x) = scale · (x · aᵀ) · bᵀ (DoRA rescales rows by `magnitude`)."""

    a: torch.Tensor                 # [rank, in_features] float32
    b: torch.Tensor                 # [out_features, rank] float32
    scale: float
    magnitude: torch.Tensor | None  # [out_features] float32, DoRA only

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class AdapterWeights:
    path: Path
    config: Mapping[str, Any]                     # adapter_config.json as read
    rank: int                                     # the largest rank of any module
    use_dora: bool
    layers: Mapping[tuple[int, str], LoRAModule]  # (layer index, target in LAYER_TARGETS) → weights
    lm_head: LoRAModule | None
    size_bytes: int                               # bytes of the tensors held (packed slot rows included)
    packed: Any = field(default=None, compare=False, repr=False)
    """The slot rows of each wrapped layer (`LoRAManager.prepare`), built once off the step loop."""
    medusa: MedusaHeads | None = field(default=None, compare=False, repr=False)
    """Medusa heads the adapter carries for speculative decoding (loraplex/lora/medusa.py)."""
    targets: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", frozenset(t for _, t in self.layers))

    @functools.cached_property
    def content_hash(self) -> str:
        """sha256 over the config and every tensor: equal for the same adapter, whatever its file layout.
        Computed on first use only: hashing takes as long as parsing, and loading never needs it."""
        hasher = hashlib.sha256(json.dumps(dict(self.config), sort_keys=True, default=str).encode())
        modules = sorted(self.layers.items()) + ([((-1, "lm_head"), self.lm_head)] if self.lm_head else [])
        for key, module in modules:
            hasher.update(repr(key).encode())
            for t in (module.a, module.b, module.magnitude):
                if t is not None:
                    hasher.update(t.contiguous().numpy().tobytes())
        if self.medusa is not None:
            hasher.update(b"medusa")
            for t in [t for head in self.medusa.blocks for block in head for t in block] + list(self.medusa.out or ()):
                hasher.update(t.contiguous().numpy().tobytes())
        return hasher.hexdigest()


def load_adapter(path: Path, base: DecoderConfig, max_rank: int | None = None) -> AdapterWeights:
    """Read the PEFT LoRA adapter folder `path` for a model shaped like `base`.

    Raises AdapterNotFound when the folder is missing and AdapterInvalid (naming the file, config field,
    tensor or module) when anything in it would not give PEFT's result on this base model.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterNotFound(f"adapter folder {path} does not exist")
    # Imported here: the Medusa module reads this module's errors.
    from loraplex.lora.medusa import has_medusa, load_medusa

    medusa = load_medusa(path, base) if has_medusa(path) else None
    if medusa is not None and not (path / CONFIG_FILE).is_file():  # Medusa heads alone: no LoRA
        return AdapterWeights(path=path, config=MappingProxyType({}), rank=0, use_dora=False,
                              layers=MappingProxyType({}), lm_head=None, size_bytes=medusa.size_bytes, medusa=medusa)
    _, config = _read_config(path)
    _check_config(config)
    weights_file, weights_bytes = _read_weights_file(path)
    tensors = _parse_weights(weights_file, weights_bytes)

    use_dora = bool(config.get("use_dora"))
    parts = _group_by_module(tensors, base, use_dora)
    layers: dict[tuple[int, str], LoRAModule] = {}
    lm_head = None
    size = 0
    for module_key, found in parts.items():
        if not _is_targeted(config, module_key):
            raise AdapterInvalid(f"{weights_file.name} has weights for {module_key}, which target_modules "
                                 f"{config.get('target_modules')!r} of {CONFIG_FILE} does not select")
        in_features, shards = _module_shape(module_key, base)
        rank, scale = _rank_and_scale(config, module_key)
        if max_rank is not None and rank > max_rank:
            raise AdapterInvalid(f"module {module_key} has rank {rank}, above the server's max_rank {max_rank}")
        a, b, magnitude = found["lora_A"], found["lora_B"], found.get("magnitude")
        out_features = sum(rows for _, rows in shards)
        _check_shape(module_key, "lora_A", a, (rank, in_features), "[r, in_features]")
        _check_shape(module_key, "lora_B", b, (out_features, rank), "[out_features, r]")
        if magnitude is not None:
            _check_shape(module_key, "lora_magnitude_vector", magnitude, (out_features,), "[out_features]")
        # The slot buffers hold scale·B in float32 (lora.layers): it must not overflow there.
        if b.numel() and abs(scale) * float(b.abs().max()) > _FLOAT32_MAX:
            raise AdapterInvalid(f"lora_B of {module_key} times its scale {scale:g} (lora_alpha / r) overflows "
                                 "float32")
        size += sum(t.numel() * 4 for t in (a, b, magnitude) if t is not None)
        if module_key == "lm_head":
            lm_head = LoRAModule(a, b, scale, magnitude)
            continue
        layer = int(module_key.split(".")[2])
        start = 0
        for target, rows in shards:
            mag = None if magnitude is None else magnitude[start:start + rows]
            layers[(layer, target)] = LoRAModule(a, b[start:start + rows], scale, mag)
            start += rows
    ranks = [m.rank for m in layers.values()] + ([lm_head.rank] if lm_head else [])
    return AdapterWeights(path=path, config=MappingProxyType(config), rank=max(ranks), use_dora=use_dora,
                          layers=MappingProxyType(layers), lm_head=lm_head,
                          size_bytes=size + (medusa.size_bytes if medusa is not None else 0), medusa=medusa)


def _read_config(path: Path) -> tuple[bytes, dict[str, Any]]:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise AdapterInvalid(f"adapter {path} has no {CONFIG_FILE}")
    data = file.read_bytes()
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterInvalid(f"{file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterInvalid(f"{file} must hold a JSON object, not {type(config).__name__}")
    return data, config


def _check_config(config: dict[str, Any]) -> None:
    def invalid(name: str, why: str) -> AdapterInvalid:
        return AdapterInvalid(f"{CONFIG_FILE}: {name}={config.get(name)!r} {why}")

    if config.get("peft_type") != "LORA":
        raise invalid("peft_type", "is not supported; loraplex serves LORA adapters")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise invalid("task_type", "is not supported; loraplex serves CAUSAL_LM adapters")
    if config.get("bias", "none") != "none":
        raise invalid("bias", "is not supported (adapters that train biases); only 'none' is")
    for name in _UNSUPPORTED_FIELDS:
        if config.get(name):
            raise invalid(name, "is not supported by loraplex")
    # fan_in_fan_out needs no handling: it only says the base weight is stored [in, out] (GPT-2's Conv1D; PEFT
    # resets it for nn.Linear), while lora_A / lora_B are nn.Linear weights, [r, in] / [out, r], either way.
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        raise invalid("init_lora_weights", "means the adapter fits a base model PEFT modified at init; convert it "
                      "with save_pretrained(path_initial_model_for_weight_conversion=...) first")
    for name in config:
        if name not in _HANDLED_FIELDS + _UNSUPPORTED_FIELDS + _IGNORED_FIELDS and config[name]:
            raise invalid(name, "is a field loraplex does not know, so it cannot vouch for the adapter's math")
    if not _is_positive_int(config.get("r")):
        raise invalid("r", f"must be a positive integer of at most {_MAX_RANK}")
    if not _is_number(config.get("lora_alpha", 8)):
        raise invalid("lora_alpha", "must be a finite number within float32's range")
    for name, check in (("rank_pattern", _is_positive_int), ("alpha_pattern", _is_number)):
        pattern = config.get(name) or {}
        if not isinstance(pattern, dict) or not all(check(v) for v in pattern.values()):
            raise invalid(name, "must map module patterns to " + (
                f"positive integers of at most {_MAX_RANK}" if name == "rank_pattern"
                else "finite numbers within float32's range"))
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str | list):
        raise invalid("target_modules", "must be a list of names or a regex string")


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= _MAX_RANK


def _is_number(value: Any) -> bool:
    """A finite JSON number that float32 holds (JSON integers may be too large even for a Python float)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return abs(float(value)) <= _FLOAT32_MAX  # False for NaN and infinities too
    except OverflowError:
        return False


def _read_weights_file(path: Path) -> tuple[Path, bytes]:
    for name in (SAFETENSORS_FILE, BIN_FILE):
        if (path / name).is_file():
            return path / name, (path / name).read_bytes()
    raise AdapterInvalid(f"adapter {path} has no {SAFETENSORS_FILE} (nor a legacy {BIN_FILE})")


def _parse_weights(file: Path, data: bytes) -> dict[str, torch.Tensor]:
    if file.name == SAFETENSORS_FILE:
        try:
            return load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise AdapterInvalid(f"{file} is not a readable safetensors file: {e}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise AdapterInvalid(f"{file} is not a readable torch weights file: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise AdapterInvalid(f"{file} does not hold a mapping of tensor names to tensors")
    return state


def _group_by_module(tensors: dict[str, torch.Tensor], base: DecoderConfig,
                     use_dora: bool) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT tensor names → {module key: {"lora_A"|"lora_B"|"magnitude": float32 tensor}}, validated."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    lora_tensors: list[tuple[str, torch.Tensor]] = []
    for name, tensor in sorted(tensors.items()):  # sorted: the first error reported does not depend on file order
        if not tensor.is_floating_point():
            raise AdapterInvalid(f"tensor {name} has dtype {tensor.dtype}; LoRA weights must be floating point")
        if _BASE_COPY.match(name):
            # A copy of the frozen base layer; it must match the base model's shape and is not used.
            _check_shape(name, "base weight copy", tensor, (base.vocab_size, base.hidden_size), "[vocab, hidden]")
            continue
        match = _TENSOR.match(name)
        if match is None or not _maps_to_base(match["module"], base):
            raise AdapterInvalid(f"tensor {name} maps to no module of the base model ({base.architecture})")
        part = match["part"].split(".")[0].replace("lora_magnitude_vector", "magnitude")
        if part == "magnitude" and not use_dora:
            raise AdapterInvalid(f"tensor {name} is a DoRA magnitude but {CONFIG_FILE} does not set use_dora")
        module = parts.setdefault(match["module"], {})
        module[part] = tensor.float()
        lora_tensors.append((name, tensor))
    if not parts:
        raise AdapterInvalid("adapter weights hold no LoRA tensors (lora_A / lora_B)")
    _check_finite(lora_tensors)
    for module_key, found in parts.items():
        needed = ("lora_A", "lora_B", "magnitude") if use_dora else ("lora_A", "lora_B")
        missing = [p.replace("magnitude", "lora_magnitude_vector") for p in needed if p not in found]
        if missing:
            raise AdapterInvalid(f"module {module_key} lacks {', '.join(missing)} in the adapter weights")
    _check_no_overlap(parts)
    return parts


def _maps_to_base(module_key: str, base: DecoderConfig) -> bool:
    if module_key == "lm_head":
        return True
    match = _LAYER_MODULE.match(module_key)
    return (match is not None and int(match["layer"]) < base.num_layers
            and _PARENT.get(match["proj"]) == match["parent"])


def _check_finite(named: list[tuple[str, torch.Tensor]]) -> None:
    # A sum is finite exactly when every element is (short of overflowing float32, which no sane weight
    # does): one reduction per tensor and a single check is ~20x faster than isfinite() per tensor. Only
    # when it fails are tensors checked element-wise, to name the first bad one.
    if torch.stack([t.sum(dtype=torch.float32) for _, t in named]).isfinite().all():
        return
    bad = next((name for name, t in named if not torch.isfinite(t).all()), None)
    if bad is not None:  # else only a sum overflowed: every value is finite
        raise AdapterInvalid(f"tensor {bad} contains NaN or infinite values")


def _check_no_overlap(parts: dict[str, dict[str, torch.Tensor]]) -> None:
    seen: dict[tuple[str, str], str] = {}
    for module_key in parts:
        if module_key == "lm_head":
            continue
        prefix, _, proj = module_key.rpartition(".")
        for target in FUSED_TARGETS.get(proj, (proj,)):
            if (prefix, target) in seen:
                raise AdapterInvalid(f"modules {seen[(prefix, target)]} and {module_key} both adapt {target}")
            seen[(prefix, target)] = module_key


def _module_shape(module_key: str, base: DecoderConfig) -> tuple[int, list[tuple[str, int]]]:
    """in_features and the (target, out rows) shards of a module key already known to map to the base."""
    hidden, inter = base.hidden_size, base.intermediate_size
    q, kv = base.num_heads * base.head_dim, base.num_kv_heads * base.head_dim
    if module_key == "lm_head":
        return hidden, [("lm_head", base.vocab_size)]
    outs = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": hidden, "gate_proj": inter, "up_proj": inter,
            "down_proj": hidden}
    ins = {"o_proj": q, "down_proj": inter}
    proj = module_key.rpartition(".")[2]
    targets = FUSED_TARGETS.get(proj, (proj,))
    return ins.get(targets[0], hidden), [(t, outs[t]) for t in targets]


def _check_shape(module_key: str, part: str, tensor: torch.Tensor, expected: tuple[int, ...], layout: str) -> None:
    if tuple(tensor.shape) != expected:
        raise AdapterInvalid(f"{part} of {module_key} has shape {tuple(tensor.shape)}, but the base model needs "
                             f"{expected} ({layout})")


def _is_targeted(config: Mapping[str, Any], key: str) -> bool:
    """PEFT's `check_target_module_exists` (peft.tuners.tuners_utils) for one module key."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return True  # PEFT filled in its defaults for the architecture; the weights say which it chose
    if targets == "all-linear":
        return key != "lm_head"
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    indexes = config.get("layers_to_transform")
    if indexes is None or indexes == []:
        return True
    patterns = config.get("layers_pattern")
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match["idx"])
    return index == indexes if isinstance(indexes, int) else index in indexes


def _pattern_value(pattern: Mapping[str, Any], key: str, default: Any) -> Any:
    """PEFT's `get_pattern_key` (peft.utils.other): the first pattern that matches a dotted suffix of key."""
    for candidate in pattern:
        if re.match(rf"(.*\.)?({candidate})$", key):
            return pattern[candidate]
    return default


def _rank_and_scale(config: Mapping[str, Any], key: str) -> tuple[int, float]:
    rank = int(_pattern_value(config.get("rank_pattern") or {}, key, config["r"]))
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, key, config.get("lora_alpha", 8)))
    return rank, alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
