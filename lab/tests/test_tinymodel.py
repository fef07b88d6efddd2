"""The tiny model's files agree with each other (config.json, the safetensors header, the
tokenizer, the model card), so that a real engine that reads config.json and then loads the
weights finds what the config promises; and its shape is one the real vLLM (CPU build) serves
with the lab's deploy spec."""

from __future__ import annotations

import json
import math
import struct
import subprocess
from pathlib import Path
from typing import Any

from gpufleet.model.spec import load_spec
from gpufleet_lab import tinymodel

ROOT = Path(__file__).resolve().parents[2]


def _files() -> dict[str, bytes]:
    return tinymodel.file_contents("main")


def _config() -> dict[str, Any]:
    return json.loads(_files()["config.json"])


def _header() -> dict[str, Any]:
    data = _files()[tinymodel.SAFETENSORS_FILE]
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header.pop("__metadata__")
    return header


def _expected_shapes(c: dict[str, Any]) -> dict[str, list[int]]:
    """What transformers' LlamaForCausalLM expects in the checkpoint for config ``c``, written
    from the config alone (not from ``tinymodel.tensor_shapes``)."""
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q = c["num_attention_heads"] * c["head_dim"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden]}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = [vocab, hidden]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": [hidden],
            p + "post_attention_layernorm.weight": [hidden],
            p + "self_attn.q_proj.weight": [q, hidden],
            p + "self_attn.k_proj.weight": [kv, hidden],
            p + "self_attn.v_proj.weight": [kv, hidden],
            p + "self_attn.o_proj.weight": [hidden, q],
            p + "mlp.gate_proj.weight": [inter, hidden],
            p + "mlp.up_proj.weight": [inter, hidden],
            p + "mlp.down_proj.weight": [hidden, inter],
        }
    return shapes


def test_config_json_is_self_consistent() -> None:
    c = _config()
    assert c["head_dim"] * c["num_attention_heads"] == c["hidden_size"]
    assert c["num_attention_heads"] % c["num_key_value_heads"] == 0  # whole GQA groups
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    assert c["torch_dtype"] == "bfloat16"


def test_the_safetensors_header_is_what_config_json_describes() -> None:
    c = _config()
    header = _header()
    assert {name: info["shape"] for name, info in header.items()} == _expected_shapes(c)
    assert {info["dtype"] for info in header.values()} == {"BF16"}  # torch_dtype bfloat16
    params = sum(math.prod(info["shape"]) for info in header.values())
    assert params == tinymodel.parameter_count()


def test_tokenizer_and_generation_config_agree_with_config_json() -> None:
    files = _files()
    c = _config()
    tok = json.loads(files["tokenizer.json"])
    tok_config = json.loads(files["tokenizer_config.json"])
    vocab = tok["model"]["vocab"]
    assert len(vocab) == c["vocab_size"]
    assert (vocab["<s>"], vocab["</s>"]) == (c["bos_token_id"], c["eos_token_id"])
    assert tok_config["model_max_length"] == c["max_position_embeddings"]
    gen = json.loads(files["generation_config.json"])
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (c["bos_token_id"], c["eos_token_id"])
    assert gen["max_length"] == c["max_position_embeddings"]


def test_the_model_card_and_docstring_name_the_real_shape() -> None:
    c = _config()
    card = _files()["README.md"].decode()
    for row in (f"| hidden size | {c['hidden_size']} |", f"| head dim | {c['head_dim']} |",
                f"| parameters | {tinymodel.parameter_count():,} (bf16) |",
                f"| max position embeddings | {c['max_position_embeddings']} |"):
        assert row in card
    doc = " ".join((tinymodel.__doc__ or "").split())
    assert f"hidden {c['hidden_size']}, " in doc and f"head_dim {c['head_dim']}, " in doc
    assert f"{tinymodel.parameter_count():,} bf16 parameters" in doc
    assert f"max_position_embeddings {c['max_position_embeddings']}, " in doc


def test_only_printable_ascii_can_win_greedy_decoding() -> None:
    data = _files()[tinymodel.SAFETENSORS_FILE]
    (length,) = struct.unpack("<Q", data[:8])
    start, end = _header()["lm_head.weight"]["data_offsets"]
    lm_head = data[8 + length + start:8 + length + end]
    row = 2 * tinymodel.HIDDEN_SIZE
    nonzero = {t for t in range(tinymodel.VOCAB_SIZE) if any(lm_head[t * row:(t + 1) * row])}
    vocab = json.loads(_files()["tokenizer.json"])["model"]["vocab"]
    assert {vocab[f"<0x{b:02X}>"] for b in range(0x20, 0x7F)} == nonzero


def test_the_lab_deploy_spec_fits_the_tiny_model() -> None:
    spec = load_spec(ROOT / "deploys" / "llama3.yaml")
    assert spec.max_model_len <= _config()["max_position_embeddings"]


def test_the_real_vllm_cpu_attention_takes_the_head_dim(vllm_python: Path) -> None:
    # "Unsupported CPU attention configuration: head_dim=16" otherwise, at the first request
    code = ("from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend as B; "
            "print(B.get_supported_head_sizes())")
    out = subprocess.run([str(vllm_python), "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert _config()["head_dim"] in json.loads(out.stdout.strip().splitlines()[-1])
