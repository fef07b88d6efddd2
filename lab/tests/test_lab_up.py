"""``gpufleet-lab up``: missing tools refused before anything is made; a failing step takes the
lab down again and is reported in one line naming the step, without a traceback."""

from __future__ import annotations

import pytest

from gpufleet_lab import cli, hosts, manager

PREFIX, SUBNET = "tu", "10.229.0"


@pytest.fixture
def steps(monkeypatch, tmp_path):
    """Every step of ``up`` replaced by a recorder; ``fail`` names the one that raises."""
    calls: list[str] = []
    fail: dict[str, BaseException] = {}

    def step(name, result=None):
        def fn(*args, **kwargs):
            calls.append(name)
            if name in fail:
                raise fail[name]
            return result
        return fn

    class Repo:
        root = tmp_path / "repo"

    monkeypatch.setattr(manager, "check_tools", step("check_tools"))
    monkeypatch.setattr(manager.aptrepo, "build_toolkit_repo", step("aptrepo", Repo()))
    monkeypatch.setattr(manager, "build_image", step("image"))
    monkeypatch.setattr(manager.hosts, "boot", step("boot"))
    monkeypatch.setattr(manager, "_start_services", step("services", {
        "do_api": "http://x", "apt": "http://x", "hub": "http://x"}))
    monkeypatch.setattr(manager, "down", step("down"))
    monkeypatch.setattr(manager, "_is_up", lambda cfg: False)
    monkeypatch.setattr(manager.hosts, "load_hosts", lambda cfg: [])
    cfg = hosts.LabConfig(prefix=PREFIX, subnet=SUBNET, state_root=tmp_path / "state",
                          cache_dir=tmp_path / "cache")
    monkeypatch.setattr(manager.hosts, "LabConfig", lambda prefix, subnet: cfg)
    return calls, fail, cfg


def lab_up(*extra: str) -> int:
    return cli.main(["--prefix", PREFIX, "--subnet", SUBNET, "up", "--profile", "h100",
                     *extra])


def test_a_failing_step_takes_the_lab_down_and_names_the_step(steps, capsys):
    calls, fail, _ = steps
    fail["boot"] = hosts.LabError("tu h1: no SSH after 180s\nconsole: ...")
    assert lab_up() == 1
    assert calls == ["check_tools", "aptrepo", "image", "boot", "down"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "lab up failed at step 'boot the hosts': tu h1: no SSH after 180s console: ..." in err
    assert "taken down again" in err


def test_an_unexpected_error_in_a_later_step_is_one_line_too(steps, capsys):
    calls, fail, _ = steps
    fail["services"] = OSError(98, "Address already in use")
    assert lab_up() == 1
    assert calls[-2:] == ["services", "down"]
    err = capsys.readouterr().err
    assert "step 'start the lab services'" in err and "Address already in use" in err
    assert "Traceback" not in err


def test_down_failing_too_says_what_to_run(steps, capsys):
    _, fail, _ = steps
    fail["image"] = RuntimeError("no bookworm 'deb' source found")
    fail["down"] = hosts.LabError("umount busy")
    assert lab_up() == 1
    err = capsys.readouterr().err
    assert "step 'build the vLLM image (real)'" in err and "umount busy" in err
    assert f"gpufleet-lab --prefix {PREFIX} --subnet {SUBNET} down" in err


def test_success_is_unchanged(steps, capsys):
    calls, _, cfg = steps
    assert lab_up() == 0
    assert "down" not in calls
    assert "export DIGITALOCEAN_API_URL=http://x" in capsys.readouterr().out
    assert (cfg.state_dir / "lab.env").stat().st_mode & 0o777 == 0o600


def test_missing_tool_is_refused_first_naming_the_package():
    with pytest.raises(manager.LabUpError) as e:
        manager.check_tools(which=lambda cmd: None if cmd == "apt-ftparchive" else "/bin/x",
                            exists=lambda path: True)
    assert str(e.value) == "apt-ftparchive is missing: apt-get install apt-utils"
    with pytest.raises(manager.LabUpError) as e:
        manager.check_tools(which=lambda cmd: None if cmd in ("gpg", "lxcfs") else "/bin/x",
                            exists=lambda path: False)
    assert str(e.value) == ("gpg, lxcfs, /usr/share/keyrings/debian-archive-keyring.gpg are "
                            "missing: apt-get install debian-archive-keyring gnupg lxcfs")
    manager.check_tools(which=lambda cmd: "/bin/x", exists=lambda path: True)


@pytest.mark.parametrize("tool,package", [
    ("apt-ftparchive", "apt-utils"), ("mmdebstrap", "mmdebstrap"),
    ("systemd-nspawn", "systemd-container"), ("iptables", "iptables"), ("lxcfs", "lxcfs"),
    ("gpg", "gnupg"), ("ssh", "openssh-client"), ("dpkg-deb", "dpkg"), ("curl", "curl"),
])
def test_every_tool_lab_up_runs_is_checked(tool, package):
    assert manager.REQUIRED_TOOLS[tool] == package


def test_missing_tool_stops_before_anything_is_made(monkeypatch, tmp_path, capsys):
    made: list[str] = []
    monkeypatch.setattr(manager.shutil, "which",
                        lambda cmd: None if cmd == "mmdebstrap" else "/bin/x")
    monkeypatch.setattr(manager.aptrepo, "build_toolkit_repo", lambda *a, **k: made.append("x"))
    monkeypatch.setattr(manager, "down", lambda cfg: made.append("down"))
    cfg = hosts.LabConfig(prefix=PREFIX, subnet=SUBNET, state_root=tmp_path / "state",
                          cache_dir=tmp_path / "cache")
    monkeypatch.setattr(manager.hosts, "LabConfig", lambda prefix, subnet: cfg)
    assert lab_up() == 1
    assert made == [] and not cfg.state_dir.exists()
    err = capsys.readouterr().err
    assert err == "gpufleet-lab up: mmdebstrap is missing: apt-get install mmdebstrap\n"


def test_a_lab_half_up_is_refused_and_left_running(monkeypatch, steps, capsys):
    calls, _, _ = steps
    monkeypatch.setattr(manager, "_is_up", lambda cfg: True)
    assert lab_up() == 1
    assert calls == ["check_tools"]  # nothing made, nothing taken down
    assert "is half up: take it down first" in capsys.readouterr().err


def test_a_lab_already_up_is_kept_and_its_environment_printed(monkeypatch, steps, capsys):
    calls, _, cfg = steps
    monkeypatch.setattr(manager, "_is_up", lambda cfg: True)
    cfg.state_dir.mkdir(parents=True)
    manager.env_file(cfg).write_text("HF_ENDPOINT=http://10.229.0.1:8703\n"
                                     "GPUFLEET_TOOLKIT_REPO_URL='http://x/$(ARCH)'\n")
    assert lab_up() == 0
    assert calls == ["check_tools"]
    out, err = capsys.readouterr()
    assert "already up: kept as it is" in err
    assert "HF_ENDPOINT=http://10.229.0.1:8703" in out and "$(ARCH)" in out
