"""The service spec: loading, overrides and one clear error per bad value."""

from pathlib import Path

import pytest

from gpufleet.model.spec import SpecError, build_spec, load_spec
from gpufleet.model.vllm_version import PINNED_IMAGE, image_version

ROOT = Path(__file__).resolve().parents[2]
BASE = {"service": "llama3", "model": "meta-llama/Meta-Llama-3-8B-Instruct",
        "image": "vllm/vllm-openai:v0.11.0"}


def test_shipped_llama3_spec_is_valid():
    spec = load_spec(ROOT / "deploys" / "llama3.yaml")
    assert spec.service == "llama3"
    assert image_version(spec.image) is not None     # a release tag (which one moves)
    # the shipped spec runs the release the lab tests end to end (vllm_version.PINNED_IMAGE)
    assert spec.image == PINNED_IMAGE
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
    assert "--gpu-memory-utilization" not in args        # unset: the image's vLLM's default
    assert args[-1] == "--enforce-eager"
    given = build_spec({**BASE, "gpu_memory_utilization": 0.9}).vllm_args()
    assert given[given.index("--gpu-memory-utilization") + 1] == "0.9"


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


# -- every input is data, never code ------------------------------------------------------------

@pytest.mark.parametrize("field", ["service", "model", "revision", "image", "served_model_name",
                                   "models_dir", "compile_cache_dir", "bind_address",
                                   "toolkit_version", "docker_package"])
def test_a_trailing_newline_never_passes_a_pattern(field):
    """``$`` matches before a trailing newline: every pattern is a fullmatch now."""
    good = build_spec(BASE).as_dict()[field] or "llama3-8b"
    with pytest.raises(SpecError, match=field):
        build_spec({**BASE, field: f"{good}\n"})


@pytest.mark.parametrize("value,stored", [
    ("/opt/models/", "/opt/models"),
    ("/srv/a/../b", "/srv/b"),
    ("//data///hf/./cache", "/data/hf/cache"),
    ("/mnt/volume_fra1_01/models", "/mnt/volume_fra1_01/models"),
    ("/var/lib/gpufleet-models", "/var/lib/gpufleet-models"),
    ("/root/models", "/root/models"),
])
def test_dirs_are_stored_normalized(value, stored):
    spec = build_spec({**BASE, "models_dir": value, "compile_cache_dir": value + "/cache"})
    assert spec.models_dir == stored
    assert spec.compile_cache_dir == stored + "/cache"


@pytest.mark.parametrize("value", [
    "/", "/opt/../root", "/opt/models/../../etc", "/root", "/opt", "/var", "/var/lib", "/tmp",
    "/home", "/srv", "/usr/local/models", "/etc/gpufleet", "/proc/self", "/sys/x", "/dev/shm",
    "/boot/x", "/lib/x", "/bin/x", "//", "/./", "/opt/x/../..",
])
def test_system_dirs_are_refused_after_normalization(value):
    """Finding 2: /opt/../root passed and the deploy chmodded /root to 0755."""
    for key in ("models_dir", "compile_cache_dir"):
        with pytest.raises(SpecError, match=f"{key} must be an absolute directory of its own"):
            build_spec({**BASE, key: value})


@pytest.mark.parametrize("args", [
    ["foo", "bar"], ["--enforce-eager", "foo"], ["--max-num-batched-tokens"],
    ["--max-num-batched-tokens", "--enforce-eager"], ["--max-num-batched-tokens="],
    ["--enforce-eager=true"], ["--chat-template", ""], ["--", "--enforce-eager"],
    ["--no-headless"], ["--max_model_len", "4096"], ["--seed", "-x"],
])
def test_extra_args_are_checked_as_vllm_parses_them(args):
    """Finding 6: positional words passed the flag check, and vLLM refused to start."""
    with pytest.raises(SpecError, match="extra_args"):
        build_spec({**BASE, "extra_args": args})


@pytest.mark.parametrize("args", [
    ["--max-num-batched-tokens", "4096"], ["--max-num-batched-tokens=4096"],
    ["--enforce-eager"], ["--chat-template", "/x.jinja"], ["--no-enable-chunked-prefill"],
    ["--no-enforce-eager"], ["--cudagraph-capture-sizes", "1", "2", "4", "--enforce-eager"],
    ["--seed", "-1"], ["--max_num_batched_tokens", "8k"], ["--max-num-batched-tokens", 4096],
    ["-O", "3"], ["-O3"], ["-O=1"], ["--override-generation-config", '{"temperature": 0.5}'],
])
def test_extra_args_vllm_would_take_pass(args):
    spec = build_spec({**BASE, "extra_args": args})
    assert spec.vllm_args()[-len(args):] == [str(a) for a in args]


def test_extra_args_kinds_match_the_lab_parser():
    """Each flag's kind (switch or value) agrees with the lab's stand-in parser (same flag file), and a switch
    followed by a word fails there as it does here."""
    from gpufleet.model import vllm_flags
    from gpufleet_lab import vllm_standin

    for flag, kind in vllm_flags.FLAG_KINDS.items():
        if kind in (vllm_flags.SWITCH, vllm_flags.STORE_TRUE):
            argv = [flag]
        else:
            argv = [f"{flag}={'1' if 'size' in flag else 'x'}"]
        assert vllm_flags.check_extra_args(argv) is None
        if flag in ("--config", "--compilation-config", "-O") or kind in (vllm_flags.VALUE,
                                                                          vllm_flags.VALUES):
            continue  # values need the flag's own type; the switches are the point here
        vllm_standin.parse_cli(["serve", "m", *argv])
        with pytest.raises(SystemExit):
            vllm_standin.parse_cli(["serve", "m", flag, "word"])


@pytest.mark.parametrize("env,needle", [
    ({"VLLM_PORT": 8000}, "value of 'VLLM_PORT' must be a string, got 8000"),
    ({"A": True}, "value of 'A' must be a string"),
    ({"A": None}, "value of 'A' must be a string"),
    ({"A": ["x"]}, "value of 'A' must be a string"),
    ({1: "x"}, "variable name 1"),
    ({"A": "x\ny"}, "contains the character '\\n'"),
    ({"A": "x\0"}, "contains the character '\\x00'"),
    ({"HF_HUB_OFFLINE": "0"}, "must not set HF_HUB_OFFLINE: gpufleet sets it"),
    ({"HF_HOME": "/x"}, "must not set HF_HOME"),
    ({"HF_HUB_CACHE": "/x"}, "must not set HF_HUB_CACHE"),
    ({"TRANSFORMERS_OFFLINE": "0"}, "must not set TRANSFORMERS_OFFLINE"),
    ({"HF_ENDPOINT": "http://evil"}, "must not set HF_ENDPOINT"),
    ({"VLLM_API_KEY": "x"}, "must not set VLLM_API_KEY: secrets"),
    ({"MY_SECRET": "x"}, "must not set MY_SECRET: secrets"),
    ({"db_password": "x"}, "must not set db_password: secrets"),
    ({"OPENAI_API_KEY": "x"}, "must not set OPENAI_API_KEY: secrets"),
])
def test_container_env_is_strings_and_not_gpufleets_own(env, needle):
    """Finding 7: non-strings were str()ed and HF_HUB_OFFLINE=0 could be set."""
    with pytest.raises(SpecError) as e:
        build_spec({**BASE, "container_env": env}, source="llama3.yaml")
    assert needle in str(e.value)
    assert str(e.value).startswith("llama3.yaml: container_env ")


def test_container_env_that_is_fine():
    spec = build_spec({**BASE, "container_env": {"VLLM_HOST_IP": "10.0.0.2", "VLLM_PORT": "8001",
                                                 "VLLM_LOGGING_LEVEL": "DEBUG", "X": "a b;$c"}})
    assert dict(spec.container_env)["X"] == "a b;$c"
    with pytest.raises(SpecError, match="duplicate variable 'A'"):
        build_spec(BASE, overrides={"container_env": '{"A": "1", "A": "2"}'})


def _spec_file(tmp_path, text, name="spec.yaml"):
    path = tmp_path / name
    path.write_text("service: llama3\nmodel: meta-llama/Meta-Llama-3-8B-Instruct\n"
                    "image: vllm/vllm-openai:v0.11.0\n" + text)
    return path


@pytest.mark.parametrize("text,needle", [
    ("service: other\n", "duplicate key 'service' (first on line 1): each key once (line 4"),
    ("container_env:\n  A: '1'\n  A: '2'\n", "duplicate key 'A' (first on line 5)"),
    ("extra_args: &x [--enforce-eager]\n", "anchors and aliases"),
    ("container_env:\n  <<: {A: '1'}\n", "merge keys"),
    ("extra_args: " + "[" * 50 + "]" * 50 + "\n", "nested deeper than"),
    ("extra_args: [" + "1," * 6000 + "1]\n", "more than 5000 values"),
])
def test_the_loader_is_bounded(tmp_path, text, needle):
    """Finding 7: duplicate keys won silently; aliases, depth and size were unbounded."""
    with pytest.raises(SpecError) as e:
        load_spec(_spec_file(tmp_path, text))
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_an_alias_bomb_and_a_huge_file_are_refused_at_once(tmp_path):
    import time

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [" + ",".join(["lol"] * 9) + "]\n" + "".join(
        f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)))
    huge = tmp_path / "huge.yaml"
    with huge.open("wb") as f:
        f.truncate(300 * 1024 * 1024)  # sparse: costs no disk
    started = time.monotonic()
    with pytest.raises(SpecError, match="anchors and aliases"):
        load_spec(bomb)
    with pytest.raises(SpecError, match="is larger than 1024 KiB"):
        load_spec(huge)
    with pytest.raises(SpecError, match="is not UTF-8"):
        load_spec(_spec_file(tmp_path, "").write_bytes(b"service: \xff\n") and
                  tmp_path / "spec.yaml")
    assert time.monotonic() - started < 2


def test_unknown_data_keys_are_refused_unless_pyinfras_own():
    """Finding 7: --data keys unlike any spec key were accepted silently."""
    from gpufleet.deploy.service import _check_override_keys
    from gpufleet.model.spec import check_data_keys

    fine = ["quantization", "ssh_user", "ssh_port", "_sudo", "docker_identifier",
            "docker_package", "docker_cgroup_driver", "fake_delay", "gpufleet_release",
            "droplet_id", "region", "winrm_port", "podman_x", "local_x", "chroot_directory"]
    check_data_keys(fine)
    _check_override_keys(fine)
    for key, needle in (("modelz", "did you mean 'model'?"), ("flavour", "unknown key"),
                        ("docker_pakage", "did you mean 'docker_package'?"),
                        ("x", "spec keys: service, model")):
        for check in (check_data_keys, _check_override_keys):
            with pytest.raises(SpecError) as e:
                check([key])
            assert f"--data '{key}': unknown key" in str(e.value) and needle in str(e.value)


def test_gpufleet_check_refuses_what_the_deploy_refuses(capsys):
    from gpufleet.cli import main as cli

    spec = str(ROOT / "deploys" / "llama3.yaml")
    for data, needle in (
        ("modelz=x", "--data 'modelz': unknown key; did you mean 'model'?"),
        ("models_dir=/opt/../root", "models_dir must be an absolute directory of its own"),
        ("extra_args=foo bar", "extra_args has the word 'foo'"),
        ('container_env={"VLLM_PORT": 8000}', "must be a string, got 8000"),
        ('extra_args=["--enforce-eager", "x"]', "--enforce-eager takes no value"),
    ):
        assert cli.main(["check", spec, "--data", data]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    assert cli.main(["check", spec, "--data", "ssh_user=root", "--data",
                     'extra_args=["--chat-template", "/x y.jinja"]']) == 0
    assert "--chat-template '/x y.jinja'" in capsys.readouterr().out
