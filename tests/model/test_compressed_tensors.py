"""compressed-tensors checkpoints (loraplex/model/compressed_tensors.py) against the library itself: the
checkpoints are written by `compressed-tensors` (tests/model/ct_fixtures.py: its quantization, its
compressors, its save path), and every decoded weight must equal the library's own decompression. A whole
model then generates, with and without an adapter, exactly as its float twin holding those weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from loraplex import LLM, SamplingParams
from loraplex.model.errors import CheckpointError
from loraplex.model.layers import PackedLinear
from loraplex.model.loader import open_checkpoint
from loraplex.model.quant import Int4Weight
from tests.helpers import TINY, save_tiny
from tests.lora.peft_fixtures import make_adapter
from tests.model.test_prequantized import assert_generates_as, assert_keeps_the_checkpoint_grid

pytest.importorskip("compressed_tensors")
from tests.model.ct_fixtures import CT_SCHEMES, library_dequantized_weights, write_compressed_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def float_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(LlamaConfig(**TINY), tmp_path_factory.mktemp("float") / "m")


def _decoded(folder: Path) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in open_checkpoint(folder).tensors}


@pytest.mark.parametrize("scheme", sorted(CT_SCHEMES))
def test_every_layer_decodes_to_the_librarys_own_weights(float_model: Path, tmp_path: Path, scheme: str) -> None:
    folder = write_compressed_checkpoint(float_model, tmp_path / scheme, scheme)
    want = library_dequantized_weights(folder)
    got = _decoded(folder)
    assert len(want) == 7 * TINY["num_hidden_layers"]
    for name, weight in want.items():
        assert torch.equal(got[name], weight), name
    # The layers left in float (embeddings, norms, the LM head) come through as they were.
    original = load_file(float_model / "model.safetensors")
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(got[name], original[name])


def test_bfloat16_scales_decode_within_one_bfloat16_rounding(float_model: Path, tmp_path: Path) -> None:
    folder = write_compressed_checkpoint(float_model, tmp_path / "bf16", "w4a16-asym", dtype=torch.bfloat16)
    want = library_dequantized_weights(folder)  # the library multiplies in bfloat16; loraplex in float32
    got = _decoded(folder)
    for name, weight in want.items():
        torch.testing.assert_close(got[name], weight, rtol=2 ** -8, atol=0)


def float_twin(float_model: Path, folder: Path, twin: Path) -> Path:
    """`float_model` holding the weights the library decodes from the compressed checkpoint `folder`."""
    twin.mkdir()
    tensors = load_file(float_model / "model.safetensors") | library_dequantized_weights(folder)
    save_file({k: v.contiguous() for k, v in tensors.items()}, twin / "model.safetensors")
    (twin / "config.json").write_text((float_model / "config.json").read_text())
    return twin


def test_a_compressed_model_with_an_adapter_generates_as_its_float_twin(float_model: Path, tmp_path: Path) -> None:
    folder = write_compressed_checkpoint(float_model, tmp_path / "w4", "w4a16-asym")
    twin = float_twin(float_model, folder, tmp_path / "twin")
    adapter = str(make_adapter(float_model, tmp_path / "a", LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "v_proj", "down_proj"]), seed=3))
    prompts = [[(9 * i + j) % 500 + 1 for j in range(6 + i)] for i in range(4)]
    ids = [None, adapter, None, adapter]
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
    got = LLM(str(folder), device="cpu", max_loras=1, max_lora_rank=4).generate(prompts, params, adapter_id=ids)
    want = LLM(str(twin), device="cpu", max_loras=1, max_lora_rank=4).generate(prompts, params, adapter_id=ids)
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        # Same weights; the two engines' kernels may still sum in another order (a few float32 ulps).
        assert [lp.logprob for lp in g.logprobs or []] == pytest.approx([lp.logprob for lp in w.logprobs or []],
                                                                        abs=1e-5)


@pytest.mark.parametrize("scheme", ["w4a16-group", "w4a16-asym", "w4a16-tensor-asym"])
def test_quantize_int4_keeps_a_w4a16_checkpoints_own_grid(float_model: Path, tmp_path: Path, scheme: str) -> None:
    # Calibrated on ranges 1.4x the weights': no group's integers span its grid, so rounding the decoded weights
    # anew (each group on the grid from its minimum to its maximum) would move them; the checkpoint's grid keeps them.
    folder = write_compressed_checkpoint(float_model, tmp_path / scheme, scheme, widen=1.4)
    twin = float_twin(float_model, folder, tmp_path / "twin")
    want = LLM(str(twin), device="cpu")
    llm = LLM(str(folder), device="cpu", quantize="int4")
    per_tensor = scheme == "w4a16-tensor-asym"  # one grid per tensor: groups of 32 rounded anew differ anyway
    assert_keeps_the_checkpoint_grid(llm, want, lambda layer: layer.in_features if per_tensor else 32,
                                     anew_moves=not per_tensor)
    assert_generates_as(llm, want)


def test_quantize_int4_rounds_8_bit_layers_anew(float_model: Path, tmp_path: Path) -> None:
    folder = write_compressed_checkpoint(float_model, tmp_path / "w8", "w8a16-channel")
    model = LLM(str(folder), device="cpu", quantize="int4").engine.runner.model
    layers = [m for n, m in model.named_modules() if isinstance(m, PackedLinear) and n != "lm_head"]
    assert layers and all(isinstance(m.quantized, Int4Weight) and m.quantized.group == 32 for m in layers)


def _broken(folder: Path, config_change: dict | None = None, drop: str | None = None,
            replace: tuple[str, torch.Tensor] | None = None) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(config_change or {})
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "model.safetensors")
    if drop:
        del tensors[drop]
    if replace:
        tensors[replace[0]] = replace[1]
    save_file(tensors, folder / "model.safetensors")


@pytest.mark.parametrize(("change", "message"), [
    (dict(drop="model.layers.1.mlp.up_proj.weight_scale"),
     "model.layers.1.mlp.up_proj: the compressed-tensors layer lacks weight_scale"),
    (dict(drop="model.layers.0.self_attn.k_proj.weight_zero_point"),
     "k_proj: the asymmetric layer .* lacks weight_zero_point"),
    (dict(replace=("model.layers.0.self_attn.q_proj.weight_scale", torch.ones(64, 3))),
     r"q_proj.weight_scale has shape \(64, 3\), expected \(64, 2\)"),
    (dict(replace=("model.layers.0.self_attn.q_proj.weight_packed", torch.zeros(64, 7, dtype=torch.int32))),
     r"q_proj.weight_packed has shape \(64, 7\), expected \(64, 8\)"),
    (dict(config_change={"format": "nvfp4-pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 16}}}}),
     "format 'nvfp4-pack-quantized' .* is not supported"),
    (dict(config_change={"kv_cache_scheme": {"num_bits": 8, "type": "float"}}), "a quantized KV cache is not supported"),
    (dict(replace=("model.layers.0.self_attn.q_proj.weight_shape", torch.tensor([64.0, 64.0]))),
     "q_proj.weight_shape must be two integers"),
    (dict(replace=("model.layers.0.self_attn.q_proj.weight_scale", torch.full((64, 2), float("inf")))),
     "q_proj.weight_scale holds NaN or infinite values"),
    (dict(config_change={"config_groups": {"g": ["not", "a", "mapping"]}}), "config_groups.g must be a mapping"),
    (dict(config_change={"config_groups": {"g": {"targets": ["Linear"], "format": "pack-quantized", "weights": {
        "num_bits": 8, "type": "float", "strategy": "channel"}}}}), "float weights are not pack-quantized"),
])
def test_broken_checkpoints_fail_at_load_naming_what_is_wrong(float_model: Path, tmp_path: Path, change: dict,
                                                              message: str) -> None:
    folder = write_compressed_checkpoint(float_model, tmp_path / "c", "w4a16-asym")
    _broken(folder, **change)
    with pytest.raises(CheckpointError, match=message):
        LLM(str(folder), device="cpu")
