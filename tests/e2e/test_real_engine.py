"""End to end with the REAL vLLM: what only the real server can show.

The lab of conftest.py, whose good hosts pull ``vllm/vllm-openai:<pinned>`` as upstream vLLM's
server on CPU (``gpufleet_lab.realimage``). Every test starts from the first deploy's state of
the H100 and the RTX 4000 Ada host (``pair``): the user's own command, with the real engine
answering. Each restart of the real server costs about a minute here, so tests share them.
"""

from __future__ import annotations

import http.client
import json
import re
import shlex
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from gpufleet.model.vllm_version import PINNED_VERSION
from gpufleet_lab import tinymodel
from tests.e2e.conftest import API, GOOD
from tests.e2e.lab import Converged, Lab
from tests.e2e.test_preflight import host_bytes
from tests.e2e.test_rollout import gpufleet, host_releases, rollout

H100 = GOOD[0]
PAIR = GOOD[:2]  # H100 and RTX 4000 Ada; the third good host (rebuilt by test_recovery) is not needed
UNIT = "gpufleet-llama3"


def get(ip: str, path: str, key: str | None = None, body: dict | None = None,
        timeout: float = 30) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"http://{ip}:8000{path}", headers=headers,
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def chat_body(prompt: str = "hi") -> dict:
    return {"model": "llama3-8b", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": prompt}]}


def wait_answering(lab: Lab, name: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    ip = lab.host(name).public_ip
    while True:
        try:
            if get(ip, "/v1/chat/completions", API, chat_body(), timeout=10)[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}: no completion after {timeout}s")
        time.sleep(2)


@pytest.fixture
def pair(first_deploy: Converged) -> Converged:
    first_deploy.restore(PAIR)
    return first_deploy


def restarts(lab: Lab, name: str) -> int:
    return int(lab.ssh(name, f"systemctl show {UNIT} -p NRestarts --value").stdout)


def test_the_users_command_ends_in_the_real_vllm_answering(lab, pair):
    for name in PAIR:
        ip = lab.host(name).public_ip
        # /version is not for clients (the front refuses it): asked on the host, behind the front
        version = lab.ssh(name, "curl -sf http://127.0.0.1:8001/version").stdout
        assert json.loads(version) == {"version": str(PINNED_VERSION)}
        status, body = get(ip, "/v1/chat/completions", API, chat_body())
        answer = json.loads(body)
        assert status == 200 and answer["system_fingerprint"].startswith(
            f"vllm-{PINNED_VERSION}"), answer
        assert answer["choices"][0]["message"]["content"], answer
        # the engine core runs inside the lab host, in the container systemd started
        assert "VLLM::EngineCore" in lab.ssh(name, "ps -eo args").stdout


def test_after_its_engine_dies_the_real_server_comes_back_offline_from_the_staged_weights(
        lab, pair):
    """Kill the real engine core: the API server exits (vLLM may exit 0 then: issue 48966) and
    ``Restart=always`` starts the container again. That start loads the weights staged in
    /opt/models at the pinned commit with the Hub offline: not one byte comes from the Hub."""
    name = H100
    before, bytes_before = restarts(lab, name), host_bytes(lab, name)
    started = lab.ssh(name, f"docker inspect -f '{{{{.State.StartedAt}}}}' {UNIT}").stdout
    # '^': the engine's own title, not this shell's command line, which names it too
    lab.ssh(name, "kill -9 $(pgrep -f '^VLLM::EngineCore')")
    deadline = time.monotonic() + 120
    while restarts(lab, name) == before:
        assert time.monotonic() < deadline, "systemd never restarted the service"
        time.sleep(1)
    wait_answering(lab, name)
    assert lab.ssh(name, f"docker inspect -f '{{{{.State.StartedAt}}}}' {UNIT}").stdout != started
    assert host_bytes(lab, name) == bytes_before
    env = lab.ssh(name, "docker inspect -f '{{json .Config.Env}}' " + UNIT).stdout
    assert "HF_HUB_OFFLINE=1" in json.loads(env)
    logs = lab.ssh(name, f"docker logs {UNIT} 2>&1").stdout
    init = next(ln for ln in logs.splitlines() if "Initializing a V1 LLM engine" in ln)
    # offline, vLLM swaps the model id for the staged snapshot of the pinned commit
    snapshot = (f"/root/.cache/huggingface/hub/models--meta-llama--Meta-Llama-3-8B-Instruct/"
                f"snapshots/{tinymodel.COMMIT_MAIN}")
    assert f"(v{PINNED_VERSION})" in init and f"model='{snapshot}'" in init, init
    assert re.search(rf"revision={tinymodel.COMMIT_MAIN}\b", init), init


# (method, path, body): every route the real 0.32.0 app has that a client could abuse, a few it
# does not have, and paths that try to walk out of /v1/ (docs/evidence/real-vllm-routes.md)
OUTSIDE_THE_ALLOW_LIST = [
    ("POST", "/invocations", "chat"), ("POST", "/tokenize", "prompt"),
    ("POST", "/detokenize", "tokens"), ("GET", "/metrics", None), ("GET", "/version", None),
    ("GET", "/ping", None), ("POST", "/ping", None), ("GET", "/load", None),
    ("GET", "/openapi.json", None), ("GET", "/docs", None), ("GET", "/kv_event_sources", None),
    ("POST", "/is_scaling_elastic_ep", None), ("POST", "/inference/v1/generate", None),
    ("GET", "/v2/models", None), ("POST", "/pooling", None), ("POST", "/score", None),
    ("GET", "/v1", None), ("GET", "/v1/../invocations", None),
    ("POST", "/v1/%2e%2e/invocations", "chat"), ("POST", "//invocations", "chat"),
    ("POST", "/v1/..%2finvocations", "chat"), ("GET", "/nope", None),
]
BODIES = {"chat": chat_body(), "prompt": {"model": "llama3-8b", "prompt": "hi"},
          "tokens": {"model": "llama3-8b", "tokens": [1, 2]}, None: None}


def raw(ip: str, method: str, path: str, key: str | None = None, body: dict | None = None,
        port: int = 8000) -> tuple[int, bytes]:
    """One request with the path sent exactly as written (no client-side normalizing)."""
    conn = http.client.HTTPConnection(ip, port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_from_outside_only_v1_with_the_key_and_health_reach_the_real_server(lab, pair):
    """The real server behind each host's front (nginx): /v1/* only with the key, /health for
    load balancers, every other route refused, whatever key is sent; vLLM's own port cannot be
    reached from outside. Behind the front the real server still shows its hole (/invocations
    runs a completion without a key), so the front is what closes it."""
    for name in PAIR:
        ip = lab.host(name).public_ip
        wait_answering(lab, name)
        for key in (None, "wrong-key", API[:-1]):
            assert raw(ip, "GET", "/v1/models", key)[0] == 401, (name, key)
            assert raw(ip, "POST", "/v1/chat/completions", key, chat_body())[0] == 401
            assert raw(ip, "POST", "/v1/completions", key, BODIES["prompt"])[0] == 401
        assert raw(ip, "GET", "/v1/models", API)[0] == 200
        status, body = raw(ip, "POST", "/v1/completions", API,
                           {**BODIES["prompt"], "max_tokens": 4})
        assert status == 200 and json.loads(body)["choices"], body
        assert raw(ip, "GET", "/health")[0] == 200
        assert raw(ip, "POST", "/health")[0] == 403
        for method, path, body_name in OUTSIDE_THE_ALLOW_LIST:
            for key in (None, API):
                status, answer = raw(ip, method, path, key, BODIES[body_name])
                assert status in (400, 401, 403, 404), (name, method, path, key, status)
                assert b"choices" not in answer and b"vllm:" not in answer, (path, answer)
        with pytest.raises(OSError):
            raw(ip, "GET", "/health", port=8001)
    # behind the front, on the host itself: the real server's own answers
    inside = lab.ssh(H100, "curl -s -o /dev/null -w '%{http_code}' -H 'Content-Type: "
                           "application/json' -d " + shlex.quote(json.dumps(chat_body()))
                           + " http://127.0.0.1:8001/invocations").stdout
    assert inside == "200"
    # the key: in the root-only map file only, never in nginx's logs or its site file
    listing = lab.ssh(H100, "stat -c '%a %U' /etc/gpufleet/llama3.front-keys.conf").stdout
    assert listing.split() == ["600", "root"]
    assert lab.ssh(H100, f"grep -rlF {shlex.quote(API)} /var/log/nginx "
                         "/etc/nginx", check=False).stdout == ""


def test_status_reads_every_host_with_the_real_servers_gauges(lab, pair):
    """``gpufleet status``: a row per host, in parallel: the good hosts with their release,
    health and the real server's gauges, the hosts whose deploy failed with what they lack, and
    a host cut off the network as a row with its reason. (Under load the gauges move, but on
    these two cores the real server answers /metrics only between generations, so a test
    cannot catch one running.)"""
    cut = "llama3-gpu-05"  # the GPU-less host: nothing of the service on it
    veth = lab.cfg.veth(lab.host(cut).index)
    releases = host_releases(lab)
    subprocess.run(["ip", "link", "set", veth, "down"], check=True)
    try:
        run = gpufleet(lab, "status", "inventories/do.py", "--json", timeout=120)
    finally:
        subprocess.run(["ip", "link", "set", veth, "up"], check=True)
    assert run.returncode == 1, run.output  # a host could not be read
    doc = json.JSONDecoder().raw_decode(run.output[run.output.index("{"):])[0]
    rows = {r["host"]: r for r in doc["hosts"]}
    assert doc["service"] == "llama3" and len(rows) == 6
    for name in PAIR:
        row = rows[name]
        assert row["health"] == 200 and row["unit"]["active"] == "active", row
        assert row["release"]["id"] == releases[name]["current"]
        assert row["release"]["revision"] == tinymodel.COMMIT_MAIN
        assert row["gpus"] and row["driver"], row
        assert row["metrics"] == {"running": 0, "waiting": 0,
                                  "kv_cache_usage": row["metrics"]["kv_cache_usage"]}, row
        assert 0 <= row["metrics"]["kv_cache_usage"] <= 1
    assert rows[cut]["error"].startswith("unreachable: "), rows[cut]
    nodriver = rows["llama3-gpu-04"]
    assert nodriver["release"] is None and nodriver["gpu_error"], nodriver
    table = gpufleet(lab, "status", "inventories/do.py").output
    assert f"{H100} " in table and "llama3-8b@" + tinymodel.COMMIT_MAIN[:12] in table, table


def test_bench_runs_vllms_own_benchmark_through_the_front_and_compares(lab, pair):
    """``gpufleet bench``: ``vllm bench serve`` from the pinned (real) image on the host, against
    its front with the key from the env file; the JSON is kept next to the release record and
    on the controller, and ``--compare previous`` sets a run against the one before."""
    release = host_releases(lab)[H100]["current"]
    args = ["bench", "inventories/do.py", H100, "--num-prompts", "8", "--concurrency", "4",
            "--input-len", "32", "--output-len", "8"]
    first = gpufleet(lab, *args, "--json", timeout=600)
    assert first.returncode == 0, first.output[-3000:]
    doc = json.JSONDecoder().raw_decode(first.output[first.output.index("{"):])[0]
    result = doc["result"]
    assert result["completed"] == 8 and result["failed"] == 0, result
    assert result["request_throughput"] > 0 and result["output_throughput"] > 0
    assert result["p99_ttft_ms"] >= result["p50_ttft_ms"] > 0 and "p99_tpot_ms" in result
    assert result["release"] == release and result["num_prompts"] == 8
    kept = lab.ssh(H100, f"ls /var/lib/gpufleet/llama3/releases/{release}/bench/").stdout
    assert doc["kept"].rsplit("/", 1)[1] in kept.split()
    second = gpufleet(lab, *args, "--compare", "previous", timeout=600)
    assert second.returncode == 0, second.output[-3000:]
    lines = second.output.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("run "))
    assert lines[header].split()[1:3] == ["req/s", "out"]
    assert lines[header + 3].startswith("ratio "), second.output
    assert API not in first.output + second.output


BAD_RELEASE = 'extra_args=["--tokenizer","/nonexistent"]'  # vLLM fails at start, every time


def test_rollout_health_gate_and_rollback_with_the_real_server(lab, pair, monkeypatch):
    """Canary then batch to a new release; a release the real server cannot start stops at the
    canary, which is rolled back to the release before (``gpufleet rollback`` of a whole fleet
    is test_rollout.py's, on the stand-in)."""
    monkeypatch.setenv("VLLM_API_KEY", API)  # the first deploy's key (another is a new release)
    limits = [a for n in PAIR for a in ("--limit", n)]
    r1 = {n: host_releases(lab)[n]["current"] for n in PAIR}

    run = rollout(lab, *limits, "--data", "max_num_seqs=16", "--batch", "1")
    assert run.returncode == 0, run.output[-3000:]
    assert run.output.index(f"== canary (1/2): {PAIR[0]}") < run.output.index(
        f"== batch 2 (2/2): {PAIR[1]}")
    rows = host_releases(lab)
    r2 = rows[PAIR[0]]["current"]
    assert all(rows[n]["current"] == r2 and rows[n]["previous"] == r1[n] for n in PAIR)
    for name in PAIR:
        assert get(lab.host(name).public_ip, "/v1/chat/completions", API, chat_body())[0] == 200

    bad = rollout(lab, *limits, "--data", "max_num_seqs=16", "--data", BAD_RELEASE,
                  "--data", "cold_start_timeout=240", "--batch", "1")
    assert bad.returncode == 3, bad.output[-3000:]
    assert f"{PAIR[0]}   rolled back to {r2}, healthy" in bad.output, bad.output[-3000:]
    assert "== batch 2" not in bad.output and "1 host(s) not reached" in bad.output
    rows = host_releases(lab)
    assert [rows[n]["current"] for n in PAIR] == [r2, r2], rows
    wait_answering(lab, PAIR[0])
    logs = lab.ssh(PAIR[0], "journalctl -u gpufleet-llama3 --no-pager -o cat | tail -n 400").stdout
    assert "/nonexistent" in logs  # the real server's own words about the bad release

