"""End to end on the lab: Hub pre-flight, per-host plan, weights staged once at a pinned commit.

The lab of test_deploy.py (see conftest.py); every test starts with hosts 1 and 2 deployed and
serving as the first deploy left them (``serving``)."""

from __future__ import annotations

import json
import urllib.request

import pytest

from gpufleet_lab import hub_emulator as he
from gpufleet_lab import tinymodel
from tests.e2e.lab import Converged

MODEL_DIR = "/opt/models/hub/models--meta-llama--Meta-Llama-3-8B-Instruct"
H100, ADA = "llama3-gpu-01", "llama3-gpu-02"


def hub(lab, path: str, body: dict | None = None, method: str | None = None) -> dict:
    req = urllib.request.Request(lab.env["HF_ENDPOINT"] + path,
                                 method=method or ("POST" if body else "GET"),
                                 data=json.dumps(body).encode() if body else None)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def host_bytes(lab, name: str) -> int:
    return hub(lab, "/_lab/stats")["bytes_by_client"].get(lab.host(name).public_ip, 0)


@pytest.fixture
def serving(first_deploy: Converged) -> Converged:
    """The H100 and the Ada host as the first deploy left them: the plain spec, weights staged
    (the third good host, which test_recovery.py rebuilds, is not needed here)."""
    first_deploy.restore([H100, ADA])
    return first_deploy


def test_weights_were_staged_and_the_server_runs_offline(lab, serving):
    snap = f"{MODEL_DIR}/snapshots/{tinymodel.COMMIT_MAIN}"
    lab.ssh(H100, f"test -f {MODEL_DIR}/.gpufleet/{tinymodel.COMMIT_MAIN}.complete && "
                  f"test -L {snap}/model.safetensors && test -f {snap}/config.json")
    unit = lab.ssh(H100, "cat /etc/systemd/system/gpufleet-llama3.service").stdout
    assert "-e HF_HUB_OFFLINE=1" in unit and f"--revision {tinymodel.COMMIT_MAIN}" in unit
    logs = lab.ssh(H100, "docker logs gpufleet-llama3 2>&1").stdout
    assert "Loading weights took" in logs  # the real server loaded them


def test_a_second_deploy_downloads_nothing(lab, secrets, serving):
    before = {n: host_bytes(lab, n) for n in (H100, ADA)}
    run = lab.pyinfra("--limit", H100, "--limit", ADA, extra_env=secrets)
    assert run.returncode == 0 and run.grand_total()[-3] == "-", run.output[-2000:]
    assert {n: host_bytes(lab, n) for n in (H100, ADA)} == before


def test_an_interrupted_download_resumes(lab, secrets, serving):
    lab.ssh(ADA, f"rm -rf {MODEL_DIR}")
    total = sum(f["size"] for f in hub(lab, "/api/models/meta-llama/Meta-Llama-3-8B-Instruct"
                                              "?blobs=true")["siblings"]
                if f["rfilename"] != ".gitattributes")
    cut_before = hub(lab, "/_lab/stats")["downloads"]["cut"]
    hub(lab, "/_lab/faults", {"cut_after_bytes": 1_000_000, "count": 1, "path": "*.safetensors"})
    before = host_bytes(lab, ADA)
    try:
        run = lab.pyinfra("--limit", ADA, "-v", extra_env=secrets)
    finally:
        hub(lab, "/_lab/faults", method="DELETE")  # a cut not used up would hit the next test
    assert run.returncode == 0, run.output[-3000:]
    assert hub(lab, "/_lab/stats")["downloads"]["cut"] == cut_before + 1
    assert host_bytes(lab, ADA) - before == total  # the first MB was not fetched twice
    lab.ssh(ADA, f"test -f {MODEL_DIR}/.gpufleet/{tinymodel.COMMIT_MAIN}.complete")


def test_a_new_revision_is_staged_before_the_restart(lab, secrets, serving):
    before = host_bytes(lab, H100)
    run = lab.pyinfra("--limit", H100, "--data", "revision=next", extra_env=secrets)
    assert run.returncode == 0, run.output[-3000:]
    out = run.output
    assert out.index(f"Weights meta-llama/Meta-Llama-3-8B-Instruct@{tinymodel.COMMIT_NEXT[:12]}") < \
        out.index("systemd unit gpufleet-llama3.service") < out.index("Restart gpufleet-llama3")
    # only the file that differs between the two commits travelled
    assert 0 < host_bytes(lab, H100) - before < 4096  # generation_config.json, not 5 MB
    unit = lab.ssh(H100, "cat /etc/systemd/system/gpufleet-llama3.service").stdout
    assert f"--revision {tinymodel.COMMIT_NEXT}" in unit
    # the real server reports the new commit, loaded from its staged snapshot
    init = next(ln for ln in lab.ssh(H100, "docker logs gpufleet-llama3 2>&1").stdout.splitlines()
                if "Initializing a V1 LLM engine" in ln)
    assert f"revision={tinymodel.COMMIT_NEXT}" in init and \
        f"/snapshots/{tinymodel.COMMIT_NEXT}'" in init, init
    # and back to main: nothing to download
    before = host_bytes(lab, H100)
    assert lab.pyinfra("--limit", H100, extra_env=secrets).returncode == 0
    assert host_bytes(lab, H100) == before


def _unit_times(lab) -> dict[str, str]:
    return {n: lab.ssh(n, "stat -c %Y /etc/systemd/system/gpufleet-llama3.service").stdout
            for n in (H100, ADA)}


def test_a_gated_model_without_access_stops_before_any_host_changes(lab, secrets, serving):
    before = _unit_times(lab)
    for token, needle in ((he.NO_ACCESS_TOKEN, "has no access to it (licence not accepted)"),
                          ("", "is gated: set HF_TOKEN")):
        run = lab.pyinfra("--limit", H100, "--limit", ADA,
                          extra_env={**secrets, "HF_TOKEN": token})
        assert run.returncode != 0
        assert needle in run.output and "meta-llama/Meta-Llama-3-8B-Instruct" in run.output
        assert "Starting operation" not in run.output
        if token:
            assert token not in run.output
    assert _unit_times(lab) == before


def test_a_gpu_too_small_for_the_spec_is_refused_with_the_plans_reason(lab, secrets, serving):
    """This lab's Llama 3 repository holds the tiny model (the real engine loads it), so the plan
    is the tiny model's: 5 % of 20 GiB leaves it no KV cache (5 % of the H100's 80 GiB would).

    The Ada host alone: that a host its checks refuse leaves the others to converge, the first
    deploy proved, and an H100 given this spec would restart its real server twice."""
    unit = lab.ssh(ADA, "sha256sum /etc/systemd/system/gpufleet-llama3.service").stdout
    started = lab.ssh(ADA, "docker inspect -f '{{.State.StartedAt}}' gpufleet-llama3").stdout
    run = lab.pyinfra("--limit", ADA, "--data", "quantization=fp16",
                      "--data", "gpu_memory_utilization=0.05", extra_env=secrets)
    assert run.returncode == 1
    lines = "\n".join(run.host_lines(ADA))
    assert "the plan refuses this host" in lines and "budget" in lines, lines
    assert lab.ssh(ADA, "sha256sum /etc/systemd/system/gpufleet-llama3.service").stdout == unit
    assert lab.ssh(ADA, "docker inspect -f '{{.State.StartedAt}}' gpufleet-llama3").stdout \
        == started
