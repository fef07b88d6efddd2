"""Tests of the stand-in NVIDIA container toolkit packages and their signed apt repository.

apt runs with a private configuration (its own sources list, lists, cache and state
directories; only the machine's dpkg status is read), so the machine's apt setup is never
touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet_lab.aptrepo import (
    DEFAULT_VERSIONS,
    KEY_UID,
    RepoInfo,
    build_toolkit_repo,
    make_static_server,
)

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("dpkg-deb", "apt-ftparchive", "gpg", "gpgv",
                                          "apt-get")),
    reason="needs dpkg-deb, apt-ftparchive (apt-utils), gpg, gpgv and apt-get")

V_OLD, V_NEW = DEFAULT_VERSIONS


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> RepoInfo:
    return build_toolkit_repo(tmp_path_factory.mktemp("apt") / "repo")


@pytest.fixture(scope="module")
def base_url(repo: RepoInfo) -> Iterator[str]:
    server = make_static_server("127.0.0.1", 0, repo.root)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def gpg(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """gpg with a throwaway home (never ~/.gnupg of the machine)."""
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    return ["gpg", "--homedir", str(home), "--batch"]


def deb(repo: RepoInfo, package: str, version: str = V_OLD) -> Path:
    return repo.repo_dir / f"{package}_{version}_amd64.deb"


def field(path: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(path), name], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture(scope="module")
def extracted(repo: RepoInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("x")
    for package in ("nvidia-container-toolkit-base", "nvidia-container-toolkit",
                    "libnvidia-container-tools", "libnvidia-container1"):
        subprocess.run(["dpkg-deb", "-x", str(deb(repo, package)), str(root)], check=True)
    return root


# --------------------------------------------------------------------------- layout

def test_layout_like_nvidias_flat_repository(repo: RepoInfo) -> None:
    assert repo.repo_dir == repo.root / "libnvidia-container/stable/deb/amd64"
    for name in ("Packages", "Packages.gz", "Release", "Release.gpg", "InRelease"):
        assert (repo.repo_dir / name).is_file(), name
    assert len(repo.debs) == 8 and all(d.is_file() for d in repo.debs)
    key = (repo.root / "libnvidia-container/gpgkey").read_text()
    assert key.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    # the private key never lives in the served tree
    assert not any(p.name.endswith((".key", ".kbx", ".gpg~")) or "gnupg" in p.name
                   for p in repo.root.rglob("*"))
    assert "Filename: ./nvidia-container-toolkit_1.17.8-1_amd64.deb" in (
        repo.repo_dir / "Packages").read_text()


def test_release_is_signed_by_the_published_key(repo: RepoInfo, tmp_path: Path,
                                                gpg: list[str]) -> None:
    keyring = tmp_path / "keyring.gpg"
    subprocess.run([*gpg, "--dearmor", "-o", str(keyring), str(repo.key_file)], check=True)
    for args in (["Release.gpg", "Release"], ["InRelease"]):
        proc = subprocess.run(["gpgv", "--keyring", str(keyring), *args], cwd=repo.repo_dir,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "Good signature" in proc.stderr and KEY_UID in proc.stderr
    assert repo.fingerprint.replace(" ", "") in subprocess.run(
        [*gpg, "--show-keys", "--with-colons", str(repo.key_file)], capture_output=True,
        text=True).stdout


def test_rebuild_is_cached_and_keeps_the_key(repo: RepoInfo) -> None:
    release = (repo.repo_dir / "Release").read_bytes()
    again = build_toolkit_repo(repo.root)
    assert again == repo and (repo.repo_dir / "Release").read_bytes() == release


# --------------------------------------------------------------------------- packages

@pytest.mark.parametrize("version", DEFAULT_VERSIONS)
def test_control_fields(repo: RepoInfo, version: str) -> None:
    toolkit = deb(repo, "nvidia-container-toolkit", version)
    assert field(toolkit, "Package") == "nvidia-container-toolkit"
    assert field(toolkit, "Version") == version
    assert field(toolkit, "Architecture") == "amd64"
    assert field(toolkit, "Depends") == (
        f"nvidia-container-toolkit-base (= {version}), libnvidia-container-tools (>= {version}),"
        " libnvidia-container-tools (<< 2.0.0)")
    tools = deb(repo, "libnvidia-container-tools", version)
    assert field(tools, "Depends").startswith(f"libnvidia-container1 (>= {version})")
    lib = deb(repo, "libnvidia-container1", version)
    assert field(lib, "Multi-Arch") == "same" and field(lib, "Section") == "libs"
    for package in ("nvidia-container-toolkit", "nvidia-container-toolkit-base",
                    "libnvidia-container-tools", "libnvidia-container1"):
        desc = field(deb(repo, package, version), "Description")
        assert "gpufleet lab stand-in" in desc and "not NVIDIA software" in desc


def test_package_contents(repo: RepoInfo) -> None:
    def listing(package: str) -> str:
        return subprocess.run(["dpkg-deb", "-c", str(deb(repo, package))], capture_output=True,
                              text=True, check=True).stdout

    base = listing("nvidia-container-toolkit-base")
    for path in ("./usr/bin/nvidia-ctk", "./usr/bin/nvidia-container-runtime",
                 "./etc/nvidia-container-runtime/config.toml"):
        assert path in base
    assert "-rwxr-xr-x root/root" in base
    assert "./usr/bin/nvidia-container-runtime-hook" in listing("nvidia-container-toolkit")
    assert "./usr/bin/nvidia-container-cli" in listing("libnvidia-container-tools")
    conffiles = subprocess.run(["dpkg-deb", "-I", str(deb(repo, "nvidia-container-toolkit-base")),
                                "conffiles"], capture_output=True, text=True).stdout
    assert "/etc/nvidia-container-runtime/config.toml" in conffiles


# --------------------------------------------------------------------------- apt

@pytest.fixture(scope="module")
def apt(repo: RepoInfo, base_url: str, tmp_path_factory: pytest.TempPathFactory,
        gpg: list[str]) -> list[str]:
    d = tmp_path_factory.mktemp("aptcfg")
    keyring = d / "nvidia-container-toolkit-keyring.gpg"
    key = urllib.request.urlopen(RepoInfo.key_url(base_url), timeout=10).read()
    subprocess.run([*gpg, "--dearmor", "-o", str(keyring)], input=key, check=True)
    sources = d / "sources.list"
    sources.write_text(RepoInfo.source_line(base_url, keyring=str(keyring)) + "\n")
    for sub in ("lists/partial", "cache/archives/partial", "state", "parts", "prefs", "log"):
        (d / sub).mkdir(parents=True)
    opts = [
        "-o", f"Dir::Etc::SourceList={sources}", "-o", f"Dir::Etc::SourceParts={d / 'parts'}",
        "-o", f"Dir::Etc::PreferencesParts={d / 'prefs'}",
        "-o", f"Dir::State={d / 'state'}", "-o", f"Dir::State::Lists={d / 'lists'}",
        "-o", "Dir::State::status=/var/lib/dpkg/status", "-o", f"Dir::Cache={d / 'cache'}",
        "-o", f"Dir::Log={d / 'log'}",
        "-o", "APT::Architecture=amd64", "-o", "APT::Sandbox::User=root",
        "-o", "Debug::NoLocking=1", "-o", "Acquire::Languages=none",
    ]
    proc = subprocess.run(["apt-get", *opts, "update"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "NO_PUBKEY" not in proc.stderr and "not signed" not in proc.stderr
    assert not proc.stderr.strip().startswith(("W:", "E:")), proc.stderr
    return opts


def test_apt_update_accepts_the_signed_repo(apt: list[str], base_url: str) -> None:
    proc = subprocess.run(["apt-cache", *apt, "policy", "nvidia-container-toolkit"],
                          capture_output=True, text=True, check=True)
    out = proc.stdout
    assert "Candidate: 1.18.0-1" in out
    assert f"500 {base_url}/libnvidia-container/stable/deb/amd64  Packages" in out
    assert " 1.17.8-1 500" in out


def simulate(apt: list[str], *packages: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["apt-get", *apt, "install", "-s", "-y", *packages],
                          capture_output=True, text=True, timeout=60)


def test_pinning_all_four_packages_resolves_one_version(apt: list[str]) -> None:
    proc = simulate(apt, *(f"{p}={V_OLD}" for p in (
        "nvidia-container-toolkit", "nvidia-container-toolkit-base",
        "libnvidia-container-tools", "libnvidia-container1")))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    inst = [ln for ln in proc.stdout.splitlines() if ln.startswith("Inst ")]
    assert len(inst) == 4 and all(f"({V_OLD} " in ln for ln in inst), inst


def test_pinning_only_the_toolkit_fails_like_nvidias_repo(apt: list[str]) -> None:
    # nvidia-container-toolkit Depends nvidia-container-toolkit-base (= V): apt does not
    # pick the older base on its own -> the well-known "held broken packages" error
    proc = simulate(apt, f"nvidia-container-toolkit={V_OLD}")
    assert proc.returncode != 0
    assert (f"Depends: nvidia-container-toolkit-base (= {V_OLD}) but {V_NEW} is to be "
            "installed") in proc.stdout


def test_unpinned_install_takes_the_newest(apt: list[str]) -> None:
    proc = simulate(apt, "nvidia-container-toolkit")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Inst nvidia-container-toolkit ({V_NEW} " in proc.stdout


def test_download_only_fetches_debs_over_http(apt: list[str]) -> None:
    cache = Path(next(o.split("=", 1)[1] for o in apt if o.startswith("Dir::Cache=")))
    proc = subprocess.run(["apt-get", *apt, "install", "--download-only", "-y",
                           *(f"{p}={V_OLD}" for p in ("nvidia-container-toolkit",
                                                      "nvidia-container-toolkit-base",
                                                      "libnvidia-container-tools",
                                                      "libnvidia-container1"))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = sorted(p.name for p in (cache / "archives").glob("*.deb"))
    assert len(got) == 4 and all(V_OLD in n for n in got), got


def test_static_server_hides_dotfiles_and_listings(base_url: str) -> None:
    for path in ("/libnvidia-container/stable/deb/amd64/.gpufleet-inputs",
                 "/libnvidia-container/stable/deb/amd64/", "/../repo-gnupg/pubring.kbx"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base_url + path, timeout=10)
        assert err.value.code == 404


# --------------------------------------------------------------------------- stand-in tools

def run_tool(root: Path, tool: str, *args: str, stdin: str | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    path = root / "usr/bin" / tool
    cmd = [sys.executable, str(path)] if path.read_text().startswith("#!/usr/bin/python3") \
        else ["sh", str(path)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, input=stdin,
                          env={**os.environ, **(env or {})}, timeout=30)


def test_nvidia_ctk_version(extracted: Path) -> None:
    proc = run_tool(extracted, "nvidia-ctk", "--version")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[0] == "NVIDIA Container Toolkit CLI version 1.17.8"
    assert lines[1].startswith("commit: ") and len(lines[1]) == len("commit: ") + 40


def test_nvidia_ctk_runtime_configure_merges_like_the_real_one(extracted: Path,
                                                               tmp_path: Path) -> None:
    cfg = tmp_path / "daemon.json"
    cfg.write_text(json.dumps({
        "log-driver": "json-file", "log-opts": {"max-size": "10m", "max-file": "3"},
        "registry-mirrors": ["http://10.213.0.1:8702"],
        "insecure-registries": ["10.213.0.1:8702"]}))
    proc = run_tool(extracted, "nvidia-ctk", "runtime", "configure", "--runtime=docker",
                    "--set-as-default", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert f'msg="Wrote updated config to {cfg}"' in proc.stderr
    text = cfg.read_text()
    assert text == (
        '{\n'
        '    "default-runtime": "nvidia",\n'
        '    "insecure-registries": [\n        "10.213.0.1:8702"\n    ],\n'
        '    "log-driver": "json-file",\n'
        '    "log-opts": {\n        "max-file": "3",\n        "max-size": "10m"\n    },\n'
        '    "registry-mirrors": [\n        "http://10.213.0.1:8702"\n    ],\n'
        '    "runtimes": {\n'
        '        "nvidia": {\n            "args": [],\n'
        '            "path": "nvidia-container-runtime"\n        }\n    }\n'
        '}')
    # idempotent
    assert run_tool(extracted, "nvidia-ctk", "runtime", "configure", "--runtime=docker",
                    "--set-as-default", f"--config={cfg}").returncode == 0
    assert cfg.read_text() == text


def test_nvidia_ctk_keeps_other_runtimes_and_default(extracted: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "daemon.json"
    cfg.write_text('{"runtimes": {"crun": {"path": "/usr/bin/crun"}}, "default-runtime": "runc"}')
    assert run_tool(extracted, "nvidia-ctk", "runtime", "configure",
                    f"--config={cfg}").returncode == 0
    data = json.loads(cfg.read_text())
    assert data["default-runtime"] == "runc"
    assert set(data["runtimes"]) == {"crun", "nvidia"}


def test_nvidia_ctk_creates_missing_file_and_rejects_empty_one(extracted: Path,
                                                               tmp_path: Path) -> None:
    cfg = tmp_path / "etc/docker/daemon.json"
    proc = run_tool(extracted, "nvidia-ctk", "runtime", "configure", f"--config={cfg}")
    assert proc.returncode == 0 and "Config file does not exist, creating new one" in proc.stderr
    assert json.loads(cfg.read_text()) == {
        "runtimes": {"nvidia": {"args": [], "path": "nvidia-container-runtime"}}}
    cfg.write_text("")
    proc = run_tool(extracted, "nvidia-ctk", "runtime", "configure", f"--config={cfg}")
    assert proc.returncode == 1
    assert "unable to load config for runtime docker: EOF" in proc.stderr


def test_nvidia_ctk_dry_run_and_bad_flags(extracted: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "daemon.json"
    cfg.write_text("{}")
    proc = run_tool(extracted, "nvidia-ctk", "runtime", "configure", "--dry-run",
                    f"--config={cfg}")
    assert proc.returncode == 0 and '"nvidia"' in proc.stdout and cfg.read_text() == "{}"
    proc = run_tool(extracted, "nvidia-ctk", "runtime", "configure", "--set-as-defualt")
    assert proc.returncode == 1
    assert "flag provided but not defined: -set-as-defualt" in proc.stderr


def test_runtime_and_hook_stand_ins(extracted: Path) -> None:
    runtime = (extracted / "usr/bin/nvidia-container-runtime").read_text()
    assert 'exec runc "$@"' in runtime
    proc = run_tool(extracted, "nvidia-container-runtime-hook", "prestart",
                    stdin='{"ociVersion": "1.0.2", "id": "x", "bundle": "/tmp/b"}')
    assert proc.returncode == 0 and proc.stdout == ""


def test_nvidia_container_cli(extracted: Path, tmp_path: Path) -> None:
    proc = run_tool(extracted, "nvidia-container-cli", "--version")
    assert proc.returncode == 0 and proc.stdout.startswith("cli-version: 1.17.8\n")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    proc = run_tool(extracted, "nvidia-container-cli", "info", env={"PATH": str(empty)})
    assert proc.returncode == 1
    assert "nvidia-container-cli: initialization error: nvml error: driver not loaded" in (
        proc.stderr)
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text('#!/bin/sh\nif [ -n "$1" ]; then echo "580.159.04, NVIDIA H100 80GB HBM3, '
                   'GPU-8dd6ea90, 00000000:00:06.0, 9.0"; else echo "| NVIDIA-SMI 580.159.04  '
                   '  Driver Version: 580.159.04     CUDA Version: 13.0     |"; fi\n')
    smi.chmod(0o755)
    proc = run_tool(extracted, "nvidia-container-cli", "info",
                    env={"PATH": f"{fake}:{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr
    assert "NVRM version:   580.159.04" in proc.stdout and "CUDA version:   13.0" in proc.stdout
    assert "Model:          NVIDIA H100 80GB HBM3" in proc.stdout
