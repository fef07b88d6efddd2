"""Every input is data, never code: hostile strings through every string field.

Each hostile string goes through every string field of the spec, each ``extra_args`` element and
``container_env`` key and value, from the YAML side (``build_spec`` data) and from the ``--data``
side (the raw text parsed as pyinfra's ``parse_cli_arg`` parses it). Each one either gets a SpecError
(one line, naming the key) or is accepted, and then arrives in the rendered unit as exactly one
literal argument: the unit is parsed with the systemd ExecStart splitter below, which follows
systemd.service(5) "Command lines" (line continuation, quoting, C escapes, ``%`` specifiers,
``$`` variables, lone ``;``), and compared word for word with the unit of a benign value.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from gpufleet.cli.data import parse_value as parse_cli_arg
from gpufleet.deploy.service import render_unit
from gpufleet.model.spec import SpecError, build_spec

# cli.data.parse_value is pyinfra_cli.util.parse_cli_arg, how the deploy gets --data (test_rollout
# pins the two together); importing pyinfra_cli here would monkey-patch gevent mid-run

BASE = {"service": "llama3", "model": "meta-llama/Meta-Llama-3-8B-Instruct",
        "image": "vllm/vllm-openai:v0.11.0"}
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# field -> a benign value of its shape, unique in the unit (hostile = benign + payload)
BENIGN = {
    "service": "benignsvc",
    "model": "benign-org/Benign-Model-1",
    "revision": "benign-rev",
    "image": "vllm/vllm-openai:v0.11.0-benign",
    "quantization": "fp16",
    "kv_cache_dtype": "fp8",
    "bind_address": "127.0.0.9",
    "served_model_name": "benign-served",
    "models_dir": "/srv/benignmodels",
    "compile_cache_dir": "/srv/benigncache",
    "toolkit_version": "1.17.8-1",
    "toolkit_repo_url": "https://benign.example/deb/$(ARCH)",
    "toolkit_key_url": "https://benign.example/gpgkey",
    "docker_cgroup_driver": "systemd",
    "docker_package": "docker.io",
    "extra_args[value]": "/benign/template.jinja",  # --chat-template VALUE
    "extra_args[flag]": "--enforce-eager",
    "container_env[key]": "VLLM_BENIGN",
    "container_env[value]": "benign-value",
}
# fields that are not rendered into the unit (the toolkit and docker operations take them)
NOT_IN_UNIT = {"toolkit_version", "toolkit_repo_url", "toolkit_key_url", "docker_cgroup_driver",
               "docker_package"}

PAYLOADS: dict[str, str] = {
    "newline": "\nExecStartPre=/usr/bin/touch /tmp/pwned\n#",
    "cr": "\rExecStartPre=/usr/bin/touch /tmp/pwned",
    "tab": "\t--privileged",
    "space": " --privileged -v /:/host -v /opt/x",
    "single_quote": "'x' 'y",
    "double_quote": '"x" "y',
    "subshell": "$(touch /tmp/pwned)",
    "backticks": "`touch /tmp/pwned`",
    "semicolon": " ; /usr/bin/touch /tmp/pwned",
    "semicolon_word": ";",
    "and": "&&touch",
    "pipe": "|touch",
    "traversal": "/../../root",
    "traversal_inside": "/../x/./y//z",
    "specifier": "%n%h%%%",
    "dollar": "$HOME${PATH}$$",
    "backslash": "\\x\\n\\",
    "nul": "\0x",
    "u2028": "\u2028ExecStartPre=/x",
    "long": "a" * 10000,
    "leading_dash": "-",  # a prefix, see hostile()
}


def hostile(field: str, payload: str) -> str:
    benign = BENIGN[field]
    if payload == "leading_dash":
        return "-" + benign.lstrip("-")
    return benign + PAYLOADS[payload]


# -- a faithful systemd command-line parser -------------------------------------------------------

_WHITESPACE = " \t\n\r"
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
                   "\\": "\\", '"': '"', "'": "'", "s": " "}


def unit_lines(unit: str) -> list[str]:
    """The unit's logical lines: a line ending in an unescaped backslash continues on the next
    one, the backslash becoming a space (systemd's conf-parser)."""
    lines: list[str] = []
    continuation = ""
    for raw in unit.split("\n"):
        if not continuation and raw.lstrip().startswith(("#", ";")):
            continue
        escaped = False
        for c in raw:
            escaped = not escaped if c == "\\" else False
        if escaped:
            continuation += raw[:-1] + " "
            continue
        lines.append((continuation + raw).strip())
        continuation = ""
    assert not continuation, "the unit ends inside a continuation"
    return [line for line in lines if line]


def settings(unit: str, key: str) -> list[str]:
    return [line.split("=", 1)[1].strip() for line in unit_lines(unit)
            if line.split("=", 1)[0].strip() == key]


def _cunescape(text: str, i: int) -> tuple[str, int]:
    """One C escape at text[i] (just after the backslash), as systemd's cunescape_one."""
    if i >= len(text):
        raise ValueError("backslash at the end of the line")
    c = text[i]
    if c in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[c], i + 1
    for prefix, digits, base in (("x", 2, 16), ("u", 4, 16), ("U", 8, 16)):
        if c == prefix:
            code = int(text[i + 1:i + 1 + digits], base)
            if code == 0:
                raise ValueError("\\x00 is refused")
            return chr(code), i + 1 + digits
    if c in "01234567":
        code = int(text[i:i + 3], 8)
        if code == 0:
            raise ValueError("\\000 is refused")
        return chr(code), i + 3
    raise ValueError(f"unknown escape \\{c}")


def _resolve(word: str) -> str:
    """Specifiers (``%%`` only: any other would be expanded) and variables (``$$`` only)."""
    out = []
    i = 0
    while i < len(word):
        c = word[i]
        if c in "%$":
            if word[i + 1:i + 2] != c:
                raise ValueError(f"{c}{word[i + 1:i + 2]} would be expanded by systemd")
            out.append(c)
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def systemd_split(value: str) -> list[str]:
    """The argv systemd runs for an ``Exec*=`` value (one command: a lone ``;`` would start a
    second one, which is an error here)."""
    words: list[str] = []
    i = 0
    while True:
        while i < len(value) and value[i] in _WHITESPACE:
            i += 1
        if i >= len(value):
            break
        rest = value[i:]
        if rest[0] == ";" and (len(rest) == 1 or rest[1] in _WHITESPACE):
            raise ValueError("a lone ';' starts a second command")
        if rest[:2] == "\\;" and (len(rest) == 2 or rest[2] in _WHITESPACE):
            words.append(";")
            i += 2
            continue
        word: list[str] = []
        quote = None
        while i < len(value):
            c = value[i]
            if quote is None and c in _WHITESPACE:
                break
            if c == "\\":
                text, i = _cunescape(value, i + 1)
                word.append(text)
                continue
            if quote is None and c in "'\"":
                quote = c
            elif c == quote:
                quote = None
            else:
                word.append(c)
            i += 1
        if quote is not None:
            raise ValueError("unbalanced quotes")
        words.append(_resolve("".join(word)))
    return words


def test_the_splitter_follows_systemd():
    assert systemd_split('a "b c" d\\se \'f "g\' "x\\ny" %%n $$x') == \
        ["a", "b c", "d e", 'f "g', "x\ny", "%n", "$x"]
    assert systemd_split('"a"b"c d"') == ["abc d"]
    assert systemd_split("x \\; y") == ["x", ";", "y"]
    assert systemd_split('x ";" y') == ["x", ";", "y"]
    for bad in ("x ; y", 'x "y', "x %n", "x $HOME", "x \\q", "x \\x00"):
        with pytest.raises(ValueError):
            systemd_split(bad)
    assert unit_lines("A=1 \\\n  2\n# c \\\nB=3\n") == ["A=1    2", "B=3"]


# -- building a spec from a field and a value ----------------------------------------------------

def spec_data(field: str, value: str) -> dict[str, object]:
    """(data as YAML gives it) for one hostile value in one field."""
    if field == "extra_args[value]":
        return {"extra_args": ["--chat-template", value]}
    if field == "extra_args[flag]":
        return {"extra_args": [value]}
    if field == "container_env[key]":
        return {"container_env": {value: "x"}}
    if field == "container_env[value]":
        return {"container_env": {"VLLM_X": value}}
    return {field: value}


def data_override(field: str, value: str) -> dict[str, object]:
    """The same value as ``--data key=TEXT`` hands it to the deploy: pyinfra's parse_cli_arg."""
    if field.startswith("extra_args"):
        text = json.dumps(spec_data(field, value)["extra_args"])
        return {"extra_args": parse_cli_arg(text)}
    if field.startswith("container_env"):
        return {"container_env": parse_cli_arg(json.dumps(spec_data(field, value)["container_env"]))}
    return {field: parse_cli_arg(value)}


def stored(spec, field: str) -> str:
    """The value as the spec keeps it (paths normalized)."""
    if field == "extra_args[value]":
        return spec.extra_args[1]
    if field == "extra_args[flag]":
        return spec.extra_args[0]
    if field == "container_env[key]":
        return spec.container_env[0][0]
    if field == "container_env[value]":
        return spec.container_env[0][1]
    return getattr(spec, field)


def exec_lines(unit: str) -> dict[str, list[list[str]]]:
    return {key: [systemd_split(v) for v in settings(unit, key)]
            for key in ("ExecStartPre", "ExecStart", "ExecStop")}


def assert_one_literal_argument(field: str, spec, benign_spec) -> None:
    """The unit of ``spec`` is the unit of ``benign_spec`` with the benign value replaced by the
    hostile one inside the same words: as many lines and settings, as many words per command,
    each differing word holding the value literally."""
    unit, benign_unit = render_unit(spec, COMMIT), render_unit(benign_spec, COMMIT)
    assert len(unit.splitlines()) == len(benign_unit.splitlines())
    keys = [line.split("=", 1)[0] for line in unit_lines(unit)]
    assert keys == [line.split("=", 1)[0] for line in unit_lines(benign_unit)]
    value, benign = stored(spec, field), stored(benign_spec, field)
    hostile_cmds, benign_cmds = exec_lines(unit), exec_lines(benign_unit)
    for key, commands in hostile_cmds.items():
        for argv, benign_argv in zip(commands, benign_cmds[key], strict=True):
            assert len(argv) == len(benign_argv), (key, argv)
            for word, benign_word in zip(argv, benign_argv, strict=True):
                if word != benign_word:
                    assert word == benign_word.replace(benign, value), (word, benign_word)
    if field not in ("quantization", "kv_cache_dtype", "docker_cgroup_driver"):
        words = [w for argv in hostile_cmds["ExecStart"] for w in argv]
        assert any(value in w for w in words) or field in NOT_IN_UNIT


def try_field(field: str, value: str, via_data: bool) -> str:
    """'refused' or 'one literal arg' (or 'accepted, not in unit'); asserts either outcome."""
    source = "--data" if via_data else "llama3.yaml"
    try:
        if via_data:
            spec = build_spec(BASE, overrides=data_override(field, value), source=source)
        else:
            spec = build_spec({**BASE, **spec_data(field, value)}, source=source)
    except SpecError as e:
        message = str(e)
        assert "\n" not in message and "\r" not in message and len(message) < 1200, message
        assert message.startswith(f"{source}: ")
        assert field.split("[")[0] in message, message
        return "refused"
    benign = build_spec({**BASE, **spec_data(field, BENIGN[field])})
    assert_one_literal_argument(field, spec, benign)
    return "accepted, not in unit" if field in NOT_IN_UNIT else "one literal arg"


def field_summary(field: str) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    for payload in PAYLOADS:
        for via_data in (False, True):
            outcomes[try_field(field, hostile(field, payload), via_data)] += 1
    return outcomes


@pytest.mark.parametrize("field", sorted(BENIGN))
def test_hostile_values_are_refused_or_one_literal_argument(field):
    outcomes = field_summary(field)
    assert sum(outcomes.values()) == 2 * len(PAYLOADS)


def test_summary_of_every_field(capsys):
    summary = {field: field_summary(field) for field in sorted(BENIGN)}
    with capsys.disabled():
        print(f"\nhostile inputs: {len(PAYLOADS)} payloads x 2 paths (YAML, --data) per field")
        for field, outcomes in summary.items():
            print(f"  {field:<22} tried {sum(outcomes.values()):>3}: " +
                  ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
        total: Counter[str] = sum(summary.values(), Counter())
        print(f"  {'all':<22} tried {sum(total.values()):>3}: " +
              ", ".join(f"{k} {v}" for k, v in sorted(total.items())))
    # control characters, NUL, the line separator are refused everywhere
    for field in BENIGN:
        for payload in ("newline", "cr", "nul", "u2028"):
            for via_data in (False, True):
                assert try_field(field, hostile(field, payload), via_data) == "refused"
    # the values that are free text by nature arrive literally, whatever they hold
    for field in ("extra_args[value]", "container_env[value]"):
        assert summary[field]["one literal arg"] >= 2 * 12


def test_the_findings_own_inputs():
    """Finding 1 as reported: the newline and the space in models_dir."""
    with pytest.raises(SpecError, match=r"models_dir must not contain the character '\\n'"):
        build_spec(BASE, overrides={
            "models_dir": "/opt/m\nExecStartPre=/usr/bin/touch /tmp/pwned\n#"})
    with pytest.raises(SpecError, match="models_dir may use only"):
        build_spec(BASE, overrides={"models_dir": "/opt/models --privileged -v /:/host -v /opt/x"})


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verifies_a_unit_with_hostile_values(tmp_path: Path):
    """systemd itself parses a unit with a hostile container_env and extra_args value without an
    error or a warning (docker is replaced by a stub, which verify needs to exist)."""
    value = "a b;c ; $(touch /tmp/pwned) `id` 'q' \"dq\" %n %% $HOME ${X} \\ \\n && | \u00e9"
    spec = build_spec({**BASE, "container_env": {"VLLM_X": value},
                       "extra_args": ["--chat-template", value, "--seed", "-1"]})
    unit = render_unit(spec, COMMIT)
    argv = systemd_split(settings(unit, "ExecStart")[0])
    assert f"VLLM_X={value}" in argv and argv[argv.index(f"VLLM_X={value}") - 1] == "-e"
    assert argv[argv.index("--chat-template") + 1] == value
    stub = tmp_path / "docker"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    (tmp_path / "docker.service").write_text("[Service]\nExecStart=/bin/true\n")
    path = tmp_path / spec.unit_name
    path.write_text(unit.replace("/usr/bin/docker", str(stub)))
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    # and systemd does see the mistakes this test would otherwise miss
    path.write_text(unit.replace("/usr/bin/docker", str(stub)).replace("%%n", "%Z"))
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and "specifier" in result.stderr
