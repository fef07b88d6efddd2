"""The docker restart host script: a daemon.json docker refuses is replaced by the previous one,
docker comes back, the units that need docker are started again, and one line says why."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "src/gpufleet/hostscripts/docker_restart.py"
spec = importlib.util.spec_from_file_location("docker_restart", SCRIPT)
docker_restart = importlib.util.module_from_spec(spec)
spec.loader.exec_module(docker_restart)  # type: ignore[union-attr]

REFUSAL = ("unable to configure the Docker daemon with file {path}: the following directives "
           "are specified both as a flag and in the configuration file: default-runtime: "
           "(from flag: runc, from file: nvidia)")


class FakeSystemd:
    """docker.service started with --default-runtime=runc: it refuses a daemon.json that sets
    default-runtime, like dockerd 20.10 does; gpufleet-llama3 needs docker."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.active = {"docker.service": True, "gpufleet-llama3.service": True}
        self.journal: list[str] = []
        self.calls: list[list[str]] = []

    def accepts(self) -> bool:
        if not self.config.exists():
            return True
        return "default-runtime" not in json.loads(self.config.read_text())

    def __call__(self, argv):
        argv = list(argv)
        self.calls.append(argv)
        out, rc = "", 0
        if argv[:2] == ["systemctl", "is-active"]:
            out = "active\n" if self.active.get(argv[2]) else "failed\n"
        elif argv[:2] == ["systemctl", "show"]:
            out = "gpufleet-llama3.service\n\n"
        elif argv[:2] == ["systemctl", "restart"]:
            self.active["gpufleet-llama3.service"] = False  # Requires= stops it
            self.active["docker.service"] = self.accepts()
            if not self.accepts():
                self.journal.append(REFUSAL.format(path=self.config))
                rc = 1
        elif argv[:2] == ["systemctl", "start"]:
            self.active[argv[-1]] = self.active["docker.service"]
        elif argv[0] == "journalctl":
            out = "\n".join(["Starting docker.service", *self.journal,
                             "docker.service: Failed with result 'exit-code'."])
        return subprocess.CompletedProcess(argv, rc, out, "")


@pytest.fixture
def etc(tmp_path):
    config = tmp_path / "daemon.json"
    config.write_text(json.dumps({"log-driver": "json-file", "default-runtime": "nvidia"}))
    return config


def run(config: Path, fake: FakeSystemd) -> int:
    return docker_restart.main(["--config", str(config), "--wait", "1"], runner=fake,
                               sleep=lambda s: None)


def test_refused_file_is_replaced_by_the_previous_and_docker_comes_back(etc, capsys):
    previous = '{"log-driver": "json-file"}\n'
    Path(f"{etc}.gpufleet-previous").write_text(previous)
    fake = FakeSystemd(etc)
    assert run(etc, fake) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"docker did not start with the new {etc}" in err
    assert REFUSAL.format(path=etc) in err  # docker's own journal line
    assert f"restored the previous {etc}" in err and "docker is running again" in err
    assert "re-run" in err
    assert etc.read_text() == previous
    assert "default-runtime" in Path(f"{etc}.gpufleet-rejected").read_text()
    assert fake.active == {"docker.service": True, "gpufleet-llama3.service": True}
    assert ["systemctl", "reset-failed", "docker.service"] in fake.calls  # start limit


def test_no_file_before_means_the_new_one_is_removed(etc, capsys):
    Path(f"{etc}.gpufleet-previous.absent").write_text("")
    fake = FakeSystemd(etc)
    assert run(etc, fake) == 1
    assert not etc.exists() and Path(f"{etc}.gpufleet-rejected").exists()
    assert "there was none before" in capsys.readouterr().err
    assert fake.active["docker.service"] is True


def test_accepted_file_restarts_docker_and_its_units(etc, capsys):
    etc.write_text('{"log-driver": "json-file"}')
    fake = FakeSystemd(etc)
    assert run(etc, fake) == 0
    assert fake.active == {"docker.service": True, "gpufleet-llama3.service": True}
    assert not Path(f"{etc}.gpufleet-rejected").exists()
    assert capsys.readouterr().err == ""


def test_nothing_to_restore_leaves_the_file_and_says_docker_is_down(etc, capsys):
    fake = FakeSystemd(etc)
    assert run(etc, fake) == 1
    err = capsys.readouterr().err
    assert "found no previous copy" in err and "docker is still NOT running" in err
    assert "default-runtime" in etc.read_text()  # not clobbered
