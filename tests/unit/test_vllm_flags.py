"""gpufleet's extra_args check and the lab's stand-in vLLM take vLLM's serve flags from one data
file, so they accept the same flags, each the same way."""

from __future__ import annotations

import argparse
import difflib
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from gpufleet.model import vllm_flags, vllm_version
from gpufleet_lab import images, vllm_standin

GENERATOR = Path(__file__).resolve().parents[2] / "scripts" / "generate_vllm_flags.py"


def _stored() -> str:
    return resources.files("gpufleet.model").joinpath(vllm_flags.FLAGS_FILE).read_text("utf-8")


def test_the_stored_flags_are_what_the_pinned_vllm_serve_accepts(vllm_python, tmp_path):
    """The flag file is vLLM's own ``vllm serve`` parser, regenerated from the installed
    release (about 10 s: importing vLLM); a difference is shown one flag a line."""
    fresh = tmp_path / vllm_flags.FLAGS_FILE
    run = subprocess.run([str(vllm_python), str(GENERATOR), "--output", str(fresh)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    diff = list(difflib.unified_diff(_stored().splitlines(), fresh.read_text().splitlines(),
                                     "stored", "vllm serve", n=0, lineterm=""))
    assert not diff, ("src/gpufleet/model/vllm_serve_flags.json differs from the installed "
                      "vLLM's parser (regenerate: <vllm venv>/bin/python "
                      "scripts/generate_vllm_flags.py):\n" + "\n".join(diff[:80]))


def test_the_flag_file_names_the_pinned_release_and_how_it_was_made():
    data = json.loads(_stored())
    assert data["vllm"] == str(vllm_version.PINNED_VERSION)
    assert data["about"].startswith("GENERATED") and "generate_vllm_flags.py" in data["about"]


def _standin_kinds() -> dict[str, str]:
    """Every option string of the stand-in's ``serve`` parser -> how argparse takes it."""
    parser = vllm_standin.build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    kinds: dict[str, str] = {}
    for action in subparsers.choices["serve"]._actions:
        if isinstance(action, argparse.BooleanOptionalAction):
            kind = vllm_flags.SWITCH
        elif isinstance(action, argparse._StoreTrueAction):
            kind = vllm_flags.STORE_TRUE
        elif isinstance(action, argparse._AppendAction):
            kind = vllm_flags.VALUE  # one value per occurrence, as gpufleet checks it
        elif action.nargs == "+":
            kind = vllm_flags.VALUES
        elif action.nargs == "?":
            kind = vllm_flags.OPTIONAL_VALUE
        elif isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        else:
            kind = vllm_flags.VALUE
        kinds.update(dict.fromkeys(action.option_strings, kind))
    return kinds


def test_product_and_standin_know_the_same_flags():
    standin = set(_standin_kinds())
    product = vllm_flags.KNOWN_FLAGS | set(vllm_flags.SPEC_OWNED) | set(vllm_flags.SECRET_FLAGS)
    assert standin - product == set(), "the stand-in takes flags gpufleet refuses"
    assert product - standin == set(), "gpufleet passes flags the stand-in refuses"


def test_product_and_standin_take_each_flag_the_same_way():
    standin = _standin_kinds()
    differ = {flag: (kind, standin[flag]) for flag, kind in vllm_flags.FLAG_KINDS.items()
              if standin[flag] != kind}
    assert differ == {}


def test_every_entry_has_a_known_kind_and_no_flag_twice():
    entries = vllm_flags.load_serve_flags()
    spellings = [s for e in entries for s in (e["flag"], *e.get("aliases", ()))]
    assert len(spellings) == len(set(spellings))
    assert {e["kind"] for e in entries} <= set(vllm_flags.KINDS)


@pytest.mark.parametrize("flag", ["--kv-cache-memory-bytes"])
def test_the_kv_cache_size_is_the_specs(flag):
    assert vllm_flags.check_extra_args([flag, "2G"]) == (
        f"must not contain {flag}: set the spec key 'kv_cache_memory' instead")
    vllm_standin.parse_cli(["serve", "m", flag, "2G"])    # the stand-in still takes it


@pytest.mark.parametrize("args", [["-O3"], ["-O", "0"],
                                  ["--middleware", "a.b", "--middleware", "c.d"], ["-ep"],
                                  ["--trust-request-chat-template"], ["-dpn", "0"],
                                  ["--no-enable-log-requests"]])
def test_flags_once_missing_on_one_side_are_taken_by_both(args):
    assert vllm_flags.check_extra_args(args) is None
    vllm_standin.parse_cli(["serve", "m", *args])


@pytest.mark.parametrize(("args", "hint"), [
    (["--swap-space", "8"], None), (["--disable-log-requests"], "--enable-log-requests"),
    (["--kv-cache-memory", "1G"], "--kv-cache-memory-bytes"),
    (["--cuda-graph-sizes", "8"], "--cudagraph-capture-sizes")])
def test_flags_gone_since_v0_11_are_refused(args, hint):
    """Gone in 0.32.0; ``--kv-cache-memory`` only ever worked as an abbreviation."""
    problem = vllm_flags.check_extra_args(args)
    assert problem is not None and f"unknown vLLM flag {args[0]}" in problem
    assert (hint is None and "did you mean" not in problem) or f"did you mean {hint}?" in problem
    if args[0] == "--kv-cache-memory":  # vLLM (and the stand-in) take it as an abbreviation
        assert vllm_standin.parse_cli(["serve", "m", *args])[0].kv_cache_memory_bytes
        return
    with pytest.raises(SystemExit):
        vllm_standin.parse_cli(["serve", "m", *args])


def test_every_spelling_of_a_spec_flag_names_its_spec_key():
    for flag, key in {"-tp": "tensor_parallel_size", "--device-memory-utilization":
                      "gpu_memory_utilization", "--no-enable-prefix-caching":
                      "enable_prefix_caching", "-q": "quantization"}.items():
        assert f"set the spec key {key!r}" in vllm_flags.check_extra_args([flag, "1"])


def test_disable_log_stats_is_store_true_on_both_sides():
    assert vllm_flags.check_extra_args(["--no-disable-log-stats"]) is not None
    with pytest.raises(SystemExit):
        vllm_standin.parse_cli(["serve", "m", "--no-disable-log-stats"])


def test_the_image_carries_the_flag_file_beside_the_standin(tmp_path: Path):
    """In the image the stand-in runs alone (stdlib, no gpufleet): it reads the copy beside it."""
    images.install_standin(tmp_path)
    vllm = tmp_path / "usr/local/bin/vllm"
    assert vllm.with_name(vllm_standin.FLAGS_FILE).read_bytes() == images.standin_flags()
    run = subprocess.run([sys.executable, "-I", "-S", str(vllm), "serve", "m",
                          "--kv-cache-memory-bytes", "1G", "--bogus"],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert "unrecognized arguments: --bogus" in run.stderr


def test_the_image_cache_key_covers_the_flag_file(monkeypatch):
    before = images.inputs_key(["deb http://mirror bookworm main"])
    monkeypatch.setattr(images, "standin_flags", lambda: b'{"flags": []}')
    assert images.inputs_key(["deb http://mirror bookworm main"]) != before
