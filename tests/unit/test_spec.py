"""The service spec: loading, overrides and one clear error per bad value."""

from pathlib import Path

import pytest

from gpufleet.spec import SpecError, build_spec, load_spec

ROOT = Path(__file__).resolve().parents[2]
BASE = {"service": "llama3", "model": "meta-llama/Meta-Llama-3-8B-Instruct",
        "image": "vllm/vllm-openai:v0.11.0"}


def test_shipped_llama3_spec_is_valid():
    spec = load_spec(ROOT / "deploys" / "llama3.yaml")
    assert spec.service == "llama3"
    assert spec.image == "vllm/vllm-openai:v0.11.0"
    assert spec.unit_name == "gpufleet-llama3.service"
    assert spec.env_file == "/etc/gpufleet/llama3.env"


@pytest.mark.parametrize("quant,flags", [
    ("auto", []),
    ("fp16", ["--dtype", "float16"]),
    ("bf16", ["--dtype", "bfloat16"]),
    ("fp8", ["--quantization", "fp8"]),
    ("awq", ["--quantization", "awq"]),
    ("gptq", ["--quantization", "gptq"]),
])
def test_quantization_maps_to_dtype_or_quantization(quant, flags):
    args = build_spec({**BASE, "quantization": quant}).vllm_args()
    for flag in ("--dtype", "--quantization"):
        if flag in flags:
            assert args[args.index(flag) + 1] == flags[flags.index(flag) + 1]
        else:
            assert flag not in args


def test_overrides_win_over_file_and_data_strings_are_coerced():
    spec = build_spec({**BASE, "quantization": "fp8", "port": 8000},
                      overrides={"quantization": "fp16", "port": "9000",
                                 "enable_prefix_caching": "false"})
    assert spec.quantization == "fp16" and spec.port == 9000
    assert "--no-enable-prefix-caching" in spec.vllm_args()


def test_environment_may_point_the_toolkit_repo_elsewhere():
    spec = build_spec(BASE, environ={"GPUFLEET_TOOLKIT_REPO_URL": "http://10.0.0.1:8701/r",
                                     "GPUFLEET_TOOLKIT_KEY_URL": "http://10.0.0.1:8701/k"})
    assert spec.toolkit_repo_url == "http://10.0.0.1:8701/r"
    assert spec.toolkit_key_url == "http://10.0.0.1:8701/k"


def test_args_include_every_setting():
    spec = build_spec({**BASE, "served_model_name": "llama3-8b", "max_model_len": 8192,
                       "max_num_seqs": 32, "gpu_count": 2, "kv_cache_dtype": "fp8",
                       "extra_args": ["--enforce-eager"]})
    args = spec.vllm_args(2)
    assert args[:3] == [BASE["model"], "--revision", "main"]
    pairs = dict(zip(args, args[1:], strict=False))
    assert pairs["--served-model-name"] == "llama3-8b"
    assert pairs["--max-model-len"] == "8192"
    assert pairs["--max-num-seqs"] == "32"
    assert pairs["--tensor-parallel-size"] == "2"
    assert pairs["--kv-cache-dtype"] == "fp8"
    assert pairs["--gpu-memory-utilization"] == "0.9"
    assert args[-1] == "--enforce-eager"


@pytest.mark.parametrize("change,needle", [
    ({"max_num_sequence": 16}, "unknown key 'max_num_sequence'; did you mean 'max_num_seqs'?"),
    ({"gpu_memory_utilization": 1.0}, "gpu_memory_utilization must be strictly between 0 and 1"),
    ({"gpu_memory_utilization": 0}, "gpu_memory_utilization must be strictly between 0 and 1"),
    ({"gpu_memory_utilization": "lots"}, "gpu_memory_utilization must be a number"),
    ({"port": 70000}, "port must be between 1 and 65535, got 70000"),
    ({"port": 22}, "port must not be 22"),
    ({"image": "vllm/vllm-openai"}, "has no tag"),
    ({"image": "vllm/vllm-openai:latest"}, "uses 'latest'"),
    ({"quantization": "fp4"}, "quantization must be one of auto, fp16, bf16, fp8, awq, gptq"),
    ({"quantization": "fp-8"}, "did you mean 'fp8'?"),
    ({"extra_args": ["--max-num-sequence", "16"]},
     "extra_args has an unknown vLLM flag --max-num-sequence; did you mean --max-num-seqs?"),
    ({"extra_args": ["--api-key", "x"]}, "secrets never go on the command line"),
    ({"extra_args": ["--max-model-len", "4096"]}, "set the spec key 'max_model_len' instead"),
    ({"service": "Llama 3"}, "service must be lower-case"),
    ({"model": "llama3"}, "model must be a Hugging Face model id"),
    ({"max_model_len": 0}, "max_model_len must be at least 1"),
    ({"tensor_parallel_size": 2}, "tensor_parallel_size (2) cannot exceed gpu_count (1)"),
    ({"toolkit_version": "latest"}, "toolkit_version must be a Debian package version"),
    ({"enable_prefix_caching": "maybe"}, "enable_prefix_caching must be true or false"),
    ({"cold_start_timeout": 5}, "cold_start_timeout must be at least 10 seconds"),
    ({"models_dir": "relative"}, "models_dir must be an absolute directory"),
    ({"docker_cgroup_driver": "cgroupv3"}, "docker_cgroup_driver must be one of"),
])
def test_bad_values_get_one_clear_error_naming_the_key(change, needle):
    with pytest.raises(SpecError) as e:
        build_spec({**BASE, **change}, source="llama3.yaml")
    assert needle in str(e.value)
    assert str(e.value).startswith("llama3.yaml: ")


def test_container_env_from_yaml_or_data():
    spec = build_spec({**BASE, "container_env": {"VLLM_LOGGING_LEVEL": "DEBUG"}})
    assert spec.container_env == (("VLLM_LOGGING_LEVEL", "DEBUG"),)
    spec = build_spec(BASE, overrides={"container_env": '{"A": "1"}'})
    assert spec.container_env == (("A", "1"),)
    with pytest.raises(SpecError, match="must not set HF_TOKEN"):
        build_spec({**BASE, "container_env": {"HF_TOKEN": "x"}})
    with pytest.raises(SpecError, match="invalid variable name"):
        build_spec({**BASE, "container_env": {"1A": "x"}})


def test_missing_required_key():
    with pytest.raises(SpecError, match="missing required key 'image'"):
        build_spec({"service": "x", "model": "a/b"})


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(SpecError, match="cannot read the service spec"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("service: [unclosed\n")
    with pytest.raises(SpecError, match="is not valid YAML"):
        load_spec(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(listy)
