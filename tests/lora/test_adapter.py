"""load_adapter against real PEFT adapters: every tensor and scale must equal PEFT's own LoRA modules."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config

from loraplex.lora import (
    LAYER_TARGETS,
    AdapterInvalid,
    AdapterNotFound,
    AdapterWeights,
    LoRAModule,
    load_adapter,
)
from loraplex.model.decoder import DecoderConfig
from tests.helpers import TINY

ALL_SEVEN = list(LAYER_TARGETS)
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def hf_config(arch: str = "llama") -> Any:
    if arch == "phi3":
        return Phi3Config(**TINY, architectures=["Phi3ForCausalLM"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaConfig(**TINY, architectures=["LlamaForCausalLM"])


def base_of(arch: str = "llama") -> DecoderConfig:
    return DecoderConfig.from_hf(hf_config(arch))


def make_adapter(path: Path, arch: str = "llama", safe: bool = True, **lora: Any) -> Any:
    """A real PEFT adapter on a tiny random model, with every LoRA parameter random (B included)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(arch), dtype=torch.float32)
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn_like(p))
        peft_model.save_pretrained(path, safe_serialization=safe)
    return peft_model


def peft_lora_modules(peft_model: Any) -> dict[str, Any]:
    """Module key (as PEFT matches it, e.g. model.layers.0.self_attn.q_proj) → PEFT LoRA layer."""
    return {name: m for name, m in peft_model.base_model.model.named_modules()
            if isinstance(m, LoraLayer) and "default" in m.lora_A}


def assert_matches_peft(adapter: AdapterWeights, peft_model: Any) -> None:
    """Every PEFT LoRA module appears in `adapter` with equal A, B (split for fused modules), scale, DoRA m."""
    expected: dict[tuple[int, str], LoRAModule] = {}
    for key, m in peft_lora_modules(peft_model).items():
        a = m.lora_A["default"].weight.detach()
        b = m.lora_B["default"].weight.detach()
        mag = m.lora_magnitude_vector["default"].weight.detach() if m.use_dora["default"] else None
        scale = m.scaling["default"]
        if key == "lm_head":
            assert adapter.lm_head is not None
            expected_head = LoRAModule(a, b, scale, mag)
            assert_module_equal(adapter.lm_head, expected_head, key)
            continue
        layer, proj = int(key.split(".")[2]), key.rpartition(".")[2]
        targets = FUSED.get(proj, (proj,))
        outs = [m.get_base_layer().out_features] if len(targets) == 1 else [shard_rows(peft_model)[t] for t in targets]
        start = 0
        for target, rows in zip(targets, outs, strict=True):
            part_mag = None if mag is None else mag[start:start + rows]
            expected[(layer, target)] = LoRAModule(a, b[start:start + rows], scale, part_mag)
            start += rows
        assert start == b.shape[0]
    assert set(adapter.layers) == set(expected)
    for k, module in expected.items():
        assert_module_equal(adapter.layers[k], module, str(k))
    if "lm_head" not in peft_lora_modules(peft_model):
        assert adapter.lm_head is None
    ranks = [m.lora_A["default"].weight.shape[0] for m in peft_lora_modules(peft_model).values()]
    assert adapter.rank == max(ranks)


def shard_rows(peft_model: Any) -> dict[str, int]:
    cfg = peft_model.base_model.model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return {"q_proj": cfg.num_attention_heads * head_dim, "k_proj": cfg.num_key_value_heads * head_dim,
            "v_proj": cfg.num_key_value_heads * head_dim, "gate_proj": cfg.intermediate_size,
            "up_proj": cfg.intermediate_size}


def assert_module_equal(got: LoRAModule, want: LoRAModule, where: str) -> None:
    assert got.a.dtype == torch.float32 and got.b.dtype == torch.float32, where
    assert torch.equal(got.a, want.a), where
    assert torch.equal(got.b, want.b), where
    assert got.scale == pytest.approx(want.scale, rel=1e-12), where
    if want.magnitude is None:
        assert got.magnitude is None, where
    else:
        assert got.magnitude is not None and torch.equal(got.magnitude, want.magnitude), where


# --- what loads, compared with PEFT ----------------------------------------------------------------


def test_q_v_only(tmp_path: Path) -> None:
    peft_model = make_adapter(tmp_path, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    adapter = load_adapter(tmp_path, base_of())
    assert_matches_peft(adapter, peft_model)
    assert adapter.targets == {"q_proj", "v_proj"} and len(adapter.layers) == 2 * TINY["num_hidden_layers"]
    assert adapter.rank == 8 and adapter.layers[(0, "q_proj")].scale == 2.0
    assert adapter.config["target_modules"] and len(adapter.content_hash) == 64
    q, v = adapter.layers[(0, "q_proj")], adapter.layers[(0, "v_proj")]
    assert adapter.size_bytes == 4 * TINY["num_hidden_layers"] * sum(t.numel() for t in (q.a, q.b, v.a, v.b))


def test_all_seven_projections(tmp_path: Path) -> None:
    peft_model = make_adapter(tmp_path, target_modules=ALL_SEVEN)
    adapter = load_adapter(tmp_path, base_of(), max_rank=4)
    assert_matches_peft(adapter, peft_model)
    assert adapter.targets == set(LAYER_TARGETS)
    assert adapter.layers[(2, "down_proj")].a.shape == (4, TINY["intermediate_size"])


def test_rslora_scale(tmp_path: Path) -> None:
    peft_model = make_adapter(tmp_path, r=16, lora_alpha=8, use_rslora=True, target_modules=["o_proj"])
    adapter = load_adapter(tmp_path, base_of())
    assert_matches_peft(adapter, peft_model)
    assert adapter.layers[(1, "o_proj")].scale == pytest.approx(8 / math.sqrt(16))


def test_rank_and_alpha_patterns(tmp_path: Path) -> None:
    peft_model = make_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                              rank_pattern={"model.layers.1.self_attn.q_proj": 2, "down_proj": 6},
                              alpha_pattern={"self_attn": 100, "v_proj": 32,
                                             r"layers\.2\.self_attn\.q_proj": 3})
    adapter = load_adapter(tmp_path, base_of())
    assert_matches_peft(adapter, peft_model)  # "self_attn" is no dotted suffix of any key: PEFT skips it
    assert adapter.layers[(1, "q_proj")].rank == 2 and adapter.layers[(0, "q_proj")].rank == 4
    assert adapter.layers[(0, "down_proj")].rank == 6 and adapter.rank == 6
    assert adapter.layers[(0, "v_proj")].scale == 32 / 4
    assert adapter.layers[(2, "q_proj")].scale == 3 / 4 and adapter.layers[(1, "q_proj")].scale == 8 / 2


def test_layers_to_transform(tmp_path: Path) -> None:
    peft_model = make_adapter(tmp_path, target_modules=["q_proj", "up_proj"], layers_to_transform=[0, 2],
                              layers_pattern="layers")
    adapter = load_adapter(tmp_path, base_of())
    assert_matches_peft(adapter, peft_model)
    assert {layer for layer, _ in adapter.layers} == {0, 2}


def test_regex_target_modules(tmp_path: Path) -> None:
    regex = r"model\.layers\.1\.(self_attn\.(k|o)_proj|mlp\.up_proj)"
    peft_model = make_adapter(tmp_path, target_modules=regex)
    adapter = load_adapter(tmp_path, base_of())
    assert_matches_peft(adapter, peft_model)
    assert set(adapter.layers) == {(1, "k_proj"), (1, "o_proj"), (1, "up_proj")}


def test_fan_in_fan_out_needs_no_transpose(tmp_path: Path) -> None:
    # PEFT resets fan_in_fan_out on nn.Linear (it only describes a Conv1D base); a config that still says
    # true, as older PEFT versions saved, must load the same [r, in] / [out, r] tensors.
    peft_model = make_adapter(tmp_path, target_modules=["q_proj", "down_proj"], fan_in_fan_out=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["fan_in_fan_out"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert_matches_peft(load_adapter(tmp_path, base_of()), peft_model)


def test_dora_magnitude(tmp_path: Path) -> None:
    peft_model = make_adapter(tmp_path, target_modules=["q_proj", "k_proj", "gate_proj"], use_dora=True)
    adapter = load_adapter(tmp_path, base_of())
    assert adapter.use_dora
    assert_matches_peft(adapter, peft_model)
    magnitude = adapter.layers[(0, "k_proj")].magnitude
    assert magnitude is not None and magnitude.shape == (TINY["num_key_value_heads"] * 16,)


def test_phi3_fused_targets_split_into_shards(tmp_path: Path) -> None:
    peft_model = make_adapter(tmp_path, arch="phi3", target_modules=["qkv_proj", "gate_up_proj", "o_proj"],
                              use_dora=True)
    adapter = load_adapter(tmp_path, base_of("phi3"))
    assert_matches_peft(adapter, peft_model)
    assert adapter.targets == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj"}
    q, k = adapter.layers[(0, "q_proj")], adapter.layers[(0, "k_proj")]
    assert q.b.shape == (64, 4) and k.b.shape == (32, 4) and q.a is k.a


def test_lm_head_target(tmp_path: Path) -> None:
    peft_model = make_adapter(tmp_path, target_modules=["q_proj", "lm_head"])
    adapter = load_adapter(tmp_path, base_of())
    assert_matches_peft(adapter, peft_model)
    assert adapter.lm_head is not None and adapter.lm_head.b.shape == (TINY["vocab_size"], 4)
    assert adapter.targets == {"q_proj"}


def test_legacy_bin(tmp_path: Path) -> None:
    peft_model = make_adapter(tmp_path, safe=False, target_modules=["v_proj"])
    assert (tmp_path / "adapter_model.bin").is_file()
    assert_matches_peft(load_adapter(tmp_path, base_of()), peft_model)


def test_content_hash_follows_the_bytes(tmp_path: Path, saved: Path) -> None:
    first = load_adapter(saved, base_of())
    assert load_adapter(saved, base_of()).content_hash == first.content_hash
    copy = shutil.copytree(saved, tmp_path / "copy")
    edit_tensors(copy, lambda t: t[next(k for k in t if "lora_B" in k)].mul_(2))
    assert load_adapter(copy, base_of()).content_hash != first.content_hash


# --- what is rejected -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("adapter")
    make_adapter(path, target_modules=["q_proj", "v_proj"], use_dora=True)
    return path


@pytest.fixture
def adapter_copy(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "adapter"))


def edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def edit_tensors(path: Path, change: Callable[[dict[str, torch.Tensor]], Any]) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


def raises(path: Path, *fragments: str, base: DecoderConfig | None = None, max_rank: int | None = None) -> None:
    with pytest.raises(AdapterInvalid) as info:
        load_adapter(path, base or base_of(), max_rank=max_rank)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(AdapterNotFound, match="nope"):
        load_adapter(tmp_path / "nope", base_of())


def test_missing_config(adapter_copy: Path) -> None:
    (adapter_copy / "adapter_config.json").unlink()
    raises(adapter_copy, "adapter_config.json")


def test_invalid_json(adapter_copy: Path) -> None:
    (adapter_copy / "adapter_config.json").write_text("{'r': 8,")
    raises(adapter_copy, "adapter_config.json", "not valid JSON")


def test_missing_weights(adapter_copy: Path) -> None:
    (adapter_copy / "adapter_model.safetensors").unlink()
    raises(adapter_copy, "adapter_model.safetensors", "adapter_model.bin")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(adapter_copy: Path, damage: str) -> None:
    file = adapter_copy / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\x10\x00" + data[2:200])
    raises(adapter_copy, "adapter_model.safetensors", "not a readable safetensors")


def test_corrupt_bin(adapter_copy: Path) -> None:
    (adapter_copy / "adapter_model.safetensors").unlink()
    (adapter_copy / "adapter_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    raises(adapter_copy, "adapter_model.bin", "not a readable torch weights")


@pytest.mark.parametrize("bad_module", ["model.layers.7.self_attn.q_proj", "model.layers.0.mlp.q_proj",
                                        "model.layers.0.self_attn.x_proj", "model.embed_tokens"])
def test_tensor_for_no_base_module(adapter_copy: Path, bad_module: str) -> None:
    name = f"base_model.model.{bad_module}.lora_A.weight"
    edit_tensors(adapter_copy, lambda t: t.update({name: torch.ones(4, 64)}))
    raises(adapter_copy, name, "maps to no module")


def test_module_not_selected_by_target_modules(adapter_copy: Path) -> None:
    edit_config(adapter_copy, target_modules=["q_proj"])
    raises(adapter_copy, "model.layers.0.self_attn.v_proj", "target_modules")


def test_shape_mismatch_names_module_and_shapes(adapter_copy: Path) -> None:
    bigger = DecoderConfig.from_hf(LlamaConfig(**{**TINY, "hidden_size": 128}, architectures=["LlamaForCausalLM"]))
    raises(adapter_copy, "lora_A of model.layers.0.self_attn.q_proj", "(4, 64)", "(4, 128)", base=bigger)


def test_rank_disagrees_with_config(adapter_copy: Path) -> None:
    edit_config(adapter_copy, rank_pattern={"layers.1.self_attn.v_proj": 8})
    raises(adapter_copy, "model.layers.1.self_attn.v_proj", "(4, 64)", "(8, 64)")


def test_rank_above_max_rank(adapter_copy: Path) -> None:
    raises(adapter_copy, "rank 4", "max_rank 2", "self_attn", max_rank=2)


def test_nan_values(adapter_copy: Path) -> None:
    name = "base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"
    edit_tensors(adapter_copy, lambda t: t[name].__setitem__((0, 0), float("nan")))
    raises(adapter_copy, name, "NaN")


def test_non_float_dtype(adapter_copy: Path) -> None:
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    edit_tensors(adapter_copy, lambda t: t.update({name: t[name].to(torch.int32)}))
    raises(adapter_copy, name, "torch.int32")


def test_missing_lora_b(adapter_copy: Path) -> None:
    edit_tensors(adapter_copy, lambda t: t.pop("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"))
    raises(adapter_copy, "model.layers.1.self_attn.q_proj", "lora_B")


def test_dora_magnitude_missing(adapter_copy: Path) -> None:
    edit_tensors(adapter_copy, lambda t: t.pop("base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector"))
    raises(adapter_copy, "model.layers.0.self_attn.v_proj", "lora_magnitude_vector")


def test_dora_magnitude_without_use_dora(adapter_copy: Path) -> None:
    edit_config(adapter_copy, use_dora=False)
    raises(adapter_copy, "lora_magnitude_vector", "use_dora")


@pytest.mark.parametrize(("field", "value"), [
    ("peft_type", "IA3"), ("task_type", "SEQ_CLS"), ("bias", "all"), ("modules_to_save", ["lm_head"]),
    ("use_qalora", True), ("lora_bias", True), ("target_parameters", ["mlp.experts.down_proj"]),
    ("layer_replication", [[0, 2], [1, 3]]), ("alora_invocation_tokens", [5, 6]),
    ("megatron_config", {"tensor_model_parallel_size": 2}), ("trainable_token_indices", [1, 2]),
    ("init_lora_weights", "pissa_niter_4"), ("init_lora_weights", "olora"), ("some_future_flag", 0.5),
    ("r", 0), ("lora_alpha", "eight"), ("rank_pattern", {"q_proj": -1}),
])
def test_config_field_rejected(adapter_copy: Path, field: str, value: Any) -> None:
    edit_config(adapter_copy, **{field: value})
    # The whole message: it is what a client reads in the 422 (the field, its value, and why).
    why = {
        "peft_type": "is not supported; loraplex serves LORA adapters",
        "task_type": "is not supported; loraplex serves CAUSAL_LM adapters",
        "bias": "is not supported (adapters that train biases); only 'none' is",
        "init_lora_weights": "means the adapter fits a base model PEFT modified at init; convert it with "
                             "save_pretrained(path_initial_model_for_weight_conversion=...) first",
        "some_future_flag": "is a field loraplex does not know, so it cannot vouch for the adapter's math",
        "r": f"must be a positive integer of at most {1 << 20}",
        "lora_alpha": "must be a finite number within float32's range",
        "rank_pattern": f"must map module patterns to positive integers of at most {1 << 20}",
    }.get(field, "is not supported by loraplex")
    with pytest.raises(AdapterInvalid) as info:
        load_adapter(adapter_copy, base_of())
    assert str(info.value) == f"adapter_config.json: {field}={value!r} {why}"


@pytest.mark.parametrize(("changes", "message"), [
    ({"alpha_pattern": {"q_proj": "x"}},
     "adapter_config.json: alpha_pattern={'q_proj': 'x'} must map module patterns to finite numbers within "
     "float32's range"),
    ({"rank_pattern": ["q_proj"]},
     f"adapter_config.json: rank_pattern=['q_proj'] must map module patterns to positive integers of at most "
     f"{1 << 20}"),
    ({"target_modules": 5}, "adapter_config.json: target_modules=5 must be a list of names or a regex string"),
    ({"target_modules": {"q_proj": 1}},
     "adapter_config.json: target_modules={'q_proj': 1} must be a list of names or a regex string"),
])
def test_config_values_of_the_wrong_kind_are_named(adapter_copy: Path, changes: dict[str, Any], message: str) -> None:
    edit_config(adapter_copy, **changes)
    with pytest.raises(AdapterInvalid) as info:
        load_adapter(adapter_copy, base_of())
    assert str(info.value) == message


def test_config_edges_that_load(adapter_copy: Path) -> None:
    # No target_modules (PEFT then uses its per-architecture defaults; the weights say what is adapted), the
    # largest rank a config may claim in a pattern, and lora_alpha at float32's largest value.
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    del config["target_modules"], config["lora_alpha"]  # lora_alpha defaults to 8, as in PEFT
    (adapter_copy / "adapter_config.json").write_text(json.dumps(config))
    adapter = load_adapter(adapter_copy, base_of())
    assert {m.scale for m in adapter.layers.values()} == {8 / 4}
    edit_config(adapter_copy, rank_pattern={"nothing_matches": 1 << 20}, r=1 << 20, lora_alpha=0)
    with pytest.raises(AdapterInvalid, match=r"needs \(1048576, 64\)"):  # r is allowed; the tensors then disagree
        load_adapter(adapter_copy, base_of())
    biggest = float(torch.finfo(torch.float32).max)
    edit_config(adapter_copy, r=4, rank_pattern={}, lora_alpha=biggest)  # B's entries are below 4: no overflow
    assert {m.scale for m in load_adapter(adapter_copy, base_of()).layers.values()} == {biggest / 4}


def test_a_config_that_is_not_an_object_is_named(adapter_copy: Path) -> None:
    (adapter_copy / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterInvalid) as info:
        load_adapter(adapter_copy, base_of())
    assert str(info.value) == f"{adapter_copy / 'adapter_config.json'} must hold a JSON object, not list"


class _Boom:
    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['BOOM']).write_text('ran')",))


def test_a_legacy_bin_is_read_without_running_its_pickle(adapter_copy: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    flag = tmp_path / "flag"
    monkeypatch.setenv("BOOM", str(flag))
    (adapter_copy / "adapter_model.safetensors").unlink()
    torch.save({"x": _Boom()}, adapter_copy / "adapter_model.bin")
    with pytest.raises(AdapterInvalid, match="not a readable torch weights file"):
        load_adapter(adapter_copy, base_of())
    assert not flag.exists()


@pytest.mark.parametrize("state", [[torch.zeros(2)], {"x": 1}, {1: torch.zeros(2)}])
def test_a_legacy_bin_must_map_names_to_tensors(adapter_copy: Path, state: Any) -> None:
    (adapter_copy / "adapter_model.safetensors").unlink()
    torch.save(state, adapter_copy / "adapter_model.bin")
    with pytest.raises(AdapterInvalid) as info:
        load_adapter(adapter_copy, base_of())
    assert str(info.value) == f"{adapter_copy / 'adapter_model.bin'} does not hold a mapping of tensor names to tensors"


def test_training_only_fields_ignored(adapter_copy: Path) -> None:
    edit_config(adapter_copy, lora_dropout=0.3, init_lora_weights="gaussian", inference_mode=False,
                revision="main", base_model_name_or_path="someone/model")
    assert load_adapter(adapter_copy, base_of()).rank == 4


# --- numbers: nothing non-finite, nothing that overflows float32 ------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("lora_alpha", 1e308), ("lora_alpha", -1e39), ("lora_alpha", 10**400), ("r", 10**400), ("r", 2**40),
    ("alpha_pattern", {"q_proj": 1e308}), ("alpha_pattern", {"q_proj": 10**400}), ("rank_pattern", {"q_proj": 10**30}),
])
def test_overflowing_config_numbers_rejected(adapter_copy: Path, field: str, value: Any) -> None:
    # lora_alpha 1e308 loaded and served NaN logprobs; 10**400 (valid JSON) raised OverflowError, not AdapterInvalid.
    edit_config(adapter_copy, **{field: value})
    raises(adapter_copy, field)


def test_scale_times_lora_b_overflowing_float32_is_rejected(adapter_copy: Path) -> None:
    edit_config(adapter_copy, lora_alpha=3e38)  # within float32; scale 3e38 / 4 = 7.5e37
    name = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    edit_tensors(adapter_copy, lambda t: t[name].__setitem__((0, 0), 10.0))  # 7.5e38 > float32's 3.4e38
    raises(adapter_copy, "lora_B of model.layers.1.self_attn.q_proj", "overflows float32")


def test_infinite_dora_magnitude_rejected(adapter_copy: Path) -> None:
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    edit_tensors(adapter_copy, lambda t: t[name].__setitem__(3, float("inf")))
    raises(adapter_copy, name, "NaN or infinite")


def test_large_finite_weights_whose_sum_overflows_still_load(adapter_copy: Path) -> None:
    # The finiteness check sums each tensor; a sum that overflows must send it to the element-wise check,
    # not fail (it raised StopIteration, which escaped the loader as a non-AdapterError).
    name = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    edit_config(adapter_copy, lora_alpha=1)
    edit_tensors(adapter_copy, lambda t: t[name][0, :2].fill_(3e38))
    adapter = load_adapter(adapter_copy, base_of())
    assert adapter.layers[(0, "v_proj")].a[0, 0].item() == pytest.approx(3e38)


@pytest.mark.parametrize("specific_first", [False, True])
def test_overlapping_patterns_take_the_first_match_as_peft_does(tmp_path: Path, specific_first: bool) -> None:
    """Two patterns match model.layers.1.self_attn.q_proj; PEFT's get_pattern_key takes the first in order.
    PEFT saves the config with sorted keys and reads it back in that order, so each case lists its
    patterns sorted: the file then says what the PEFT model built from these dicts did."""
    if specific_first:
        rank = {"model.layers.1.self_attn.q_proj": 6, "q_proj": 2}
        alpha = {r"layers\.1\.self_attn\.q_proj": 30, "q_proj": 10}
    else:  # ".*q_proj" sorts before "model...", and matches every q_proj
        rank = {".*q_proj": 2, "model.layers.1.self_attn.q_proj": 6}
        alpha = {".*q_proj": 10, r"layers\.1\.self_attn\.q_proj": 30}
    peft_model = make_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern=rank,
                              alpha_pattern=alpha)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert list(saved["rank_pattern"]) == list(rank) and list(saved["alpha_pattern"]) == list(alpha)
    adapter = load_adapter(tmp_path, base_of())
    assert_matches_peft(adapter, peft_model)
    layer1, layer0 = adapter.layers[(1, "q_proj")], adapter.layers[(0, "q_proj")]
    assert (layer1.rank, layer1.scale) == ((6, 30 / 6) if specific_first else (2, 10 / 2))
    assert (layer0.rank, layer0.scale) == (2, 10 / 2)


# --- which modules a config selects, and Medusa heads beside (or instead of) the LoRA --------------


@pytest.mark.parametrize(("exclude", "refused"), [
    (["q_proj"], "model.layers.0.self_attn.q_proj"),  # a name matches every key ending in '.q_proj'
    (["model.layers.2.self_attn.v_proj"], "model.layers.2.self_attn.v_proj"),  # or one whole key
    (r"model\.layers\.1\..*", "model.layers.1.self_attn.q_proj"),  # a string is a regex over whole keys
])
def test_exclude_modules_unselects_what_it_names(adapter_copy: Path, exclude: Any, refused: str) -> None:
    edit_config(adapter_copy, exclude_modules=exclude)
    with pytest.raises(AdapterInvalid) as info:
        load_adapter(adapter_copy, base_of())
    targets = json.loads((adapter_copy / "adapter_config.json").read_text())["target_modules"]  # PEFT's order
    assert str(info.value) == (f"adapter_model.safetensors has weights for {refused}, which target_modules "
                               f"{targets!r} of adapter_config.json does not select")


@pytest.mark.parametrize("exclude", [["k_proj"], ["self_attn.q"], r"model\.layers\.9\..*", []])
def test_exclude_modules_that_name_nothing_with_weights_change_nothing(adapter_copy: Path, exclude: Any) -> None:
    edit_config(adapter_copy, exclude_modules=exclude)
    assert set(load_adapter(adapter_copy, base_of()).targets) == {"q_proj", "v_proj"}


def test_peft_exclude_modules_round_trip(tmp_path: Path) -> None:
    peft_model = make_adapter(tmp_path, target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"])
    adapter = load_adapter(tmp_path, base_of())
    assert_matches_peft(adapter, peft_model)
    assert adapter.targets == {"q_proj"}


def test_all_linear_selects_every_projection_but_not_the_lm_head(adapter_copy: Path, tmp_path: Path) -> None:
    edit_config(adapter_copy, target_modules="all-linear")
    assert load_adapter(adapter_copy, base_of()).targets == {"q_proj", "v_proj"}
    with_head = tmp_path / "head"
    make_adapter(with_head, target_modules=["q_proj", "lm_head"])
    edit_config(with_head, target_modules="all-linear")
    with pytest.raises(AdapterInvalid, match="weights for lm_head, which target_modules 'all-linear'"):
        load_adapter(with_head, base_of())


@pytest.mark.parametrize("pattern", ["layers", ["blocks", "layers"]])
def test_layers_pattern_as_a_string_or_a_list(tmp_path: Path, pattern: Any) -> None:
    make_adapter(tmp_path, target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers")
    edit_config(tmp_path, layers_pattern=pattern)
    assert {layer for layer, _ in load_adapter(tmp_path, base_of()).layers} == {1}
    edit_config(tmp_path, layers_to_transform=[0])  # the weights of layer 1 are then not selected
    with pytest.raises(AdapterInvalid, match="model.layers.1.self_attn.q_proj, which target_modules"):
        load_adapter(tmp_path, base_of())
    edit_config(tmp_path, layers_to_transform=1)  # PEFT also takes one index as an int
    assert {layer for layer, _ in load_adapter(tmp_path, base_of()).layers} == {1}
    edit_config(tmp_path, layers_to_transform=0)
    with pytest.raises(AdapterInvalid, match="model.layers.1.self_attn.q_proj, which target_modules"):
        load_adapter(tmp_path, base_of())
    edit_config(tmp_path, layers_to_transform=[], layers_pattern=None)  # empty: every layer, as None is
    assert {layer for layer, _ in load_adapter(tmp_path, base_of()).layers} == {1}


def test_the_adapters_rank_counts_its_lm_head(tmp_path: Path) -> None:
    make_adapter(tmp_path, r=4, target_modules=["q_proj", "lm_head"], rank_pattern={"lm_head": 8})
    adapter = load_adapter(tmp_path, base_of())
    assert adapter.lm_head is not None and (adapter.lm_head.rank, adapter.rank) == (8, 8)


def test_fused_and_split_weights_for_one_projection_are_refused(tmp_path: Path) -> None:
    make_adapter(tmp_path, arch="phi3", target_modules=["qkv_proj", "o_proj"])
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn"
    tensors[f"{prefix}.q_proj.lora_A.weight"] = torch.zeros(4, TINY["hidden_size"])
    tensors[f"{prefix}.q_proj.lora_B.weight"] = torch.zeros(64, 4)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    edit_config(tmp_path, target_modules=["qkv_proj", "o_proj", "q_proj"])
    with pytest.raises(AdapterInvalid) as info:
        load_adapter(tmp_path, base_of("phi3"))
    assert str(info.value) == ("modules model.layers.0.self_attn.q_proj and model.layers.0.self_attn.qkv_proj "
                               "both adapt q_proj")


@pytest.mark.parametrize(("tensor", "shape", "message"), [
    ("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight", (5, 4),
     "lora_B of model.layers.0.self_attn.v_proj has shape (5, 4), but the base model needs (32, 4) "
     "([out_features, r])"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", (7,),
     "lora_magnitude_vector of model.layers.0.self_attn.q_proj has shape (7,), but the base model needs (64,) "
     "([out_features])"),
])
def test_a_wrong_shape_is_named_with_its_layout(adapter_copy: Path, tensor: str, shape: tuple[int, ...],
                                               message: str) -> None:
    edit_tensors(adapter_copy, lambda t: t.__setitem__(tensor, torch.zeros(shape)))
    with pytest.raises(AdapterInvalid) as info:
        load_adapter(adapter_copy, base_of())
    assert str(info.value) == message


def test_weights_with_base_copies_only_and_a_wrong_base_copy_are_named(adapter_copy: Path) -> None:
    head = "base_model.model.lm_head.weight"  # what PEFT saves beside an lm_head LoRA
    for shape, message in (((TINY["vocab_size"], TINY["hidden_size"]), "adapter weights hold no LoRA tensors "
                            "(lora_A / lora_B)"),
                           ((3, 3), f"base weight copy of {head} has shape (3, 3), but the base model needs "
                            f"({TINY['vocab_size']}, {TINY['hidden_size']}) ([vocab, hidden])")):
        save_file({head: torch.zeros(shape)}, adapter_copy / "adapter_model.safetensors")
        with pytest.raises(AdapterInvalid) as info:
            load_adapter(adapter_copy, base_of())
        assert str(info.value) == message


def test_medusa_heads_beside_a_lora_and_alone(tmp_path: Path) -> None:
    from tests.adapters.adapter_files import medusa_files

    both = tmp_path / "both"
    make_adapter(both, target_modules=["q_proj"])
    lora_only = load_adapter(both, base_of())
    for name, data in medusa_files(heads=3).items():
        (both / name).write_bytes(data)
    loaded = load_adapter(both, base_of())
    assert loaded.medusa is not None and loaded.medusa.num_heads == 3
    assert loaded.size_bytes == lora_only.size_bytes + loaded.medusa.size_bytes > lora_only.size_bytes
    assert loaded.targets == {"q_proj"} and loaded.rank == 4

    alone = tmp_path / "alone"
    alone.mkdir()
    for name, data in medusa_files(heads=2).items():
        (alone / name).write_bytes(data)
    heads = load_adapter(alone, base_of())
    assert heads.medusa is not None and heads.medusa.num_heads == 2 and heads.path == alone
    assert (heads.rank, heads.use_dora, dict(heads.layers), dict(heads.config), heads.lm_head) == (0, False, {}, {}, None)
    assert heads.size_bytes == heads.medusa.size_bytes > 0
