"""A tiny random llama GGUF, written as llama.cpp writes one, for the GGUF reader and download tests."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

HEADS, KV_HEADS, HIDDEN, FFN, LAYERS = 4, 2, 32, 48, 2
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives q/k (rotary halves interleaved); read_gguf must undo it."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def write_tiny_llama_gguf(
    path: Path, tied: bool = True, arch: str = "llama", layers: int = LAYERS
) -> dict[str, torch.Tensor]:
    """A small random F32 llama GGUF as llama.cpp would write it; returns the HF-named tensors it encodes."""
    alphabet = list(bytes_to_unicode().values())
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + alphabet + ["Ġt", "Ġth"]
    merges = ["Ġ t", "Ġt h"]
    vocab = len(tokens)
    head_dim = HIDDEN // HEADS
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.2

    hf = {"model.embed_tokens.weight": rand(vocab, HIDDEN), "model.norm.weight": 1 + rand(HIDDEN)}
    gguf_tensors = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    if not tied:
        hf["lm_head.weight"] = gguf_tensors["output.weight"] = rand(vocab, HIDDEN)
    for i in range(layers):
        p = f"model.layers.{i}."
        layer = {
            "input_layernorm.weight": ("attn_norm.weight", 1 + rand(HIDDEN)),
            "self_attn.q_proj.weight": ("attn_q.weight", rand(HEADS * head_dim, HIDDEN)),
            "self_attn.k_proj.weight": ("attn_k.weight", rand(KV_HEADS * head_dim, HIDDEN)),
            "self_attn.v_proj.weight": ("attn_v.weight", rand(KV_HEADS * head_dim, HIDDEN)),
            "self_attn.o_proj.weight": ("attn_output.weight", rand(HIDDEN, HEADS * head_dim)),
            "post_attention_layernorm.weight": ("ffn_norm.weight", 1 + rand(HIDDEN)),
            "mlp.gate_proj.weight": ("ffn_gate.weight", rand(FFN, HIDDEN)),
            "mlp.up_proj.weight": ("ffn_up.weight", rand(FFN, HIDDEN)),
            "mlp.down_proj.weight": ("ffn_down.weight", rand(HIDDEN, FFN)),
        }
        for hf_name, (gguf_name, value) in layer.items():
            hf[p + hf_name] = value
            if gguf_name == "attn_q.weight":
                value = _llama_cpp_permute(value, HEADS)
            elif gguf_name == "attn_k.weight":
                value = _llama_cpp_permute(value, KV_HEADS)
            gguf_tensors[f"blk.{i}.{gguf_name}"] = value

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-llama")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (vocab - len(specials)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, value in gguf_tensors.items():
        writer.add_tensor(name, value.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf
