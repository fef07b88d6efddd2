"""What the planner needs to know about a model, read from the Hub (config.json + safetensors
metadata) by ``gpufleet.clients.hub``. Pure data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    model: str                      # Hugging Face model id
    commit: str                     # the revision, resolved to a 40-hex commit
    num_layers: int                 # config: num_hidden_layers
    hidden_size: int                # config: hidden_size
    num_attention_heads: int        # config: num_attention_heads
    num_kv_heads: int               # config: num_key_value_heads (defaults to attention heads)
    head_dim: int                   # config: head_dim, else hidden_size // num_attention_heads
    max_position_embeddings: int    # config: max_position_embeddings
    torch_dtype: str                # config: torch_dtype / dtype, e.g. "bfloat16"
    parameters: int                 # total parameter count (safetensors metadata)
    weight_bytes: int               # bytes of the checkpoint's weight files
    quantization: str | None = None  # config: quantization_config.quant_method (awq, gptq, fp8...)
    files: tuple[dict[str, Any], ...] = field(default_factory=tuple)  # [{path, size, sha256?}]
    gated: bool = False
    vocab_size: int | None = None   # config: vocab_size (embeddings/lm_head stay 16-bit in fp8)
    tie_word_embeddings: bool = False

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["files"] = list(self.files)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelShape:
        values = dict(data)
        values["files"] = tuple(values.get("files") or ())
        return cls(**values)
