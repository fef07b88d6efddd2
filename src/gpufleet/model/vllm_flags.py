"""The command-line flags of ``vllm serve`` in the pinned image, to catch misspellings early.

vLLM rejects an unknown flag only when the container starts, minutes into a deploy and after the
old server was stopped. gpufleet checks ``extra_args`` on the controller instead, against the
``vllm serve`` flag set of the pinned vLLM release (``vllm_version.PINNED_IMAGE``) in
``vllm_serve_flags.json``, which ``scripts/generate_vllm_flags.py`` writes from vLLM's own
parser; flags the spec owns are refused in ``extra_args`` so there is one place for each
setting.
"""

from __future__ import annotations

import difflib
import json
import re
from importlib import resources
from typing import Any

# Flags that the spec sets itself: pass them through spec keys, not extra_args. Their other
# spellings (``-tp``, ``--no-enable-prefix-caching``, ...) come from the flag file (SPEC_OWNED).
_SPEC_KEYS: dict[str, str] = {
    "--model": "model",
    "--revision": "revision",
    "--served-model-name": "served_model_name",
    "--host": "bind_address",
    "--port": "port",
    "--gpu-memory-utilization": "gpu_memory_utilization",
    "--max-model-len": "max_model_len",
    "--max-num-seqs": "max_num_seqs",
    "--tensor-parallel-size": "tensor_parallel_size",
    "--quantization": "quantization",
    "--dtype": "quantization",
    "--kv-cache-dtype": "kv_cache_dtype",
    "--kv-cache-memory-bytes": "kv_cache_memory",
    "--enable-prefix-caching": "enable_prefix_caching",
    "--download-dir": "models_dir",
}

# Secrets never go on a command line (they would show in `ps` and the unit file).
SECRET_FLAGS = ("--api-key", "--hf-token")

# How vLLM's argparse takes each flag: the data file vllm_serve_flags.json next to this module
# (generated from the pinned release's parser; also read by the lab's stand-in vLLM). A bool
# field of vLLM's engine and frontend dataclasses becomes an ``argparse.BooleanOptionalAction``
# (``--x`` and ``--no-x``, no value); a list field takes one or more values (``nargs="+"``);
# everything else takes exactly one value.
FLAGS_FILE = "vllm_serve_flags.json"
SWITCH = "switch"          # BooleanOptionalAction: --x / --no-x, never a value
STORE_TRUE = "store_true"  # --x only (no --no-x), never a value
VALUE = "value"            # exactly one value: --x V or --x=V
VALUES = "values"          # nargs="+": one or more values (--x=V gives exactly one)
APPEND = "append"          # one value, and the flag may repeat (checked like VALUE)
OPTIONAL_VALUE = "optional_value"  # nargs="?" (only --hf-token, a secret: always refused)
KINDS = (SWITCH, STORE_TRUE, VALUE, VALUES, APPEND, OPTIONAL_VALUE)


def load_serve_flags() -> list[dict[str, Any]]:
    """The entries of vllm_serve_flags.json: ``flag``, ``kind``, optional ``aliases`` (and how
    the stand-in parses the value)."""
    text = resources.files(__package__).joinpath(FLAGS_FILE).read_text(encoding="utf-8")
    flags: list[dict[str, Any]] = json.loads(text)["flags"]
    for entry in flags:
        if entry["kind"] not in KINDS:
            raise ValueError(f"{FLAGS_FILE}: {entry['flag']} has an unknown kind {entry['kind']!r}")
    return flags


def _spellings(entry: dict[str, Any]) -> list[str]:
    """Every way to write one flag: itself, its aliases, and ``--no-`` forms of a switch."""
    names = [entry["flag"], *entry.get("aliases", ())]
    if entry["kind"] == SWITCH:
        names += ["--no-" + name[2:] for name in names if name.startswith("--")]
    return names


def _spec_owned(entries: list[dict[str, Any]]) -> dict[str, str]:
    owned = dict(_SPEC_KEYS)
    for entry in entries:
        if entry["flag"] in _SPEC_KEYS:
            owned.update(dict.fromkeys(_spellings(entry), _SPEC_KEYS[entry["flag"]]))
    return owned


def _not_extra(flag: str) -> bool:
    """Flags extra_args never carries (checked, with their own message, before the set)."""
    return flag in SPEC_OWNED or flag in SECRET_FLAGS


def _flag_table(entries: list[dict[str, Any]]) -> dict[str, tuple[str, ...]]:
    table: dict[str, list[str]] = {}
    for entry in entries:
        if not _not_extra(entry["flag"]):
            kind = VALUE if entry["kind"] == APPEND else entry["kind"]
            table.setdefault(kind, []).append(entry["flag"])
    return {kind: tuple(flags) for kind, flags in table.items()}


def _aliases(entries: list[dict[str, Any]]) -> dict[str, str]:
    return {alias: entry["flag"] for entry in entries for alias in entry.get("aliases", ())
            if not _not_extra(alias) and not _not_extra(entry["flag"])}


_SERVE_FLAGS = load_serve_flags()
# every spelling of a flag the spec sets -> the spec key to use instead
SPEC_OWNED: dict[str, str] = _spec_owned(_SERVE_FLAGS)
# kind -> the flags extra_args may carry
FLAG_TABLE: dict[str, tuple[str, ...]] = _flag_table(_SERVE_FLAGS)
# short spellings (a single-dash alias never gets a --no- form)
ALIASES: dict[str, str] = _aliases(_SERVE_FLAGS)


def _flag_kinds() -> dict[str, str]:
    kinds: dict[str, str] = {}
    for kind, flags in FLAG_TABLE.items():
        for flag in flags:
            kinds[flag] = kind
            if kind == SWITCH:
                kinds["--no-" + flag[2:]] = SWITCH
    for alias, flag in ALIASES.items():
        kinds[alias] = kinds[flag]
        if kinds[flag] == SWITCH and alias.startswith("--"):
            kinds["--no-" + alias[2:]] = SWITCH
    return kinds


# every accepted spelling -> how it takes values
FLAG_KINDS: dict[str, str] = _flag_kinds()
KNOWN_FLAGS: frozenset[str] = frozenset(FLAG_KINDS)

# argparse reads "-1" or "-.5" as a value, anything else starting with "-" as a flag
_NEGATIVE_NUMBER = re.compile(r"-\d+|-\d*\.\d+", re.ASCII)


def _flag_name(arg: str) -> str:
    """The flag as vLLM's FlexibleArgumentParser sees it: ``--max_num_seqs=8`` is
    ``--max-num-seqs``."""
    name = arg.split("=", 1)[0]
    return name.replace("_", "-") if name.startswith("--") else name


def _show(word: str) -> str:
    """A word for a one-line message: repr (so control characters show escaped), cut short."""
    text = repr(word)
    return text if len(text) <= 60 else text[:50] + "...' (" + str(len(word)) + " chars)"


def _is_value(arg: str) -> bool:
    return not arg.startswith("-") or bool(_NEGATIVE_NUMBER.fullmatch(arg))


def _refused(flag: str) -> str | None:
    if flag in SECRET_FLAGS:
        return (f"must not contain {flag}: secrets never go on the command line; gpufleet "
                "passes VLLM_API_KEY to vLLM and HF_TOKEN to the weight staging through "
                "root-only files")
    if flag in SPEC_OWNED:
        return f"must not contain {flag}: set the spec key {SPEC_OWNED[flag]!r} instead"
    if flag not in KNOWN_FLAGS:
        close = difflib.get_close_matches(flag, sorted(KNOWN_FLAGS | set(SPEC_OWNED)), n=1,
                                          cutoff=0.7)
        hint = ""
        if close:
            real = close[0]
            hint = f"; did you mean {real}?"
            if real in SPEC_OWNED:
                hint += f" (set the spec key {SPEC_OWNED[real]!r} instead)"
        shown = flag if flag.isprintable() and len(flag) <= 60 else _show(flag)
        return f"has an unknown vLLM flag {shown}{hint} (vllm serve would refuse to start)"
    return None


def expand_optimization_level(args: tuple[str, ...] | list[str]) -> list[str]:
    """vLLM's FlexibleArgumentParser reads ``-O3``, ``-O=3`` and ``-O 3`` (0-3) as
    ``--optimization-level 3`` before argparse sees them."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg.startswith("-O") and arg != "-O":
            out += ["--optimization-level", arg[3:] if arg[2] == "=" else arg[2:]]
        elif arg == "-O" and i + 1 < len(args) and args[i + 1] in ("0", "1", "2", "3"):
            out.append("--optimization-level")
        else:
            out.append(arg)
    return out


def check_extra_args(args: tuple[str, ...] | list[str]) -> str | None:
    """Return a message for the first problem in ``args``, or None when vLLM's argparse would
    take them: known flags only, a value after each flag that takes one and after no other."""
    args = expand_optimization_level(args)
    i = 0
    previous: str | None = None
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return "must not contain '--' (argparse would read every later word as positional)"
        if _is_value(arg) or arg == "-":
            after = (f": {previous} takes no value" if previous and
                     FLAG_KINDS.get(previous) in (SWITCH, STORE_TRUE) else "")
            return (f"has the word {_show(arg)} where a flag is expected{after} (vllm serve "
                    "would refuse to start: unrecognized arguments); the model is the spec "
                    "key 'model', and a value goes right after the flag that takes it")
        flag = _flag_name(arg)
        problem = _refused(flag)
        if problem:
            return problem
        kind = FLAG_KINDS[flag]
        explicit = "=" in arg
        i += 1
        if kind in (SWITCH, STORE_TRUE):
            if explicit:
                return f"has {_show(arg)}, but {flag} is a switch and takes no value (write {flag})"
        elif explicit:
            if not arg.split("=", 1)[1]:
                return f"has {_show(arg)}: {flag} needs a value ({flag}=VALUE)"
        else:
            if i >= len(args) or not _is_value(args[i]) or not args[i]:
                return (f"has {flag} without a value: it takes one ({flag} VALUE or "
                        f"{flag}=VALUE); vllm serve would refuse to start")
            i += 1
            while kind == VALUES and i < len(args) and _is_value(args[i]):
                i += 1
        previous = flag
    return None
