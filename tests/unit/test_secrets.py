"""Secrets never show themselves; the API key is generated once per service and kept."""

import os
import stat

import pytest

from gpufleet.deploy.service import load_secrets
from gpufleet.model import secrets
from gpufleet.model.spec import build_spec

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


def test_server_env_has_only_the_api_key_and_the_token_has_its_own_file():
    s = secrets.ServiceSecrets(secrets.Secret("hf_x"), secrets.Secret("k"))
    assert s.server_env().reveal() == "VLLM_API_KEY='k'\n"
    assert "HF_TOKEN" not in s.server_env().reveal() and "hf_x" not in s.server_env().reveal()
    assert s.hub_token_file().reveal() == "HF_TOKEN='hf_x'\n"
    assert "VLLM_API_KEY" not in s.hub_token_file().reveal()
    s = secrets.ServiceSecrets(None, secrets.Secret("k"))
    assert s.server_env().reveal() == "VLLM_API_KEY='k'\n"
    assert s.hub_token_file() is None  # no token: no token file (a stale one is removed)


def test_a_token_rotation_keeps_the_server_env_an_api_key_rotation_changes_it():
    old = secrets.ServiceSecrets(secrets.Secret("hf_old"), secrets.Secret("k"))
    new = secrets.ServiceSecrets(secrets.Secret("hf_new"), secrets.Secret("k"))
    assert old.server_env() == new.server_env()  # no vLLM restart, same release id
    assert old.hub_token_file() != new.hub_token_file()
    rotated = secrets.ServiceSecrets(secrets.Secret("hf_old"), secrets.Secret("k2"))
    assert rotated.server_env() != old.server_env()


def test_the_token_file_is_next_to_the_env_file():
    assert SPEC.env_file == "/etc/gpufleet/llama3.env"
    assert SPEC.hf_token_file == "/etc/gpufleet/llama3.hf-token"


def test_hf_token_is_optional_the_hub_check_decides(tmp_path):
    # a public model needs no token; a gated one fails in the Hub pre-flight (gpufleet.clients.hub)
    got = load_secrets(SPEC, {"GPUFLEET_STATE_DIR": str(tmp_path)})
    assert got.hf_token is None
    got = load_secrets(SPEC, {"GPUFLEET_STATE_DIR": str(tmp_path), "HF_TOKEN": "hf_x"})
    assert got.hf_token.reveal() == "hf_x"


def test_token_with_whitespace_is_refused():
    with pytest.raises(secrets.SecretError, match="whitespace"):
        secrets.hf_token({"HF_TOKEN": "hf_a b"})
