"""Built-in model shapes: the offline fallback of ``gpufleet plan``, and vocabulary sizes.

An OFFLINE FALLBACK for when the Hub cannot be asked (no network, no token, HF_HUB_OFFLINE=1):
the shapes of a few well-known models, from their config.json and safetensors index. The commit
is empty: these are not pinned to a revision, the Hub's answer (gpufleet.clients.hub) is always
preferred.
"""

from __future__ import annotations

from dataclasses import replace

from gpufleet.model.model_shape import ModelShape

_LLAMA3_8B = ModelShape(
    model="meta-llama/Meta-Llama-3-8B-Instruct", commit="", num_layers=32, hidden_size=4096,
    num_attention_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=8192,
    torch_dtype="bfloat16", parameters=8_030_261_248, weight_bytes=16_060_522_496, gated=True)
KNOWN_SHAPES: dict[str, ModelShape] = {
    _LLAMA3_8B.model: _LLAMA3_8B,
    # same architecture and weights size; 128k context (rope scaling "llama3")
    "meta-llama/Llama-3.1-8B-Instruct": replace(
        _LLAMA3_8B, model="meta-llama/Llama-3.1-8B-Instruct", max_position_embeddings=131072),
    "meta-llama/Meta-Llama-3-70B-Instruct": ModelShape(
        model="meta-llama/Meta-Llama-3-70B-Instruct", commit="", num_layers=80,
        hidden_size=8192, num_attention_heads=64, num_kv_heads=8, head_dim=128,
        max_position_embeddings=8192, torch_dtype="bfloat16", parameters=70_553_706_496,
        weight_bytes=141_107_412_992, gated=True),
}

# (vocab_size, tie_word_embeddings) of the models above. ModelShape has no vocab field yet;
# the planner reads ``vocab_size``/``tie_word_embeddings`` from the shape when it has them and
# this table otherwise. They matter because vLLM's fp8 and AWQ/GPTQ keep the embeddings and
# lm_head in 16 bits (1.96 GiB of Llama 3 8B).
KNOWN_VOCAB: dict[str, tuple[int, bool]] = {
    "meta-llama/Meta-Llama-3-8B-Instruct": (128256, False),
    "meta-llama/Meta-Llama-3-8B": (128256, False),
    "meta-llama/Llama-3.1-8B-Instruct": (128256, False),
    "meta-llama/Llama-3.1-8B": (128256, False),
    "meta-llama/Meta-Llama-3.1-8B-Instruct": (128256, False),
    "meta-llama/Meta-Llama-3-70B-Instruct": (128256, False),
    "meta-llama/Meta-Llama-3-70B": (128256, False),
    "meta-llama/Llama-3.1-70B-Instruct": (128256, False),
}


def known_shape(model: str) -> ModelShape | None:
    """The built-in shape of ``model`` (case-insensitive), or None."""
    for name, shape in KNOWN_SHAPES.items():
        if name.lower() == model.lower():
            return shape
    return None


def vocabulary(shape: ModelShape) -> tuple[int | None, bool]:
    """``(vocab_size, tie_word_embeddings)`` of ``shape``: its own, else the table's, else
    ``(None, False)``."""
    vocab = getattr(shape, "vocab_size", None)
    if vocab:
        return int(vocab), bool(getattr(shape, "tie_word_embeddings", False))
    for name, known in KNOWN_VOCAB.items():
        if name.lower() == shape.model.lower():
            return known
    return None, False
