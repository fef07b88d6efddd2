"""The rendered systemd unit: the docker run line users used to paste by hand, pinned."""

from gpufleet.deploys import render_unit
from gpufleet.render import systemd_quote, template_path
from gpufleet.spec import build_spec

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
        "-p 0.0.0.0:8000:8000",
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
