"""What a model's weights weigh on the GPUs under each quantization, and why."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gpufleet.model.model_shape import ModelShape
from gpufleet.planner.shapes import vocabulary
from gpufleet.planner.units import gib

# AWQ/GPTQ 4-bit: 0.5 byte per weight plus, per group of 128 weights, an fp16 scale and a 4-bit
# zero point (2.5 bytes / 128). Embeddings, lm_head and norms stay 16-bit.
QUANT_4BIT_BYTES_PER_PARAM = 0.5 + 2.5 / 128


@dataclass(frozen=True)
class WeightEstimate:
    total_bytes: int                # the model as vLLM holds it after loading
    load_peak_bytes: int            # on the GPUs while loading (all GPUs together)
    fmt: str                        # in words
    compute: str                    # fp16|bf16|fp8|awq|gptq: what the GPU must support
    problems: tuple[str, ...] = ()  # refusals that do not depend on the GPU
    notes: tuple[str, ...] = ()
    loads_16bit_first: bool = False  # online fp8 of vLLM < 0.32: the whole 16-bit model first


def estimate_weights(shape: ModelShape, quantization: str, *, fp8_flag: str = "fp8",
                     fp8_loads_16bit: bool = True) -> WeightEstimate:
    """What the weights weigh under ``quantization`` (spec values), and why. ``fp8_flag`` and
    ``fp8_loads_16bit``: how the image's vLLM spells and loads online fp8
    (``gpufleet.model.vllm_releases.VllmRelease``)."""
    checkpoint = (shape.quantization or "").strip().lower()
    if checkpoint:
        return _prequantized(shape, quantization, checkpoint)
    if quantization in ("auto", "fp16", "bf16"):
        return _sixteen_bit(shape, quantization)
    unquantized, split_note = _unquantized_parameters(shape)
    linear = shape.parameters - unquantized
    if quantization == "fp8":
        return _online_fp8(shape, linear, unquantized, split_note, fp8_flag, fp8_loads_16bit)
    return _four_bit(shape, quantization, linear, unquantized, split_note)


def _dtype(shape: ModelShape) -> str:
    return shape.torch_dtype.lower().replace("torch.", "")


def _prequantized(shape: ModelShape, quantization: str, checkpoint: str) -> WeightEstimate:
    """Already quantized: the files are what vLLM loads; --dtype only sets activations."""
    notes = (f"the checkpoint is already quantized ({checkpoint}): weights are the checkpoint's "
             f"{gib(shape.weight_bytes)} of files",)
    problems: tuple[str, ...] = ()
    family = "awq" if checkpoint.startswith("awq") else "gptq" if checkpoint.startswith("gptq") \
        else checkpoint
    if quantization in ("fp8", "awq", "gptq") and quantization != family:
        problems = (f"the checkpoint is quantized with {checkpoint}; vLLM refuses "
                    f"--quantization {quantization} for it: set quantization: auto",)
    compute = "fp8" if family == "fp8" else family if family in ("awq", "gptq") \
        else quantization if quantization in ("fp16", "bf16") else "fp16"
    return WeightEstimate(shape.weight_bytes, shape.weight_bytes, f"{checkpoint} checkpoint",
                          compute, problems, notes)


def _sixteen_bit(shape: ModelShape, quantization: str) -> WeightEstimate:
    dtype = _dtype(shape)
    half = "bf16" if dtype in ("bfloat16", "bf16") else "fp16"
    mode = half if quantization == "auto" else quantization
    notes: tuple[str, ...] = ()
    if dtype in ("float32", "fp32"):
        notes = ("float32 checkpoint: vLLM loads it as 16-bit (auto picks float16 or "
                 "bfloat16), 2 bytes per parameter",)
    words = {"fp16": "float16", "bf16": "bfloat16"}[mode]
    fmt = f"{half} checkpoint as {words}" if quantization != "auto" else f"{words} (auto)"
    return WeightEstimate(shape.parameters * 2, shape.parameters * 2, fmt, mode, (), notes)


def _unquantized_parameters(shape: ModelShape) -> tuple[int, str]:
    """The parameters vLLM keeps 16-bit under fp8/AWQ/GPTQ (embeddings, lm_head, norms), and a
    note saying so."""
    vocab, tied = vocabulary(shape)
    if not vocab:
        return 0, ("vocabulary size unknown: all parameters counted as quantized, but vLLM "
                   "keeps embeddings and lm_head 16-bit, so the weights are larger than shown")
    embeddings = vocab * shape.hidden_size * (1 if tied else 2)
    norms = (2 * shape.num_layers + 1) * shape.hidden_size
    return embeddings + norms, (f"embeddings and lm_head ({embeddings:,} parameters, vocabulary "
                                f"{vocab:,}) and norms stay 16-bit")


def _online_fp8(shape: ModelShape, linear: int, unquantized: int, split_note: str,
                flag: str, loads_16bit: bool) -> WeightEstimate:
    total = linear + unquantized * 2
    if loads_16bit:
        peak, how = shape.parameters * 2, (
            "online fp8 loads the model at its original precision before quantizing "
            "(vLLM docs, features/quantization/fp8.md: 'you need enough memory to load the "
            "whole model'); that transient peak needs physical GPU memory, not the budget: "
            "vLLM measures the weights after quantization")
    else:
        # one decoder layer's linear weights at 16 bits next to their fp8 copy
        peak, how = total + 2 * math.ceil(linear / max(1, shape.num_layers)), (
            "online fp8 quantizes each layer as its weights load (they wait on the meta "
            "device), so loading needs the fp8 model plus one layer at 16 bits, not the "
            "whole 16-bit model")
    notes = (f"online fp8 (vLLM --quantization {flag} on a 16-bit checkpoint): linear layers "
             f"at 1 byte per parameter; {split_note}", how)
    return WeightEstimate(total, peak, "online fp8 (linear layers)", "fp8", (), notes,
                          loads_16bit_first=loads_16bit)


def _four_bit(shape: ModelShape, quantization: str, linear: int, unquantized: int,
              split_note: str) -> WeightEstimate:
    """AWQ/GPTQ need a checkpoint made by AutoAWQ/GPTQModel/llm-compressor; vLLM cannot
    quantize to them at load. The numbers estimate such a checkpoint."""
    total = math.ceil(linear * QUANT_4BIT_BYTES_PER_PARAM) + unquantized * 2
    problems = (f"--quantization {quantization} needs a checkpoint quantized with "
                f"{quantization} (config.json quantization_config.quant_method); "
                f"{shape.model} is a {_dtype(shape)} checkpoint: point model at an "
                f"{quantization.upper()} export of it. The numbers estimate such a checkpoint",)
    notes = (f"{quantization} 4-bit: {QUANT_4BIT_BYTES_PER_PARAM:.4f} bytes per linear weight "
             f"(0.5 + an fp16 scale and 4-bit zero per group of 128); {split_note}",)
    return WeightEstimate(total, total, f"{quantization} 4-bit (estimate)", quantization,
                          problems, notes)
