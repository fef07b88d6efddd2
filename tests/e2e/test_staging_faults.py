"""End to end on a lab of its own (prefix "hb", one H100 host): the server gets only its API key,
the Hub token has its own root-only file (removed when no token is set), and killing the
controller during weight staging stops the stager on the host; the next run resumes it, so the
weights travel once, not twice. Each test starts from the host as the first deploy left it
(``deployed``)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest

from gpufleet_lab import manager
from tests.e2e.lab import BIN, ROOT, Converged, Lab, converge, start_lab

PREFIX, SUBNET = "hb", "10.222.0"
HOST = "llama3-gpu-01"
MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
MODEL_DIR = "/opt/models/hub/models--meta-llama--Meta-Llama-3-8B-Instruct"
ENV_FILE, TOKEN_FILE = "/etc/gpufleet/llama3.env", "/etc/gpufleet/llama3.hf-token"
API = "gf-staging-faults-test-key-0123456789abcdef"
SLACK = 512 * 1024  # bytes on the wire when the controller was killed


@pytest.fixture(scope="module")
def lab():
    the_lab: Lab = start_lab(PREFIX, SUBNET, ["h100"])
    try:
        yield the_lab
    finally:
        manager.down(the_lab.cfg)


def secrets(lab: Lab) -> dict[str, str]:
    return {"HF_TOKEN": lab.env["HF_TOKEN"], "VLLM_API_KEY": API}


@pytest.fixture(scope="module")
def first_deploy(lab: Lab) -> Converged:
    return converge(lab, [HOST], extra_env=secrets(lab))


@pytest.fixture
def deployed(first_deploy: Converged) -> Converged:
    first_deploy.restore()
    return first_deploy


def hub(lab: Lab, path: str, body: dict | None = None, method: str | None = None) -> dict:
    req = urllib.request.Request(lab.env["HF_ENDPOINT"] + path,
                                 method=method or ("POST" if body else "GET"),
                                 data=json.dumps(body).encode() if body else None)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def host_bytes(lab: Lab) -> int:
    return hub(lab, "/_lab/stats")["bytes_by_client"].get(lab.host(HOST).public_ip, 0)


def model_bytes(lab: Lab) -> int:
    info = hub(lab, f"/api/models/{MODEL}?blobs=true")
    return sum(f["size"] for f in info["siblings"] if "/" not in f["rfilename"]
               and f["rfilename"] != ".gitattributes")


def stagers(lab: Lab) -> list[str]:
    out = lab.ssh(HOST, "ps -eo pid,args", check=False).stdout
    return [line for line in out.splitlines()
            if "stage_weights.py" in line and "ps -eo" not in line]


def test_the_server_has_the_api_key_and_not_the_hub_token(lab, deployed):
    run = deployed.first_run
    assert run.returncode == 0, run.output[-3000:]
    token = lab.env["HF_TOKEN"]
    # every process of the container: vLLM (pid 1, the entrypoint exec'ed it) has the API key
    environ = lab.ssh(HOST, "docker exec gpufleet-llama3 cat /proc/1/environ").stdout
    variables = dict(v.split("=", 1) for v in environ.split("\0") if "=" in v)
    assert variables.get("VLLM_API_KEY") == API
    assert "HF_TOKEN" not in variables and "HUGGING_FACE_HUB_TOKEN" not in variables
    assert variables.get("HF_HUB_OFFLINE") == "1"
    every = lab.ssh(HOST, "docker exec gpufleet-llama3 sh -c 'cat /proc/[0-9]*/environ' | "
                          "tr '\\0' '\\n'").stdout
    assert token not in every and "HF_TOKEN" not in every
    # the two root-only files: the server's env file, the staging's token file
    modes = lab.ssh(HOST, f"stat -c '%a %U %G' {ENV_FILE} {TOKEN_FILE} /etc/gpufleet").stdout
    assert modes.split("\n")[:3] == ["600 root root", "600 root root", "700 root root"]
    sums = lab.ssh(HOST, f"sha256sum {ENV_FILE} {TOKEN_FILE}").stdout.split()
    assert sums[0] == hashlib.sha256(f"VLLM_API_KEY='{API}'\n".encode()).hexdigest()
    assert sums[2] == hashlib.sha256(f"HF_TOKEN='{token}'\n".encode()).hexdigest()
    # the model is gated: staged, so the stager read the token from its file (not from argv)
    lab.ssh(HOST, f"test -f {MODEL_DIR}/.gpufleet/$(ls {MODEL_DIR}/snapshots).complete")
    assert token not in run.output


def test_a_token_that_is_no_longer_set_is_removed(lab, deployed):
    lab.ssh(HOST, f"test -f {TOKEN_FILE}")
    # a public model needs no token: the deploy without HF_TOKEN removes the old token file
    run = lab.pyinfra("--data", "model=gpufleet-lab/tiny-llama", "--data", "max_model_len=2048",
                      extra_env={**secrets(lab), "HF_TOKEN": ""})
    assert run.returncode == 0, run.output[-3000:]
    assert lab.ssh(HOST, f"test -e {TOKEN_FILE}", check=False).returncode == 1
    assert lab.ssh(HOST, f"test -f {ENV_FILE}", check=False).returncode == 0
    again = lab.pyinfra(extra_env=secrets(lab))  # back to the gated model: the token returns
    assert again.returncode == 0, again.output[-3000:]
    assert lab.ssh(HOST, f"stat -c '%a %U' {TOKEN_FILE}").stdout.strip() == "600 root"


def test_killing_the_controller_stops_the_stager_and_the_next_run_resumes(lab, deployed):
    lab.ssh(HOST, f"rm -rf {MODEL_DIR}")
    total = model_bytes(lab)
    before = host_bytes(lab)
    hub(lab, "/_lab/faults", {"throttle_bytes_per_second": 400_000})  # ~13 s for 5 MB
    env = {**os.environ, **lab.env, **secrets(lab),
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "COLUMNS": "200"}
    controller = subprocess.Popen(
        [str(BIN / "pyinfra"), "-y", "inventories/do.py", "deploys/llama3.py"], cwd=ROOT,
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while host_bytes(lab) - before < 1_000_000:
            assert controller.poll() is None, "the deploy ended before it was killed"
            assert time.monotonic() < deadline, "staging did not start"
            time.sleep(0.2)
        assert stagers(lab), "no stage_weights.py on the host while bytes travel"
        controller.send_signal(signal.SIGKILL)  # the controller dies: no cleanup of its own
        controller.wait(timeout=10)
        killed_at = time.monotonic()
        while stagers(lab):
            assert time.monotonic() - killed_at < 8, f"the stager outlived its run: {stagers(lab)}"
            time.sleep(0.5)
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.wait()
        hub(lab, "/_lab/faults", method="DELETE")
    first = host_bytes(lab) - before
    assert 1_000_000 <= first < total  # stopped half-way; what arrived is kept
    kept = lab.ssh(HOST, f"du -sb {MODEL_DIR}/.gpufleet/partial | cut -f1").stdout.strip()
    assert int(kept) > 0
    run = lab.pyinfra(extra_env=secrets(lab))
    assert run.returncode == 0, run.output[-3000:]
    moved = host_bytes(lab) - before
    assert total <= moved < total + SLACK, (moved, total)  # once, not twice
    lab.ssh(HOST, f"test -f {MODEL_DIR}/.gpufleet/$(ls {MODEL_DIR}/snapshots).complete")
