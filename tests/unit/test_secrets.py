"""Secrets never show themselves; the API key is generated once per service and kept."""

import os
import stat

import pytest

from gpufleet import secrets
from gpufleet.deploys import load_secrets
from gpufleet.spec import build_spec

SPEC = build_spec({"service": "llama3", "model": "meta-llama/Meta-Llama-3-8B-Instruct",
                   "image": "vllm/vllm-openai:v0.11.0"})


def test_secret_is_masked_everywhere():
    s = secrets.Secret("hf_abcdefghijklmnopqrstuvwxyz")
    for shown in (str(s), repr(s), f"{s}", f"{s!r}", str([s]), str({"k": s})):
        assert "hf_abc" not in shown
    assert s.reveal() == "hf_abcdefghijklmnopqrstuvwxyz"


def test_api_key_generated_once_0600_and_kept(tmp_path):
    env = {"GPUFLEET_STATE_DIR": str(tmp_path)}
    first = secrets.api_key("llama3", env)
    second = secrets.api_key("llama3", env)
    assert first == second and first.reveal().startswith("gf-") and len(first.reveal()) > 40
    path = secrets.api_key_path("llama3", env)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert secrets.api_key("other", env) != first


def test_user_given_api_key_wins(tmp_path):
    env = {"GPUFLEET_STATE_DIR": str(tmp_path), "VLLM_API_KEY": "my-key"}
    assert secrets.api_key("llama3", env).reveal() == "my-key"
    assert not secrets.api_key_path("llama3", env).exists()


def test_env_file_content():
    s = secrets.ServiceSecrets(secrets.Secret("hf_x"), secrets.Secret("k"))
    assert s.env_file_content().reveal() == "HF_TOKEN='hf_x'\nVLLM_API_KEY='k'\n"
    s = secrets.ServiceSecrets(None, secrets.Secret("k"))
    assert s.env_file_content().reveal() == "VLLM_API_KEY='k'\n"


def test_hf_token_is_optional_the_hub_check_decides(tmp_path):
    # a public model needs no token; a gated one fails in the Hub pre-flight (gpufleet.hub)
    got = load_secrets(SPEC, {"GPUFLEET_STATE_DIR": str(tmp_path)})
    assert got.hf_token is None
    got = load_secrets(SPEC, {"GPUFLEET_STATE_DIR": str(tmp_path), "HF_TOKEN": "hf_x"})
    assert got.hf_token.reveal() == "hf_x"


def test_token_with_whitespace_is_refused():
    with pytest.raises(secrets.SecretError, match="whitespace"):
        secrets.hf_token({"HF_TOKEN": "hf_a b"})
