"""End to end with the REAL vLLM: what only the real server can show.

The lab of conftest.py, whose good hosts pull ``vllm/vllm-openai:<pinned>`` as upstream vLLM's
server on CPU (``gpufleet_lab.realimage``). Every test starts from the first deploy's state of
the H100 and the RTX 4000 Ada host (``pair``): the user's own command, with the real engine
answering. Each restart of the real server costs about a minute here, so tests share them.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request

import pytest

from gpufleet.model.vllm_version import PINNED_VERSION
from gpufleet_lab import tinymodel
from tests.e2e.conftest import API, GOOD
from tests.e2e.lab import Converged, Lab
from tests.e2e.test_preflight import host_bytes
from tests.e2e.test_rollout import host_releases, rollout

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
        status, body = get(ip, "/version")
        assert status == 200 and json.loads(body) == {"version": str(PINNED_VERSION)}
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


def test_the_api_key_on_every_route_as_the_real_server_shows_it(lab, pair):
    """What --api-key guards in the real server, from the controller, with no key, a wrong key
    and the key. /v1 is guarded; /invocations serves a completion without any key (the hole
    the stand-in hid; the fleet's front closes it)."""
    ip = lab.host(H100).public_ip
    wait_answering(lab, H100)
    for key in (None, "wrong-key"):
        assert get(ip, "/v1/models", key)[0] == 401
        assert get(ip, "/v1/chat/completions", key, chat_body())[0] == 401
    assert get(ip, "/v1/models", API)[0] == 200
    status, body = get(ip, "/invocations", None, chat_body())
    assert status == 200 and json.loads(body)["choices"], body
    for path in ("/health", "/ping", "/version", "/metrics"):
        assert get(ip, path)[0] == 200, path


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

