"""The front (nginx on the service's port): what it lets through, where the key lives, and the
spec keys that shape it. The lab runs the real nginx against the real vLLM
(tests/e2e/test_real_engine.py); these cover the rendering and the refusals."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gpufleet.deploy import front as deploy_front
from gpufleet.model import front, names
from gpufleet.model.release import endpoint_of, release_for
from gpufleet.model.secrets import Secret, SecretError, api_key
from gpufleet.model.spec import SpecError, build_spec

BASE = {"service": "llama3", "model": "meta-llama/Meta-Llama-3-8B-Instruct",
        "image": "vllm/vllm-openai:v0.32.0"}
KEY = "gf-GPUFLEETLABSECRETapikey0123456789abcdef"
PEM_CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"


def locations(conf: str) -> list[str]:
    return re.findall(r"^\s*location (.+?) \{", conf, re.M)


def test_vllm_is_published_on_the_loopback_only_and_the_front_takes_the_port():
    spec = build_spec(BASE)
    assert spec.publish == "127.0.0.1:8001:8000"
    conf = deploy_front.site_conf(spec)
    assert "listen 0.0.0.0:8000;" in conf
    assert "server 127.0.0.1:8001;" in conf
    assert front.local_url(spec) == "http://127.0.0.1:8000"


def test_the_front_is_an_allow_list():
    conf = deploy_front.site_conf(build_spec(BASE))
    # /v1/ (key checked first), /health, /metrics, and a catch-all that refuses
    assert locations(conf) == ["/v1/", "= /v1", "= /health", "= /metrics", "/"]
    v1 = conf.split("location /v1/ {")[1].split("\n    }\n")[0]
    assert v1.index(f"include {names.front_keys_file('llama3')};") < v1.index("proxy_pass")
    catch_all = conf.split("location / {")[1].split("}")[0]
    assert "return 404" in catch_all and "proxy_pass" not in catch_all
    health = conf.split("location = /health {")[1].split("\n    }\n")[0]
    assert "limit_except GET" in health
    assert conf.count("proxy_pass") == 3


def test_metrics_on_the_port_only_from_the_host_and_the_spec_networks_on_a_port_of_their_own():
    """The load balancer reaches ``port`` from its VPC address: an allow-list of VPC networks on
    that port would let every client of the load balancer read /metrics."""
    spec = build_spec({**BASE, "metrics_from": ["10.110.0.5/20", "192.0.2.7"]})
    main, metrics = deploy_front.site_conf(spec).split("\nserver {")[1:]
    block = main.split("location = /metrics {")[1].split("}")[0]
    assert re.findall(r"allow (\S+);", block) == ["127.0.0.1", "::1"]
    assert "listen 0.0.0.0:8000;" in main and "listen 0.0.0.0:8002;" in metrics
    assert locations("server {" + metrics) == ["= /metrics", "/"]
    block = metrics.split("location = /metrics {")[1].split("}")[0]
    allowed = re.findall(r"allow (\S+);", block)
    assert allowed == ["127.0.0.1", "::1", "10.110.0.0/20", "192.0.2.7/32"]
    assert block.strip().splitlines()[-2].strip() == "deny all;"
    # without metrics_from there is no such listener
    assert "8002" not in deploy_front.site_conf(build_spec(BASE))


def test_the_key_is_only_in_the_root_only_map_file():
    spec = build_spec(BASE)
    assert KEY not in deploy_front.site_conf(spec)
    keys = front.keys_conf("llama3", Secret(KEY))
    assert KEY not in repr(keys) and KEY not in str(keys)
    assert f'if ($http_authorization != "Bearer {KEY}") {{' in keys.reveal()
    assert "return 401 '{\"error\": \"Unauthorized\"}';" in keys.reveal()
    assert names.front_keys_file("llama3") in names.secret_files("llama3")
    assert names.front_keys_file("llama3").startswith(names.SECRETS_DIR + "/")


def test_a_service_with_dashes_gets_nginx_names_without_them():
    conf = deploy_front.site_conf(build_spec({**BASE, "service": "llama-3b"}))
    assert "upstream gpufleet_llama_3b_vllm {" in conf
    assert "proxy_pass http://gpufleet_llama_3b_vllm;" in conf


@pytest.mark.parametrize("address,listen,url", [
    ("127.0.0.1", "127.0.0.1:8000", "http://127.0.0.1:8000"),
    ("10.110.0.4", "10.110.0.4:8000", "http://10.110.0.4:8000"),
    ("::", "[::]:8000 ipv6only=off", "http://[::1]:8000"),
    ("fd00::4", "[fd00::4]:8000", "http://[fd00::4]:8000"),
])
def test_the_bind_address_is_where_the_front_listens(address, listen, url):
    spec = build_spec({**BASE, "bind_address": address})
    assert f"listen {listen};" in deploy_front.site_conf(spec)
    assert front.local_url(spec) == url
    assert spec.publish.startswith("127.0.0.1:")


def test_tls_serves_https_with_the_uploaded_files(tmp_path: Path):
    (tmp_path / "c.pem").write_text(PEM_CERT)
    (tmp_path / "k.pem").write_text(PEM_KEY)
    spec = build_spec({**BASE, "tls_certificate": str(tmp_path / "c.pem"),
                       "tls_key": str(tmp_path / "k.pem")})
    conf = deploy_front.site_conf(spec)
    assert "listen 0.0.0.0:8000 ssl;" in conf
    assert f"ssl_certificate {names.tls_certificate_file('llama3')};" in conf
    assert f"ssl_certificate_key {names.tls_key_file('llama3')};" in conf
    assert str(tmp_path) not in conf  # the host's copies, not the controller's paths
    assert front.local_url(spec) == "https://127.0.0.1:8000"
    assert names.tls_key_file("llama3") in names.secret_files("llama3")


@pytest.mark.parametrize("data,message", [
    ({"vllm_port": 8000}, "vllm_port must differ from port (8000)"),
    ({"vllm_port": 22}, "vllm_port must be between 1 and 65535 and not 22"),
    ({"tls_certificate": "/nonexistent/c.pem"}, "tls_key must be set together with "
                                                "tls_certificate"),
    ({"tls_key": "/nonexistent/k.pem"}, "tls_certificate must be set together with tls_key"),
    ({"tls_certificate": "/nonexistent/c.pem", "tls_key": "/nonexistent/k.pem"},
     "tls_certificate cannot be read on this machine (/nonexistent/c.pem"),
    ({"metrics_from": ["10.0.0.0/33"]}, "metrics_from must list IP networks"),
    ({"metrics_from": ["everyone"]}, "metrics_from must list IP networks"),
    ({"metrics_port": 8000, "metrics_from": ["10.0.0.0/8"]},
     "metrics_port must be between 1 and 65535 and not 22, port"),
])
def test_bad_front_settings_are_one_clear_error(data, message):
    with pytest.raises(SpecError) as e:
        build_spec({**BASE, **data}, source="llama3.yaml")
    assert str(e.value).startswith("llama3.yaml: ") and message in str(e.value)


def test_a_file_that_is_not_pem_is_refused(tmp_path: Path):
    (tmp_path / "c.pem").write_text("hello")
    (tmp_path / "k.pem").write_text(PEM_KEY)
    with pytest.raises(SpecError, match="tls_certificate is not a PEM file"):
        build_spec({**BASE, "tls_certificate": str(tmp_path / "c.pem"),
                    "tls_key": str(tmp_path / "k.pem")})


@pytest.mark.parametrize("key", ['a"b', "a$b", "a;b", "a{b}", "a\\b", "=abc"])
def test_an_api_key_the_front_cannot_compare_is_refused(key: str, tmp_path: Path):
    with pytest.raises(SecretError, match="VLLM_API_KEY must be a bearer token") as e:
        api_key("llama3", {"VLLM_API_KEY": key, "GPUFLEET_STATE_DIR": str(tmp_path)})
    assert key not in str(e.value)


def test_generated_and_lab_keys_are_bearer_tokens(tmp_path: Path):
    env = {"GPUFLEET_STATE_DIR": str(tmp_path)}
    assert re.fullmatch(r"[A-Za-z0-9._~+/-]+=*", api_key("llama3", env).reveal())
    assert api_key("llama3", {**env, "VLLM_API_KEY": KEY}).reveal() == KEY


def test_a_release_records_where_its_front_answers():
    spec = build_spec({**BASE, "bind_address": "10.110.0.4", "port": 9000})
    record = release_for(spec, unit="u", env_sha256="e").record()
    assert endpoint_of(record) == "http://10.110.0.4:9000"
    # a record from before the front: vLLM's port on the loopback
    assert endpoint_of({"port": 8000}) == "http://127.0.0.1:8000"
