"""Fleet rollouts end to end on their own lab: four H100 hosts (prefix gr, subnet 10.218.0).

Two releases matter: R1, what the plain deploy (fp8) records first (``r1``), and R2, what the
first rollout to fp16 records (``r2``). Each test starts from the fleet state it names, and the
fixture brings the fleet there (a rollout, only when it is not there already): ``on_r1``,
``on_r2``, ``on_r2_after_r1`` (previous is R1: a rollback target), ``serving`` (any release,
no lock), ``audit_history``. The scenarios: the plain deploy records R1; the rollout to fp16;
a rollback to R1; a release that never becomes healthy; two rollouts at once; a host powered off
during its batch; a host that drops off the network during its batch and one unreachable at the
start; then the run lock against plain deploys (two at once, one during a rollout, one killed).
Any test runs alone.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpufleet.fleet import run_lock
from gpufleet.model import release as releases
from gpufleet.model import secrets
from gpufleet_lab import hosts as lab_hosts
from tests.e2e.lab import BIN, ROOT, Lab, Run, start_lab

PREFIX, SUBNET = "gr", "10.218.0"
NAMES = [f"llama3-gpu-{i:02d}" for i in range(1, 5)]
FP16 = ("--data", "quantization=fp16")  # the spec change from R1 to R2
NEVER_HEALTHY = ['container_env={"VLLM_STANDIN_FAIL":"never-healthy"}', "cold_start_timeout=20"]


@pytest.fixture(scope="session")
def rollout_lab():
    from gpufleet_lab import manager

    lab: Lab = start_lab(PREFIX, SUBNET, ["h100"] * 4)
    try:
        yield lab
    finally:
        for i in range(1, 5):  # a link a failed test left down
            subprocess.run(["ip", "link", "set", lab.cfg.veth(i), "up"], capture_output=True)
        manager.down(lab.cfg)


def _env(lab: Lab) -> dict[str, str]:
    return {**os.environ, **lab.env, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}


def gpufleet(lab: Lab, *args: str, timeout: float = 600) -> Run:
    cmd = [str(BIN / "gpufleet"), *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(lab), capture_output=True, text=True,
                          timeout=timeout)
    return Run(cmd, proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0)


def rollout(lab: Lab, *args: str, timeout: float = 600) -> Run:
    return gpufleet(lab, "rollout", "inventories/do.py", "deploys/llama3.py", "--yes", *args,
                    timeout=timeout)


def start_rollout(lab: Lab, log: Path, *args: str) -> subprocess.Popen:
    cmd = [str(BIN / "gpufleet"), "rollout", "inventories/do.py", "deploys/llama3.py", "--yes",
           *args]
    out = open(log, "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(lab), stdout=out, stderr=subprocess.STDOUT,
                            text=True)


def wait_for(log: Path, needle: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while needle not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} never came:\n{log.read_text()}")
        time.sleep(0.2)


def host_releases(lab: Lab) -> dict[str, dict]:
    run = gpufleet(lab, "releases", "inventories/do.py", "--json")
    assert run.returncode == 0, run.output
    doc = first_json(run.output)
    return {row["host"]: row for row in doc["hosts"]}


def first_json(output: str) -> dict:
    """The JSON document in a command's output (live lines go to stderr, after it or before)."""
    return json.JSONDecoder().raw_decode(output[output.index("{\n"):])[0]


def currents(lab: Lab) -> dict[str, str | None]:
    return {n: r.get("current") for n, r in host_releases(lab).items()}


def started_at(lab: Lab, name: str) -> str:
    return lab.ssh(name, "docker inspect -f '{{.State.StartedAt}}' gpufleet-llama3").stdout


def unit_sha(lab: Lab, name: str) -> str:
    return lab.ssh(name, "sha256sum /etc/systemd/system/gpufleet-llama3.service").stdout


def chat(lab: Lab, name: str) -> str:
    key = secrets.api_key("llama3", lab.env).reveal()
    body = json.dumps({"model": "llama3-8b", "max_tokens": 8,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = urllib.request.Request(
        f"http://{lab.host(name).public_ip}:8000/v1/chat/completions", data=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)["choices"][0]["message"]["content"]


def lines_of(run_output: str, name: str) -> list[str]:
    return [ln for ln in run_output.splitlines() if f"    {name} " in ln]


def index_of(output: str, needle: str) -> int:
    assert needle in output, f"{needle!r} not in:\n{output}"
    return output.index(needle)


# -- the fleet states the tests start from ----------------------------------------------------------


@dataclass
class Recorded:
    """A run and the releases on the hosts right after it (and what the Hub served)."""

    run: Run
    rows: dict[str, dict]
    hub: dict | None = None


def settled_rows(lab: Lab) -> dict[str, dict]:
    """The releases table once every host answers and holds no lock: a test that failed half-way
    may have left a host powered off, off the network, or with a lock whose run is gone."""
    for name in NAMES:
        lab.answering(name)
    rows = host_releases(lab)
    for name in [n for n, r in rows.items() if r.get("lock")]:
        lab.ssh(name, run_lock.break_command("llama3").get_raw_value())
    return host_releases(lab) if any(r.get("lock") for r in rows.values()) else rows


def on_release(row: dict, release: str, previous: str | None = None) -> bool:
    return (row.get("current") == release and not row.get("drift") and not row.get("lock")
            and (previous is None or row.get("previous") == previous))


def bring_fleet_to(lab: Lab, release: str, *data: str) -> None:
    """Every host on ``release``, its unit in place: a rollout of the spec changed by ``data``
    (the one that makes ``release``) when one host is not."""
    rows = settled_rows(lab)
    if all(on_release(rows[n], release) for n in NAMES):
        return
    run = rollout(lab, *data, "--batch", "100%")
    assert run.returncode == 0, run.output
    rows = host_releases(lab)
    assert all(on_release(rows[n], release) for n in NAMES), rows


@pytest.fixture(scope="session")
def plain_deploy(rollout_lab: Lab) -> Recorded:
    """The plain deploy on the fresh lab: every host records its first release, R1 (fp8)."""
    from tests.e2e.test_preflight import hub

    run = rollout_lab.pyinfra()
    return Recorded(run, host_releases(rollout_lab), hub(rollout_lab, "/_lab/stats"))


@pytest.fixture(scope="session")
def r1(plain_deploy: Recorded) -> str:
    ids = {r["current"] for r in plain_deploy.rows.values()}
    assert len(ids) == 1 and None not in ids, (plain_deploy.rows,
                                               plain_deploy.run.output[-3000:])
    return ids.pop()


@pytest.fixture(scope="session")
def first_rollout(rollout_lab: Lab, r1: str) -> Recorded:
    """The rollout to fp16 in batches of two, from every host on R1: it records R2."""
    bring_fleet_to(rollout_lab, r1)
    run = rollout(rollout_lab, *FP16, "--batch", "2")
    return Recorded(run, host_releases(rollout_lab))


@pytest.fixture(scope="session")
def r2(first_rollout: Recorded, r1: str) -> str:
    ids = {r["current"] for r in first_rollout.rows.values()}
    assert len(ids) == 1 and None not in ids and r1 not in ids, (
        first_rollout.rows, first_rollout.run.output[-3000:])
    return ids.pop()


@pytest.fixture
def on_r1(rollout_lab: Lab, r1: str) -> str:
    bring_fleet_to(rollout_lab, r1)
    return r1


@pytest.fixture
def on_r2(rollout_lab: Lab, r2: str) -> str:
    bring_fleet_to(rollout_lab, r2, *FP16)
    return r2


@pytest.fixture
def on_r2_after_r1(rollout_lab: Lab, r1: str, r2: str) -> tuple[str, str]:
    """Every host on R2 with R1 as its previous release (what a rollback goes back to)."""
    rows = settled_rows(rollout_lab)
    if not all(on_release(rows[n], r2, previous=r1) for n in NAMES):
        bring_fleet_to(rollout_lab, r1)
        bring_fleet_to(rollout_lab, r2, *FP16)
    rows = host_releases(rollout_lab)
    assert all(on_release(rows[n], r2, previous=r1) for n in NAMES), rows
    return r1, r2


@pytest.fixture
def serving(rollout_lab: Lab, r1: str) -> None:
    """Every host serving a release it recorded, unit in place, no lock (R1 when not)."""
    rows = settled_rows(rollout_lab)
    if not all(r.get("current") and not r.get("drift") for r in rows.values()):
        bring_fleet_to(rollout_lab, r1)


AUDITED_ROLLOUTS, AUDITED_ROLLBACKS = 4, 1  # what the audit trail test reads back on the first host


@pytest.fixture
def audit_history(rollout_lab: Lab, r1: str, r2: str) -> None:
    """The first host went through at least four rollouts and one rollback (audit lines). The
    scenarios before it in this file leave more; alone, the test makes them: a rollback and
    rollouts of that host only, between R1 and R2."""
    lab, first = rollout_lab, NAMES[0]

    def counts() -> tuple[int, int]:
        audit = [json.loads(x)["command"] for x in lab.ssh(
            first, f"cat {releases.audit_log('llama3')}", check=False).stdout.splitlines()]
        return audit.count("rollout"), audit.count("rollback")

    settled_rows(lab)
    if counts()[1] < AUDITED_ROLLBACKS:
        run = gpufleet(lab, "rollback", "inventories/do.py", "--limit", first, "--yes")
        assert run.returncode == 0, run.output
    while counts()[0] < AUDITED_ROLLOUTS:
        data = () if currents(lab)[first] == r2 else FP16  # to the other one of R1 and R2
        run = rollout(lab, *data, "--limit", first)
        assert run.returncode == 0, run.output
    assert counts()[1] >= AUDITED_ROLLBACKS


# -- the tests ------------------------------------------------------------------------------------


def test_plain_deploy_records_the_release_and_a_rerun_reads_one_fact(rollout_lab, plain_deploy):
    lab = rollout_lab
    run, rows = plain_deploy.run, plain_deploy.rows
    assert run.returncode == 0, run.output[-3000:]
    ids = {r["current"] for r in rows.values()}
    assert len(ids) == 1 and None not in ids, rows
    r1 = ids.pop()
    assert all(r["previous"] is None and r["quantization"] == "fp8" for r in rows.values())
    # a re-run of the same release: the record op changes nothing and runs one command (a fact)
    bring_fleet_to(lab, r1)
    again = lab.pyinfra("-vv", "--limit", NAMES[0])
    assert again.returncode == 0, again.output[-3000:]
    section = again.output.split(f"Release {r1} recorded")[1].split("--> ")[0]
    assert section.count(">>>") == 1 and "No changes" in section, section


def test_a_first_deploy_of_four_hosts_takes_each_weight_file_from_the_hub_once(rollout_lab,
                                                                               plain_deploy):
    """One host stages from the Hub (the first whose deploy pyinfra defines: it defines hosts in
    parallel); the three others from it, over the private network."""
    lab, run, served = rollout_lab, plain_deploy.run, plain_deploy.hub
    assert run.returncode == 0 and served is not None, run.output[-3000:]
    size = json.loads(lab.ssh(NAMES[0], f"cat {markers_glob()}").stdout)["bytes"]
    by_host = {n: served["bytes_by_client"].get(lab.host(n).public_ip, 0) for n in NAMES}
    seeds = [n for n, b in by_host.items() if b]
    assert len(seeds) == 1 and by_host[seeds[0]] == size, (by_host, size)
    weights = {f: b for f, b in served["bytes_by_file"].items() if f.endswith(".safetensors")}
    assert weights and all(b == size_of(lab, seeds[0], f) for f, b in weights.items()), weights
    assert run.output.count(f"weights: from peer {seeds[0]} ") == 3, run.output[-3000:]
    for name in NAMES:
        staged = lab.ssh(name, f"cat {markers_glob()}").stdout
        assert json.loads(staged)["bytes"] == size  # complete: served from the peer, verified


def markers_glob() -> str:
    return "/opt/models/hub/models--*/.gpufleet/*.complete"


def size_of(lab: Lab, name: str, repo_file: str) -> int:
    """The size of ``org/name/path`` as staged on host ``name``."""
    repo, _, path = repo_file.partition("/")[2].partition("/")
    org = repo_file.split("/", 1)[0]
    snap = f"/opt/models/hub/models--{org}--{repo}/snapshots/*/{path}"
    return int(lab.ssh(name, f"stat -L -c %s {snap}").stdout.split()[0])


def test_rollout_canary_then_batches_every_host_healthy_on_the_new_release(rollout_lab, r1,
                                                                          first_rollout):
    lab = rollout_lab
    run = first_rollout.run  # from every host on R1
    out = run.output
    assert run.returncode == 0, out
    # order and batch boundaries
    canary = index_of(out, "== canary (1/3): llama3-gpu-01")
    batch2 = index_of(out, "== batch 2 (2/3): llama3-gpu-02, llama3-gpu-03")
    batch3 = index_of(out, "== batch 3 (3/3): llama3-gpu-04")
    assert canary < batch2 < batch3
    # one batch out of service at a time: a batch starts after the previous one is healthy
    assert index_of(out, "llama3-gpu-01   healthy on") < batch2
    assert max(index_of(out, "llama3-gpu-02   healthy on"),
               index_of(out, "llama3-gpu-03   healthy on")) < batch3
    for name in NAMES:
        phases = [ln.split(name, 1)[1].strip() for ln in lines_of(out, name)]
        assert "deploying" in phases and "waiting for health" in phases, phases
    rows = host_releases(lab)
    r2 = rows[NAMES[0]]["current"]
    assert r2 != r1
    for name in NAMES:
        assert rows[name]["current"] == r2 and rows[name]["previous"] == r1
        assert rows[name]["quantization"] == "fp16" and not rows[name]["lock"]
        assert "--dtype float16" in lab.ssh(name, "cat /etc/systemd/system/gpufleet-llama3"
                                                  ".service").stdout.replace('"', "")
        assert chat(lab, name)
        table = [ln for ln in out.splitlines() if ln.startswith(name)]
        assert table and f"{r1}  {r2}" in table[-1] and "healthy" in table[-1]
    # the audit log on every host
    audit = [json.loads(x) for x in lab.ssh(NAMES[1], "cat /var/lib/gpufleet/llama3/audit.log")
             .stdout.splitlines()]
    assert audit[-1]["command"] == "rollout" and audit[-1]["result"] == "completed"
    assert audit[-1]["from_release"] == r1 and audit[-1]["to_release"] == r2
    assert audit[-1]["batch"] == "batch 2" and audit[-1]["by"].startswith("root@")


def test_a_second_run_of_the_same_rollout_changes_nothing(rollout_lab, on_r2):
    lab = rollout_lab
    before = {n: started_at(lab, n) for n in NAMES}
    run = rollout(lab, "--data", "quantization=fp16", "--json")
    assert run.returncode == 0, run.output
    report = first_json(run.output)
    assert report["result"] == "completed" and report["batches"] == []
    assert {h["result"] for h in report["hosts"]} == {"unchanged"}
    assert {n: started_at(lab, n) for n in NAMES} == before


def test_rollback_returns_every_host_to_the_previous_release_without_downloading(rollout_lab,
                                                                                 on_r2_after_r1):
    lab = rollout_lab
    r1, r2 = on_r2_after_r1
    since = lab.ssh(NAMES[0], "date +%s").stdout.strip()
    images = {n: lab.ssh(n, "docker images --digests --format '{{.ID}} {{.Repository}}:"
                            "{{.Tag}}' | sort").stdout for n in NAMES}
    run = gpufleet(lab, "rollback", "inventories/do.py", "--yes")
    assert run.returncode == 0, run.output
    rows = host_releases(lab)
    for name in NAMES:
        assert rows[name]["current"] == r1 and rows[name]["previous"] == r2
        assert "--quantization fp8" in lab.ssh(name, "cat /etc/systemd/system/gpufleet-llama3"
                                                     ".service").stdout
        assert chat(lab, name)
        # nothing downloaded: no image pulled, the same images
        pulls = lab.ssh(name, f"docker events --since {since} --until \"$(date +%s)\" "
                              "--filter type=image --filter event=pull").stdout
        assert pulls.strip() == "", pulls
        assert lab.ssh(name, "docker images --digests --format '{{.ID}} {{.Repository}}:"
                             "{{.Tag}}' | sort").stdout == images[name]
    assert "rollback" in run.output and "completed" in run.output


def test_release_that_never_gets_healthy_stops_at_the_canary_rolled_back(rollout_lab, on_r1):
    lab, r1 = rollout_lab, on_r1
    others = NAMES[1:]
    before = {n: (started_at(lab, n), unit_sha(lab, n)) for n in others}
    run = rollout(lab, *[a for d in NEVER_HEALTHY for a in ("--data", d)])
    out = run.output
    assert run.returncode == 3, out
    assert "/health did not answer 200 within 20s" in out
    assert f"llama3-gpu-01   rolled back to {r1}, healthy" in out
    assert "aborted" in out and "3 host(s) not reached" in out
    assert "== batch 2" not in out
    bad = next(ln.split()[3] for ln in out.splitlines() if ln.startswith("llama3-gpu-01  canary"))
    rows = host_releases(lab)
    # the canary serves again, on the release it had; the failed one was never recorded
    assert rows[NAMES[0]]["current"] == r1 and chat(lab, NAMES[0])
    assert bad != r1 and bad not in rows[NAMES[0]]["kept"]
    assert lab.ssh(NAMES[0], "grep -c never-healthy /etc/systemd/system/gpufleet-llama3.service",
                   check=False).stdout.strip() == "0"
    # the other hosts never changed: same release, same unit, container not restarted
    for name in others:
        assert rows[name]["current"] == r1
        assert (started_at(lab, name), unit_sha(lab, name)) == before[name]
        table = next(ln for ln in out.splitlines() if ln.startswith(name))
        assert "not reached" in table


def test_two_rollouts_at_once_the_second_refuses_naming_the_holder(rollout_lab, on_r1, r2,
                                                                  tmp_path):
    lab = rollout_lab  # on R1: the first rollout has work to do while the second comes
    log = tmp_path / "first.log"
    first = start_rollout(lab, log, "--data", "quantization=fp16", "--batch", "100%",
                          "--pause", "5")
    try:
        wait_for(log, "lock taken on 4 hosts", first)
        rollout_id = log.read_text().split("(rollout ", 1)[1].split()[0]
        second = rollout(lab, "--data", "quantization=fp16")
        assert second.returncode == 5, second.output
        assert f"held on llama3-gpu-01, llama3-gpu-02, llama3-gpu-03, llama3-gpu-04 by rollout " \
               f"{rollout_id} to release {r2} by root@" in second.output
        assert "(pid " in second.output and "nothing changed" in second.output
        assert "--wait" in second.output and "--break-lock" in second.output
        assert first.wait(timeout=300) == 0, log.read_text()
    finally:
        if first.poll() is None:
            first.terminate()
            first.wait(timeout=60)
    rows = host_releases(lab)
    assert all(r["current"] == r2 and not r["lock"] for r in rows.values())


def _lose_host_during_batch(lab: Lab, tmp_path: Path, name: str, how: str) -> str:
    """Roll out a slow-starting release in batches of two; take ``name`` down while it waits
    for health. Returns the rollout's output."""
    log = tmp_path / f"{how}.log"
    cold = {"power-off": "14", "link-cut": "16"}[how]
    proc = start_rollout(lab, log, "--batch", "2", "--data", "quantization=fp16", "--data",
                         f'container_env={{"VLLM_STANDIN_COLD_START_S":"{cold}"}}')
    try:
        wait_for(log, f"{name}   waiting for health", proc)
        index = NAMES.index(name) + 1
        if how == "power-off":
            lab.ssh(name, "systemctl poweroff --force --force", check=False, timeout=20)
        else:
            subprocess.run(["ip", "link", "set", lab.cfg.veth(index), "down"], check=True)
        assert proc.wait(timeout=300) == 3, log.read_text()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
    return log.read_text()


def _assert_lost(out: str, name: str, untouched: str) -> None:
    table = next(ln for ln in out.splitlines() if ln.startswith(name))
    assert "failed, rollback failed" in table, out
    detail = next(ln for ln in out.splitlines() if ln.startswith(f"  {name}: "))
    assert "host lost" in detail and "rollback impossible: the host does not answer" in detail
    assert "aborted" in out and f"not reached: {untouched}" in out
    assert f"no audit line on {name}" in out  # its lock went with its connection
    assert "llama3-gpu-02   healthy on" in out  # its batch mate made it


def test_host_powered_off_during_its_batch_counts_as_failed(rollout_lab, on_r2, tmp_path):
    lab, r2 = rollout_lab, on_r2
    before = (started_at(lab, NAMES[3]), unit_sha(lab, NAMES[3]))
    out = _lose_host_during_batch(lab, tmp_path, NAMES[2], "power-off")
    _assert_lost(out, NAMES[2], NAMES[3])
    assert (started_at(lab, NAMES[3]), unit_sha(lab, NAMES[3])) == before
    # power it back on: the lock died with the host (no stale lock to break), and a rollback
    # puts it back on its last good release
    lab_hosts.power_cycle_host(lab.cfg, 3)
    lab.wait_ssh(NAMES[2])
    assert not host_releases(lab)[NAMES[2]]["lock"]
    back = gpufleet(lab, "rollback", "inventories/do.py", "--limit", NAMES[2], "--yes")
    assert back.returncode == 0, back.output
    assert "broke the lock of" not in back.output
    assert currents(lab)[NAMES[2]] == r2 and chat(lab, NAMES[2])


def test_host_dropping_off_the_network_during_its_batch_counts_as_failed(rollout_lab, on_r2,
                                                                         tmp_path):
    lab, r2 = rollout_lab, on_r2  # one release everywhere first
    before = (started_at(lab, NAMES[3]), unit_sha(lab, NAMES[3]))
    out = _lose_host_during_batch(lab, tmp_path, NAMES[2], "link-cut")
    try:
        # the watchdog noticed: the host's SSH connection would otherwise hang
        assert "llama3-gpu-03   host lost: no answer on its SSH port" in out
        _assert_lost(out, NAMES[2], NAMES[3])
        assert (started_at(lab, NAMES[3]), unit_sha(lab, NAMES[3])) == before
        # still off the network at the start of the next rollout: reported, nothing changes
        before_all = {n: started_at(lab, n) for n in NAMES if n != NAMES[2]}
        again = rollout(lab, "--data", "quantization=fp16", "--break-lock")
        assert again.returncode == 4, again.output
        assert "1 host(s) unreachable: llama3-gpu-03; nothing changed" in again.output
        assert "lock taken" not in again.output and "broke the lock" not in again.output
        assert {n: started_at(lab, n) for n in before_all} == before_all
    finally:
        subprocess.run(["ip", "link", "set", lab.cfg.veth(3), "up"], check=True)
    lab.wait_ssh(NAMES[2])
    # the host never saw the rollout's connection close (the link was down): its lock holder
    # waits out its expiry, or --break-lock ends it now
    back = gpufleet(lab, "rollback", "inventories/do.py", "--limit", NAMES[2], "--break-lock",
                    "--yes")
    assert back.returncode == 0, back.output
    assert currents(lab)[NAMES[2]] == r2 and chat(lab, NAMES[2])


def test_releases_table_and_audit_trail(rollout_lab, r1, r2, audit_history):
    lab = rollout_lab
    run = gpufleet(lab, "releases", "inventories/do.py")
    assert run.returncode == 0 and "service llama3" in run.output
    for name in NAMES:
        row = next(ln for ln in run.output.splitlines() if ln.startswith(name))
        assert "locked" not in row
    audit = [json.loads(x) for x in lab.ssh(NAMES[0], "cat /var/lib/gpufleet/llama3/audit.log")
             .stdout.splitlines()]
    commands = [a["command"] for a in audit]
    assert commands.count("rollout") >= 4 and commands.count("rollback") >= 1
    assert all(a["rollout"] and a["by"] and a["finished"] for a in audit)
    kept = lab.ssh(NAMES[0], f"ls {releases.releases_dir('llama3')}").stdout.split()
    assert r1 in kept and r2 in kept


# -- one run at a time per host, for every kind of run ---------------------------------------------


def start_deploy(lab: Lab, log: Path, *args: str) -> subprocess.Popen:
    cmd = [str(BIN / "pyinfra"), "-y", "inventories/do.py", "deploys/llama3.py", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env={**_env(lab), "COLUMNS": "200"},
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)


def wait_locked(lab: Lab, proc: subprocess.Popen, log: Path, timeout: float = 120) -> dict:
    """The holder, once ``proc`` holds the run lock on every host."""
    lock = releases.lock_path("llama3")
    deadline = time.monotonic() + timeout
    while True:
        held = [lab.ssh(n, f"flock -n {lock} true", check=False).returncode != 0 for n in NAMES]
        if all(held):
            doc = lab.ssh(NAMES[0], f"cat {releases.lock_holder_path('llama3')}").stdout
            return json.loads(doc)
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the run never held the lock:\n{log.read_text()}")
        time.sleep(0.2)


def serving_flags(lab: Lab, name: str) -> list[str]:
    """The ``vllm serve`` arguments of the container that runs now."""
    args = json.loads(lab.ssh(name, "docker inspect -f '{{json .Args}}' gpufleet-llama3").stdout)
    return args[args.index("vllm") + 1:]


def assert_records_match_the_servers(lab: Lab, max_num_seqs: str) -> None:
    rows = host_releases(lab)
    for name in NAMES:
        record = lab.ssh(name, f"cat {releases.service_dir('llama3')}/current/release.json")
        flags = json.loads(record.stdout)["flags"]
        assert rows[name]["current"] == json.loads(record.stdout)["id"] and not rows[name]["lock"]
        assert serving_flags(lab, name) == flags, name
        assert flags[flags.index("--max-num-seqs") + 1] == max_num_seqs


def test_two_deploys_at_once_one_runs_one_refuses_naming_the_holder(rollout_lab, serving,
                                                                    tmp_path):
    lab = rollout_lab
    log = tmp_path / "first.log"
    first = start_deploy(lab, log, "--data", "quantization=fp16", "--data", "max_num_seqs=20")
    try:
        holder = wait_locked(lab, first, log)
        assert holder["command"] == "deploy" and holder["who"].startswith("root@")
        second = lab.pyinfra("--data", "quantization=fp16", "--data", "max_num_seqs=24")
        assert second.returncode == 1, second.output[-3000:]
        assert f"the llama3 run lock is held by deploy {holder['id']} by root@" in second.output
        assert "nothing changed" in second.output and "GPUFLEET_WAIT" in second.output
        assert "Traceback" not in second.output
        assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.terminate()
            first.wait(timeout=60)
    assert_records_match_the_servers(lab, "20")


def test_a_plain_deploy_during_a_rollout_is_refused_and_waits_with_gpufleet_wait(rollout_lab,
                                                                                 serving,
                                                                                 tmp_path):
    lab = rollout_lab
    log = tmp_path / "rollout.log"
    proc = start_rollout(lab, log, "--data", "quantization=fp16", "--data", "max_num_seqs=28",
                         "--batch", "1", "--pause", "3")
    try:
        wait_for(log, "lock taken on 4 hosts", proc)
        rollout_id = log.read_text().split("(rollout ", 1)[1].split()[0]
        refused = lab.pyinfra("--data", "quantization=fp16", "--data", "max_num_seqs=30")
        assert refused.returncode == 1, refused.output[-3000:]
        assert f"held by rollout {rollout_id} to release " in refused.output
        # with GPUFLEET_WAIT the deploy runs once the rollout has let go, on top of it
        waited = lab.pyinfra("--data", "quantization=fp16", "--data", "max_num_seqs=30",
                             extra_env={"GPUFLEET_WAIT": "300"})
        assert waited.returncode == 0, waited.output[-3000:]
        assert proc.wait(timeout=300) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
    assert_records_match_the_servers(lab, "30")


def test_a_killed_deploy_leaves_no_lock_behind(rollout_lab, serving, tmp_path):
    lab = rollout_lab
    log = tmp_path / "killed.log"
    proc = start_deploy(lab, log, "--data", "quantization=fp16", "--data", "max_num_seqs=31",
                        "--data", 'container_env={"VLLM_STANDIN_COLD_START_S":"20"}')
    wait_locked(lab, proc, log)
    proc.kill()
    proc.wait(timeout=30)
    lock = releases.lock_path("llama3")
    deadline = time.monotonic() + 10
    while any(lab.ssh(n, f"flock -n {lock} true", check=False).returncode for n in NAMES):
        assert time.monotonic() < deadline, "the lock outlived the run"
        time.sleep(0.2)
    run = lab.pyinfra("--data", "quantization=fp16", "--data", "max_num_seqs=30")
    assert run.returncode == 0, run.output[-3000:]
    assert_records_match_the_servers(lab, "30")


# -- behind the load balancer (gpufleet cloud): the emulator's firewall and HAProxy --------------

VPC = "10.218.100.0/24"  # the lab's private network: the controller is .1, the load balancer .201
METRICS_FROM = ("--data", f'metrics_from=["{VPC}"]')
LB_SPEC = ("--data", 'ssh_from=["10.218.0.1/32"]', "--data", "lb_check_interval=3",
           "--data", "lb_healthy_threshold=2", "--data", "lb_unhealthy_threshold=2",
           *METRICS_FROM)


class SteadyLoad:
    """``workers`` clients sending short completions through ``url`` back to back until
    stopped: every answer that is not a 200 with a completion counts as a failure."""

    def __init__(self, url: str, key: str, workers: int = 4) -> None:
        self.url, self.key, self.workers = url, key, workers
        self.ok, self.failures = 0, []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def _one(self) -> None:
        body = json.dumps({"model": "llama3-8b", "prompt": "hi", "max_tokens": 8}).encode()
        req = urllib.request.Request(f"{self.url}/completions", data=body, headers={
            "Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200 and json.load(r)["choices"][0]["text"] is not None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._one()
            except Exception as e:  # noqa: BLE001 - every failure is counted, with its reason
                with self._lock:
                    self.failures.append(f"{time.strftime('%H:%M:%S')} {e!r}")
            else:
                with self._lock:
                    self.ok += 1

    def __enter__(self) -> SteadyLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)


def refused(url: str, key: str | None = None, data: bytes | None = None) -> int:
    """The HTTP status a request gets (0: the connection itself was refused or dropped)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    req = urllib.request.Request(url, data=data, headers={**headers,
                                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def status_from(source: str, host: str, port: int, path: str) -> int:
    """The status of a GET sent from the controller's address ``source`` (0: dropped)."""
    conn = http.client.HTTPConnection(host, port, timeout=3, source_address=(source, 0))
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


def remove_cloud_resources(lab: Lab) -> None:
    from gpufleet.clients.digitalocean import DigitalOceanClient

    client = DigitalOceanClient(lab.env["DIGITALOCEAN_TOKEN"], lab.env["DIGITALOCEAN_API_URL"])
    for fw in client.list_firewalls():
        client.delete_firewall(fw["id"])
    for lb in client.list_load_balancers():
        client.delete_load_balancer(lb["id"])


def test_a_rollout_behind_the_load_balancer_loses_no_request(rollout_lab, on_r2, r1):
    """gpufleet cloud makes the load balancer and the firewall (a --dry first, a second run that
    changes nothing); only the load balancer reaches the hosts' API port; a rollout of the four
    hosts (canary, then two, then one) under a steady client load through the load balancer fails
    no request."""
    lab = rollout_lab
    key = secrets.api_key("llama3", lab.env).reveal()
    try:
        dry = gpufleet(lab, "cloud", "deploys/llama3.yaml", *LB_SPEC, "--dry")
        assert dry.returncode == 0, dry.output
        assert "+ load balancer gpufleet-llama3: create" in dry.output
        assert "+ firewall gpufleet-llama3: create" in dry.output
        assert "dry run: nothing changed" in dry.output
        assert key not in dry.output and lab.env["DIGITALOCEAN_TOKEN"] not in dry.output
        made = gpufleet(lab, "cloud", "deploys/llama3.yaml", *LB_SPEC)
        assert made.returncode == 0, made.output
        url = made.output.split("clients use: ", 1)[1].split()[0]
        again = gpufleet(lab, "cloud", "deploys/llama3.yaml", *LB_SPEC)
        assert again.returncode == 0 and "nothing to change" in again.output, again.output
        assert f"clients use: {url}" in again.output
        lb_ip = url.split("//", 1)[1].split("/", 1)[0]
        wait_lb_serving(lab, lb_ip, key)

        # every route: only /v1/* with the key, through the load balancer; not the host directly
        assert refused(f"{url}/completions", key, b'{"model":"llama3-8b","prompt":"x"}') == 200
        for path, k in (("/v1/models", None), ("/v1/models", "wrong-key")):
            assert refused(f"http://{lb_ip}{path}", k) == 401, path
        for path in ("/invocations", "/tokenize", "/metrics", "/version"):
            assert refused(f"http://{lb_ip}{path}", key, b"{}") in (403, 404), path
        first = lab.host(NAMES[0]).public_ip
        assert refused(f"http://{first}:8000/v1/models", key) == 0  # the firewall drops it

        with SteadyLoad(url, key) as load:
            run = rollout(lab, "--batch", "2", "--drain", "1", *METRICS_FROM)
            time.sleep(1)
        assert run.returncode == 0, run.output
        assert load.failures == [], (len(load.failures), load.ok, load.failures[:10],
                                     run.output[-3000:])
        # /metrics: from the VPC on metrics_port; not through the load balancer, whose address
        # is in the VPC too (it reaches port only); not from outside the VPC
        private, public = lab.host(NAMES[0]).private_ip, lab.host(NAMES[0]).public_ip
        assert status_from("10.218.100.1", private, 8002, "/metrics") == 200
        assert status_from("10.218.100.1", private, 8002, "/v1/models") == 404
        assert status_from("10.218.0.1", public, 8002, "/metrics") == 0
        assert refused(f"http://{lb_ip}/metrics") == 403
        assert "out of the load balancer: llama3-gpu-04" in run.output
        assert all(c == r1 for c in currents(lab).values())
        assert load.ok > 50, load.ok
        print(f"\nrollout of 4 hosts behind the load balancer: {load.ok} requests, "
              f"0 failed, in {run.seconds:.0f}s")
    finally:
        remove_cloud_resources(lab)


def wait_lb_serving(lab: Lab, lb_ip: str, key: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while refused(f"http://{lb_ip}/v1/models", key) != 200:
        assert time.monotonic() < deadline, "the load balancer never served"
        time.sleep(0.5)
