"""The rendered systemd unit: the docker run line users used to paste by hand, pinned."""

import dataclasses

import pytest

from gpufleet.deploy.service import render_unit
from gpufleet.deploy.unit_file import systemd_comment, systemd_quote, systemd_text, template_path
from gpufleet.model.spec import build_spec
from tests.unit.test_hostile_inputs import settings, systemd_split

SPEC = build_spec({"service": "llama3", "model": "meta-llama/Meta-Llama-3-8B-Instruct",
                   "image": "vllm/vllm-openai:v0.11.0", "served_model_name": "llama3-8b",
                   "quantization": "fp8", "max_num_seqs": 32})


def test_template_ships_with_the_package():
    assert template_path("vllm.service.j2").is_file()


def test_unit_runs_the_pinned_image_with_gpu_flags():
    unit = render_unit(SPEC)
    assert "Restart=always" in unit
    assert "ExecStartPre=-/usr/bin/docker rm -f gpufleet-llama3" in unit
    run = unit.split("ExecStart=", 1)[1].split("\nExecStop", 1)[0].replace("\\\n", " ")
    for part in (
        "docker run --rm --name gpufleet-llama3",
        "--runtime nvidia",
        "--gpus all",
        "--ipc=host",
        "-p 127.0.0.1:8001:8000",  # behind the front, never on the host's addresses
        "-v /opt/models:/root/.cache/huggingface",
        "-v /etc/gpufleet/llama3.env:/run/gpufleet/service.env:ro",
        "--entrypoint /bin/sh vllm/vllm-openai:v0.11.0",
        '-c "set -a && . /run/gpufleet/service.env && set +a && exec vllm serve \\"$$@\\"" vllm',
        "vllm meta-llama/Meta-Llama-3-8B-Instruct --revision main",
        "--quantization fp8",
        "--max-num-seqs 32",
        "--served-model-name llama3-8b",
    ):
        assert part in " ".join(run.split()), part
    timeout = int(unit.split("TimeoutStartSec=")[1].split()[0])
    assert timeout >= 900
    assert "HF_TOKEN" not in unit and "API_KEY" not in unit


def test_systemd_quote():
    assert systemd_quote("--max-num-seqs") == "--max-num-seqs"
    assert systemd_quote('{"a": 1}') == '"{\\"a\\": 1}"'
    assert systemd_quote("50%") == "50%%"
    assert systemd_quote("$HOME") == '"$$HOME"'


def test_systemd_quote_makes_one_literal_word():
    """Finding 1: a newline, a space or a lone ';' must never leave its word."""
    assert systemd_quote("a\nb") == '"a\\nb"'
    assert systemd_quote("a\rb\tc") == '"a\\rb\\tc"'
    assert systemd_quote("a\\b") == '"a\\\\b"'
    assert systemd_quote(";") == '";"'
    assert systemd_quote("a b") == '"a b"'
    assert systemd_quote("x\u2028y") == '"x\\u2028y"'
    assert systemd_quote("\x1b[0m") == '"\\x1b[0m"'
    assert systemd_quote("plain\n") != "plain\n"  # `$` matched before a trailing newline
    with pytest.raises(ValueError, match="NUL"):
        systemd_quote("a\0b")


def test_text_and_comment_filters_keep_one_line():
    assert systemd_text("50% off") == "50%% off"
    for bad in ("a\nb", "a\rb", "a\u2028b", "a\0b"):
        with pytest.raises(ValueError, match="refusing to render"):
            systemd_text(bad)
        with pytest.raises(ValueError, match="refusing to render"):
            systemd_comment(bad)
    with pytest.raises(ValueError, match="trailing backslash"):
        systemd_text("a\\")


def test_a_value_that_got_past_validation_is_still_one_argument():
    """Rendered defensively: a spec built without validation (dataclasses.replace) with the
    finding's values still gives one literal argument per value, and no new line."""
    evil = dataclasses.replace(
        SPEC, models_dir="/opt/m\nExecStartPre=/usr/bin/touch /tmp/pwned\n#",
        compile_cache_dir="/opt/models --privileged -v /:/host -v /opt/x",
        extra_args=("--chat-template", "x ; y %n $HOME"),
    )
    unit = render_unit(evil)
    assert not [line for line in unit.splitlines() if line.startswith("ExecStartPre=/usr")]
    assert len(unit.splitlines()) == len(render_unit(SPEC).splitlines())
    argv = systemd_split(settings(unit, "ExecStart")[0])
    assert f"{evil.models_dir}:/root/.cache/huggingface" in argv
    assert f"{evil.compile_cache_dir}:/root/.cache/vllm" in argv
    assert "--privileged" not in argv
    assert argv[-2:] == ["--chat-template", "x ; y %n $HOME"]
    with pytest.raises(ValueError, match="refusing to render"):
        render_unit(dataclasses.replace(SPEC, model="a/b\nExecStartPre=/x"))


def test_vllm_stays_on_the_loopback_whatever_the_fronts_address():
    spec = build_spec({"service": "llama3", "model": "a/b", "image": "vllm/vllm-openai:v0.11.0",
                       "bind_address": "::1", "vllm_port": 9001})
    argv = systemd_split(settings(render_unit(spec), "ExecStart")[0])
    assert argv[argv.index("-p") + 1] == "127.0.0.1:9001:8000"
