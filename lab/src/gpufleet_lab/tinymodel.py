"""Lab stand-in: a tiny, deterministic Llama-architecture model repository (TEST INFRASTRUCTURE).

Not a trained model: the weights are pseudo-random bf16 values, generated the same way on every
machine, so that every byte, git blob id, sha256 and commit id below is fixed. The Hub emulator
(``gpufleet_lab.hub_emulator``) serves it as a public and as a gated repository so that the
real ``huggingface_hub`` client, gpufleet's model-shape reader and the host-side weight staging run
end to end without the real Hugging Face Hub; the real vLLM (the CPU build the lab runs) loads
and serves it too.

The repository, like a real one on the Hub:

* ``.gitattributes``         (``*.safetensors`` and friends tracked by Git LFS)
* ``README.md``              model card with YAML front matter
* ``config.json``            ``LlamaForCausalLM``: 2 layers, hidden 128, 2 attention heads,
  1 KV head, head_dim 64, intermediate 3072, max_position_embeddings 8192, vocab 259,
  torch_dtype bfloat16
* ``generation_config.json``
* ``model.safetensors``      a real safetensors file (LFS, ~5.0 MB, 2,524,544 bf16 parameters)
* ``special_tokens_map.json``, ``tokenizer.json`` (byte-fallback BPE: ``<unk>``, ``<s>``,
  ``</s>`` and the 256 byte tokens), ``tokenizer_config.json``

Why this shape: vLLM's CPU attention backend only takes head sizes 32, 64, 80, 96, 112, 128, 160,
192, 224, 256 and 512 (``CPUAttentionBackend.get_supported_head_sizes`` in vLLM 0.32.0's
``vllm/v1/attention/backends/cpu_attn.py``; head_dim 16 fails at the first request with
"Unsupported CPU attention configuration"), and the lab's deploy spec asks max_model_len 8192,
which vLLM refuses above max_position_embeddings (``vllm/config/model.py``, "User-specified
max_model_len ... is greater than the derived max_model_len"). The intermediate size only sets
the file size.

Two commits, with real git object ids (blob, tree and commit ids computed the way git does; an
LFS file's git blob is its LFS pointer):

* ``COMMIT_MAIN`` (branch ``main``, tag ``v1.0``): the initial commit.
* ``COMMIT_NEXT`` (branch ``next``): a child of ``main`` where only ``generation_config.json``
  differs (temperature 0.6 -> 0.7), for "changing the revision stages the new one": the weights
  blob is shared, only one small file is new.

The weight file is large enough (several MB) that an interrupted download can be observed
mid-file, and small enough to build in well under a second.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# -- the model ----------------------------------------------------------------------------------

NUM_LAYERS = 2
HIDDEN_SIZE = 128
NUM_ATTENTION_HEADS = 2
NUM_KV_HEADS = 1
HEAD_DIM = HIDDEN_SIZE // NUM_ATTENTION_HEADS  # 64: a head size vLLM's CPU attention takes
INTERMEDIATE_SIZE = 3072
MAX_POSITION_EMBEDDINGS = 8192
VOCAB_SIZE = 259  # <unk>, <s>, </s> + 256 byte-fallback tokens
TORCH_DTYPE = "bfloat16"
SAFETENSORS_FILE = "model.safetensors"

# Fixed identities: the git commit ids of the generated content (``revisions()`` computes them;
# the unit tests check that they still match, and ``git commit`` of the same files with the same
# author, dates and messages gives the same ids).
COMMIT_MAIN = "20a10702226f10727dacdee59bd5c0a1441b3359"
COMMIT_NEXT = "c0049989a84c84b36705cba470e32e10b1e11431"
BRANCHES: dict[str, str] = {"main": COMMIT_MAIN, "next": COMMIT_NEXT}
TAGS: dict[str, str] = {"v1.0": COMMIT_MAIN}

_AUTHOR = "gpufleet lab <lab@gpufleet.invalid>"
_COMMIT_TIMES = {"main": 1714000000, "next": 1714086400}  # 2024-04-24/25, fixed
LAST_MODIFIED = {"main": "2024-04-24T23:06:40.000Z", "next": "2024-04-25T23:06:40.000Z"}
CREATED_AT = "2024-04-24T23:06:40.000Z"

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.h5", "*.msgpack")

GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS
)

CARD_DATA: dict[str, Any] = {
    "license": "apache-2.0",
    "library_name": "transformers",
    "pipeline_tag": "text-generation",
    "tags": ["llama", "gpufleet-lab", "tiny"],
}


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def config() -> dict[str, Any]:
    """config.json of the tiny model (a Llama config as transformers writes it)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN_SIZE,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE_SIZE,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": NUM_ATTENTION_HEADS,
        "num_hidden_layers": NUM_LAYERS,
        "num_key_value_heads": NUM_KV_HEADS,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": TORCH_DTYPE,
        "transformers_version": "4.44.0",
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
    }


def generation_config(variant: str = "main") -> dict[str, Any]:
    return {
        "bos_token_id": 1,
        "do_sample": True,
        "eos_token_id": 2,
        "max_length": MAX_POSITION_EMBEDDINGS,
        "temperature": 0.6 if variant == "main" else 0.7,
        "top_p": 0.9,
        "transformers_version": "4.44.0",
    }


_SPECIALS = ("<unk>", "<s>", "</s>")


def tokenizer_json() -> dict[str, Any]:
    """A byte-fallback BPE tokenizer in the ``tokenizers`` JSON format (Llama 2 style)."""
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(_SPECIALS) + b
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, tok in enumerate(_SPECIALS)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<s>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


def tokenizer_config() -> dict[str, Any]:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, tok in enumerate(_SPECIALS)
        },
        "bos_token": "<s>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "pad_token": None,
        "tokenizer_class": "LlamaTokenizerFast",
        "unk_token": "<unk>",
    }


def special_tokens_map() -> dict[str, Any]:
    return {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


# -- safetensors ---------------------------------------------------------------------------------


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint with its shape (the names transformers' Llama uses)."""
    kv = NUM_KV_HEADS * HEAD_DIM
    q = NUM_ATTENTION_HEADS * HEAD_DIM
    shapes: dict[str, tuple[int, ...]] = {
        "lm_head.weight": (VOCAB_SIZE, HIDDEN_SIZE),
        "model.embed_tokens.weight": (VOCAB_SIZE, HIDDEN_SIZE),
        "model.norm.weight": (HIDDEN_SIZE,),
    }
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (HIDDEN_SIZE,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN_SIZE,)
        shapes[p + "self_attn.q_proj.weight"] = (q, HIDDEN_SIZE)
        shapes[p + "self_attn.k_proj.weight"] = (kv, HIDDEN_SIZE)
        shapes[p + "self_attn.v_proj.weight"] = (kv, HIDDEN_SIZE)
        shapes[p + "self_attn.o_proj.weight"] = (HIDDEN_SIZE, q)
        shapes[p + "mlp.gate_proj.weight"] = (INTERMEDIATE_SIZE, HIDDEN_SIZE)
        shapes[p + "mlp.up_proj.weight"] = (INTERMEDIATE_SIZE, HIDDEN_SIZE)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN_SIZE, INTERMEDIATE_SIZE)
    return dict(sorted(shapes.items()))


def parameter_count() -> int:
    total = 0
    for shape in tensor_shapes().values():
        n = 1
        for dim in shape:
            n *= dim
        total += n
    return total


def readme() -> str:
    """README.md: the model card, its table written from the constants above."""
    rows = (
        ("layers", f"{NUM_LAYERS}"),
        ("hidden size", f"{HIDDEN_SIZE}"),
        ("attention heads / KV heads", f"{NUM_ATTENTION_HEADS} / {NUM_KV_HEADS}"),
        ("head dim", f"{HEAD_DIM}"),
        ("intermediate size", f"{INTERMEDIATE_SIZE}"),
        ("max position embeddings", f"{MAX_POSITION_EMBEDDINGS}"),
        ("parameters", f"{parameter_count():,} (bf16)"),
    )
    front = "".join(f"- {tag}\n" for tag in CARD_DATA["tags"])
    table = "".join(f"| {name} | {value} |\n" for name, value in rows)
    return (
        f"---\nlicense: {CARD_DATA['license']}\nlibrary_name: {CARD_DATA['library_name']}\n"
        f"pipeline_tag: {CARD_DATA['pipeline_tag']}\ntags:\n{front}---\n\n"
        "# tiny-llama (gpufleet lab)\n\n"
        "A tiny Llama-architecture checkpoint generated by `gpufleet_lab.tinymodel` for gpufleet's "
        "lab.\nIt is NOT a trained model: the weights are deterministic pseudo-random bf16 values. "
        "It exists so\nthat the Hugging Face client code, the VRAM planner, the weight staging and "
        "the real vLLM\n(CPU build) run end to end against the lab's Hub emulator.\n\n"
        "| | |\n| --- | --- |\n" + table
    )


# bf16 little-endian: the high byte holds the sign and the top 7 exponent bits. Mapping it to
# 0x3C/0xBC keeps every value a small finite weight (|x| in [2**-7, 2**-5)), never NaN or inf.
_HIGH_BYTE = bytes((b & 0x80) | 0x3C for b in range(256))
_BF16_ONE = b"\x80\x3f"  # 1.0 in bf16, little-endian


# Token ids of the bytes " " to "~". Every other row of lm_head is zero (logit 0), so greedy
# decoding picks printable ASCII: a reply is visible text, never a held-back partial UTF-8 byte
# sequence (with random rows the real vLLM answered completions with "").
PRINTABLE_TOKENS = range(len(_SPECIALS) + 0x20, len(_SPECIALS) + 0x7F)


def _tensor_bytes(name: str, count: int) -> bytes:
    if name.endswith("norm.weight"):
        return _BF16_ONE * count  # RMSNorm weights start at 1.0, as after initialisation
    raw = bytearray(hashlib.shake_256(b"gpufleet-tiny-llama/" + name.encode()).digest(count * 2))
    raw[1::2] = bytes(raw[1::2]).translate(_HIGH_BYTE)
    if name == "lm_head.weight":
        row = 2 * HIDDEN_SIZE
        for token in range(VOCAB_SIZE):
            if token not in PRINTABLE_TOKENS:
                raw[token * row:(token + 1) * row] = bytes(row)
    return bytes(raw)


def safetensors_bytes() -> bytes:
    """The checkpoint in the safetensors format: an 8-byte little-endian header length, a JSON
    header (``__metadata__`` {"format": "pt"}, then each tensor's dtype, shape and
    ``data_offsets`` relative to the data section), padded with spaces to a multiple of 8, then
    the tensors' raw bytes back to back."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    chunks: list[bytes] = []
    offset = 0
    for name, shape in tensor_shapes().items():
        count = 1
        for dim in shape:
            count *= dim
        data = _tensor_bytes(name, count)
        header[name] = {"dtype": "BF16", "shape": list(shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


# -- git objects ---------------------------------------------------------------------------------


def git_blob_id(content: bytes) -> str:
    """The git object id of a blob (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(content: bytes) -> bytes:
    sha = hashlib.sha256(content).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(content)}\n".encode()


def is_lfs(path: str) -> bool:
    return any(path.endswith(pattern[1:]) for pattern in LFS_PATTERNS)


@dataclass(frozen=True)
class RepoFile:
    """One file of a revision. For LFS files the git blob is the LFS pointer, as on the Hub."""

    path: str
    content: bytes

    @property
    def size(self) -> int:
        return len(self.content)

    @property
    def lfs(self) -> bool:
        return is_lfs(self.path)

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @functools.cached_property
    def pointer(self) -> bytes | None:
        return lfs_pointer(self.content) if self.lfs else None

    @functools.cached_property
    def blob_id(self) -> str:
        """The git blob id: of the content, or of the LFS pointer for an LFS file."""
        return git_blob_id(self.pointer if self.pointer is not None else self.content)

    @property
    def etag(self) -> str:
        """What the Hub sends as the file's ETag (and the name of its blob in the HF cache):
        the sha256 for an LFS file, the git blob id otherwise."""
        return self.sha256 if self.lfs else self.blob_id


@dataclass(frozen=True)
class Revision:
    name: str  # "main" or "next": which variant of the files
    commit: str
    parent: str | None
    message: str
    tree: str
    timestamp: int
    files: Mapping[str, RepoFile]

    @property
    def last_modified(self) -> str:
        return LAST_MODIFIED[self.name]


def _tree_id(files: Mapping[str, RepoFile]) -> str:
    # git sorts tree entries by name (files only here); mode 100644, raw 20-byte object ids
    body = b"".join(
        b"100644 " + path.encode() + b"\0" + bytes.fromhex(files[path].blob_id)
        for path in sorted(files)
    )
    return hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()


def _commit_id(tree: str, parent: str | None, timestamp: int, message: str) -> str:
    lines = [f"tree {tree}"]
    if parent:
        lines.append(f"parent {parent}")
    lines.append(f"author {_AUTHOR} {timestamp} +0000")
    lines.append(f"committer {_AUTHOR} {timestamp} +0000")
    body = ("\n".join(lines) + "\n\n" + message + "\n").encode()
    return hashlib.sha1(b"commit %d\0" % len(body) + body).hexdigest()


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


@functools.cache
def _weights() -> bytes:
    return safetensors_bytes()


def file_contents(variant: str = "main") -> dict[str, bytes]:
    """path -> bytes of every file of the repository at ``variant`` ("main" or "next")."""
    if variant not in ("main", "next"):
        raise ValueError(f"unknown variant {variant!r}: 'main' or 'next'")
    return {
        ".gitattributes": GITATTRIBUTES.encode(),
        "README.md": readme().encode(),
        "config.json": _json_bytes(config()),
        "generation_config.json": _json_bytes(generation_config(variant)),
        SAFETENSORS_FILE: _weights(),
        "special_tokens_map.json": _json_bytes(special_tokens_map()),
        "tokenizer.json": _json_bytes(tokenizer_json()),
        "tokenizer_config.json": _json_bytes(tokenizer_config()),
    }


@functools.cache
def revisions() -> dict[str, Revision]:
    """The two commits, by variant name ("main", "next")."""
    out: dict[str, Revision] = {}
    parent: str | None = None
    messages = {"main": "Initial commit: tiny Llama for the gpufleet lab",
                "next": "generation_config: temperature 0.7"}
    for name in ("main", "next"):
        files = {p: RepoFile(p, c) for p, c in file_contents(name).items()}
        tree = _tree_id(files)
        commit = _commit_id(tree, parent, _COMMIT_TIMES[name], messages[name])
        out[name] = Revision(name, commit, parent, messages[name], tree, _COMMIT_TIMES[name],
                             files)
        parent = commit
    return out


def commits() -> dict[str, Revision]:
    """commit id -> Revision."""
    return {rev.commit: rev for rev in revisions().values()}


def build_repo(dest: Path, revision: str = "main") -> dict[str, bytes]:
    """Write the repository's files at ``revision`` (a variant name, branch, tag or commit id)
    under ``dest`` and return them (path -> bytes)."""
    rev = resolve(revision)
    if rev is None:
        raise ValueError(f"unknown revision {revision!r}")
    files = {path: f.content for path, f in rev.files.items()}
    for path, content in files.items():
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return files


def resolve(revision: str) -> Revision | None:
    """A branch, tag or full commit id -> its Revision (None if unknown)."""
    revs = revisions()
    commit = BRANCHES.get(revision) or TAGS.get(revision) or revision
    for rev in revs.values():
        if rev.commit == commit:
            return rev
    return None
