"""STAND-IN NVIDIA container toolkit packages in a real, signed apt repository (gpufleet lab).

NVIDIA's apt repository (``https://nvidia.github.io/libnvidia-container``) cannot be reached
from the lab, and Debian does not package the toolkit. This module builds, with dpkg-deb,
the four packages a GPU host installs, under NVIDIA's names, versions and inter-package
dependencies, but with stand-in contents:

* ``nvidia-container-toolkit-base``: ``/usr/bin/nvidia-ctk`` (``--version``; ``runtime
  configure --runtime=docker [--set-as-default] [--config PATH] [--dry-run]`` merges the
  ``nvidia`` runtime into daemon.json exactly like the real one: Go's MarshalIndent, 4-space
  indent, sorted keys, no trailing newline), ``/usr/bin/nvidia-container-runtime``
  (``exec runc "$@"``), ``/usr/bin/nvidia-cdi-hook`` and
  ``/etc/nvidia-container-runtime/config.toml``;
* ``nvidia-container-toolkit``: ``/usr/bin/nvidia-container-runtime-hook`` (an OCI prestart
  hook that reads the container state and does nothing; dockerd 20.10 registers its ``gpu``
  device driver when the hook is in PATH, so ``docker run --gpus all`` works);
* ``libnvidia-container-tools``: ``/usr/bin/nvidia-container-cli`` (``--version``; ``info``
  reads the lab's stand-in ``nvidia-smi`` and fails like the real one when there is no driver);
* ``libnvidia-container1``: a placeholder file.

The repository is laid out like NVIDIA's flat repository and signed with a lab key
(generated once, ed25519, in a private GNUPGHOME next to the repository root)::

    <root>/libnvidia-container/gpgkey                         ASCII-armored public key
    <root>/libnvidia-container/stable/deb/amd64/*.deb
    <root>/libnvidia-container/stable/deb/amd64/{Packages,Packages.gz,Release,Release.gpg,InRelease}

A lab host uses it exactly like NVIDIA's (``$(ARCH)`` is expanded by apt itself)::

    curl -fsSL http://<bridge>:8701/libnvidia-container/gpgkey \\
      | gpg --dearmor -o /usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
    echo "deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg] \\
      http://<bridge>:8701/libnvidia-container/stable/deb/\\$(ARCH) /" \\
      > /etc/apt/sources.list.d/nvidia-container-toolkit.list

Dependencies are NVIDIA's real ones (not all exact pins): ``nvidia-container-toolkit``
Depends ``nvidia-container-toolkit-base (= V)``, ``libnvidia-container-tools (>= V)``,
``libnvidia-container-tools (<< 2.0.0)``; ``libnvidia-container-tools`` Depends
``libnvidia-container1 (>= V)``. So, as with NVIDIA's repository, installing only
``nvidia-container-toolkit=1.17.8-1`` while 1.18.0-1 exists pulls the *newer*
libnvidia-container-tools/libnvidia-container1; pin all four packages to get one version.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import posixpath
import shutil
import subprocess
import tempfile
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

from gpufleet_lab import hosts

DEFAULT_VERSIONS = ("1.17.8-1", "1.18.0-1")
ARCH = "amd64"
REPO_SUBDIR = "libnvidia-container/stable/deb"
KEY_SUBPATH = "libnvidia-container/gpgkey"
KEYRING = "/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg"
PACKAGE_NAMES = ("nvidia-container-toolkit", "nvidia-container-toolkit-base",
                 "libnvidia-container-tools", "libnvidia-container1")
KEY_UID = "gpufleet lab apt signing key (stand-in for NVIDIA) <lab@gpufleet.invalid>"
MAINTAINER = "gpufleet lab stand-in <lab@gpufleet.invalid>"
SOURCE_DATE_EPOCH = 1748563200  # 2025-05-30, fixed file times: reproducible .debs
RECIPE_REV = 1


@dataclass(frozen=True)
class RepoInfo:
    """Where the built repository lives and how hosts use it."""

    root: Path  # serve this directory (make_static_server) at http://<bridge>:8701/
    repo_dir: Path  # <root>/libnvidia-container/stable/deb/amd64
    key_file: Path  # <root>/libnvidia-container/gpgkey (ASCII armor)
    fingerprint: str
    versions: tuple[str, ...]
    debs: tuple[Path, ...]

    @staticmethod
    def key_url(base_url: str) -> str:
        """``http://10.213.0.1:8701`` -> ``http://10.213.0.1:8701/libnvidia-container/gpgkey``"""
        return f"{base_url.rstrip('/')}/{KEY_SUBPATH}"

    @staticmethod
    def repo_url(base_url: str) -> str:
        """The ``$(ARCH)`` URL of NVIDIA's list file (apt expands ``$(ARCH)``)."""
        return f"{base_url.rstrip('/')}/{REPO_SUBDIR}/$(ARCH)"

    @staticmethod
    def source_line(base_url: str, keyring: str = KEYRING) -> str:
        return f"deb [signed-by={keyring}] {RepoInfo.repo_url(base_url)} /"


# --------------------------------------------------------------------------- stand-in files

NVIDIA_CTK = r'''#!/usr/bin/python3
"""gpufleet lab STAND-IN for nvidia-ctk @VERSION@ (NVIDIA Container Toolkit CLI). Not NVIDIA
software: it implements `--version` and `runtime configure` for docker the way the real Go
code does (pkg/config/engine/docker), and no-ops for `config`."""
import json, os, sys, time

VERSION = "@VERSION@"
COMMIT = "@COMMIT@"
QUIET = False
DEBUG = False


def log(level, msg):
    if QUIET and level not in ("error", "fatal"):
        return
    if sys.stderr.isatty():
        sys.stderr.write("%s[0000] %s\n" % (level.upper()[:4], msg))
    else:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        stamp = stamp[:-2] + ":" + stamp[-2:]
        sys.stderr.write('time="%s" level=%s msg="%s"\n'
                         % (stamp, level, msg.replace("\\", "\\\\").replace('"', '\\"')))


def fail(msg, code=1):
    log("error", msg)
    sys.exit(code)


def go_json(obj):
    """encoding/json.MarshalIndent(obj, "", "    "): sorted keys, HTML-escaped, no newline."""
    out = json.dumps(obj, indent=4, sort_keys=True, ensure_ascii=False)
    for a, b in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                 ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        out = out.replace(a, b)
    return out


def parse_flags(args, spec):
    """urfave/cli-style flags: -f/--f, --f=v or --f v; bools take =true/=false."""
    vals, rest = {}, []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            rest += args[i + 1:]
            break
        if a.startswith("-") and len(a) > 1:
            name, eq, val = a.lstrip("-").partition("=")
            key = spec.get(name)
            if key is None:
                sys.stderr.write("Incorrect Usage: flag provided but not defined: -%s\n\n" % name)
                sys.exit(1)
            kind, dest = key
            if kind == "bool":
                vals[dest] = (val.lower() in ("1", "t", "true")) if eq else True
            elif eq:
                vals[dest] = val
            elif i + 1 < len(args):
                vals[dest] = args[i + 1]
                i += 1
            else:
                sys.stderr.write("Incorrect Usage: flag needs an argument: -%s\n\n" % name)
                sys.exit(1)
        else:
            rest.append(a)
        i += 1
    return vals, rest


CONFIGURE_FLAGS = {
    "dry-run": ("bool", "dry_run"), "runtime": ("str", "runtime"), "config": ("str", "config"),
    "drop-in-config": ("str", "drop_in"), "executable-path": ("str", "exe"),
    "config-mode": ("str", "mode"), "config-source": ("str", "source"),
    "oci-hook-path": ("str", "hook_file"), "nvidia-runtime-name": ("str", "name"),
    "nvidia-runtime-path": ("str", "path"), "runtime-path": ("str", "path"),
    "nvidia-runtime-hook-path": ("str", "hook_path"),
    "nvidia-set-as-default": ("bool", "default"), "set-as-default": ("bool", "default"),
    "cdi.enabled": ("bool", "cdi"), "cdi.enable": ("bool", "cdi"), "enable-cdi": ("bool", "cdi"),
    "help": ("bool", "help"), "h": ("bool", "help"),
}


def runtime_configure(args):
    v, rest = parse_flags(args, CONFIGURE_FLAGS)
    if v.get("help"):
        print("NAME:\n   nvidia-ctk runtime configure - Add a runtime to the specified "
              "container engine\n\nUSAGE:\n   nvidia-ctk runtime configure [options]")
        return 0
    runtime = v.get("runtime", "docker")
    if runtime not in ("containerd", "crio", "docker"):
        fail("unrecognized runtime '%s'" % runtime)
    if runtime != "docker":
        fail("gpufleet lab stand-in: only --runtime=docker is implemented")
    drop_in = v.get("drop_in", "RUNTIME_SPECIFIC_DEFAULT")
    if drop_in not in ("RUNTIME_SPECIFIC_DEFAULT", ""):
        fail("runtime docker does not support drop-in configs")
    path = v.get("config") or "/etc/docker/daemon.json"
    name = v.get("name", "nvidia")
    exe = v.get("path", "nvidia-container-runtime")
    log("info", "Loading docker config from %s" % path)
    if os.path.isdir(path):
        fail("unable to load config for runtime docker: config file is a directory")
    cfg = {}
    if not os.path.exists(path):
        log("info", "Config file does not exist, creating new one")
    else:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            fail("unable to load config for runtime docker: unable to read config: %s" % exc)
        if not data.strip():
            fail("unable to load config for runtime docker: EOF")
        try:
            cfg = json.loads(data)
        except ValueError as exc:
            fail("unable to load config for runtime docker: invalid character: %s" % exc)
        if not isinstance(cfg, dict):
            fail("unable to load config for runtime docker: json: cannot unmarshal %s into Go "
                 "value of type docker.Config" % type(cfg).__name__)
        log("info", "Successfully loaded config")
    runtimes = cfg.get("runtimes")
    if not isinstance(runtimes, dict):
        runtimes = {}
    runtimes[name] = {"args": [], "path": exe}
    cfg["runtimes"] = runtimes
    if v.get("default"):
        cfg["default-runtime"] = name
    if v.get("cdi"):
        features = cfg.get("features") if isinstance(cfg.get("features"), dict) else {}
        features["cdi"] = True
        cfg["features"] = features
    out = go_json(cfg)
    if v.get("dry_run"):
        sys.stdout.write(out + "\n")
        return 0
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, mode=0o755, exist_ok=True)
    with open(path, "w") as fh:
        fh.write(out)
    log("info", "Wrote updated config to %s" % path)
    log("info", "It is recommended that docker daemon be restarted.")
    return 0


USAGE = """NAME:
   NVIDIA Container Toolkit CLI - Tools to configure the NVIDIA Container Toolkit

USAGE:
   nvidia-ctk [global options] command [command options]

VERSION:
   %s
commit: %s

COMMANDS:
   hook     A collection of hooks that may be injected into an OCI spec
   runtime  A collection of runtime-related utilities for the NVIDIA Container Toolkit
   info     Provide information about the system
   cdi      Provide tools for interacting with Container Device Interface specifications
   system   A collection of system-related utilities for the NVIDIA Container Toolkit
   config   Interact with the NVIDIA Container Toolkit configuration
   help, h  Shows a list of commands or help for one command

GLOBAL OPTIONS:
   --debug, -d    Enable debug-level logging (default: false)
   --quiet        Suppress all output except for errors; overrides --debug (default: false)
   --help, -h     show help
   --version, -v  print the version

(gpufleet lab stand-in: only `runtime configure` and `config` do anything)
"""


def main(argv):
    global QUIET, DEBUG
    args = list(argv)
    while args and args[0].startswith("-"):
        a = args.pop(0)
        if a in ("--version", "-v"):
            print("NVIDIA Container Toolkit CLI version %s\ncommit: %s" % (VERSION, COMMIT))
            return 0
        if a in ("--help", "-h"):
            print(USAGE % (VERSION, COMMIT))
            return 0
        if a == "--quiet":
            QUIET = True
        elif a in ("--debug", "-d"):
            DEBUG = True
        else:
            sys.stderr.write("Incorrect Usage: flag provided but not defined: %s\n" % a)
            return 1
    if not args or args[0] in ("help", "h"):
        print(USAGE % (VERSION, COMMIT))
        return 0
    cmd, rest = args[0], args[1:]
    if cmd == "runtime":
        if rest and rest[0] == "configure":
            return runtime_configure(rest[1:])
        print("NAME:\n   nvidia-ctk runtime - A collection of runtime-related utilities for "
              "the NVIDIA Container Toolkit\n\nCOMMANDS:\n   configure  Add a runtime to the "
              "specified container engine")
        return 0
    if cmd == "config":
        return 0  # the real one regenerates /etc/nvidia-container-runtime/config.toml
    if cmd == "cdi":
        if rest and rest[0] == "list":
            log("info", "Found 0 CDI devices")
            return 0
        fail("failed to generate CDI spec: failed to create device CDI specs: failed to "
             "initialize NVML: ERROR_LIBRARY_NOT_FOUND (gpufleet lab stand-in)")
    if cmd in ("hook", "info", "system"):
        return 0
    sys.stderr.write("No help topic for '%s'\n" % cmd)
    return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
'''

NVIDIA_CONTAINER_CLI = r'''#!/usr/bin/python3
"""gpufleet lab STAND-IN for nvidia-container-cli @UPSTREAM@ (libnvidia-container). Not
NVIDIA software. `info` reads the lab's stand-in nvidia-smi; with no driver it fails like
the real one."""
import re, subprocess, sys

VERSION = "@UPSTREAM@"


def smi(*args):
    try:
        p = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout if p.returncode == 0 else None


def info():
    rows = smi("--query-gpu=driver_version,name,uuid,pci.bus_id,compute_cap",
               "--format=csv,noheader")
    header = smi()
    if rows is None or header is None:
        sys.stderr.write("nvidia-container-cli: initialization error: nvml error: "
                         "driver not loaded\n")
        return 1
    m = re.search(r"CUDA Version:\s*([0-9.]+)", header)
    lines = [r.split(", ") for r in rows.strip().splitlines() if r.strip()]
    out = ["NVRM version:   %s" % lines[0][0], "CUDA version:   %s" % (m.group(1) if m else "")]
    for i, (_, name, uuid, bus, cc) in enumerate(lines):
        out += ["", "Device Index:   %d" % i, "Device Minor:   %d" % i, "Model:          %s" % name,
                "Brand:          Nvidia", "GPU UUID:       %s" % uuid,
                "Bus Location:   %s" % bus, "Architecture:   %s" % cc]
    print("\n".join(out))
    return 0


def main(argv):
    args = [a for a in argv if a not in ("--load-kmods", "-k", "--no-pivot")]
    if not args or args[0] in ("--help", "-h", "-?"):
        print("Usage: nvidia-container-cli [OPTION...] COMMAND [ARG...]\n"
              "Command line utility for manipulating NVIDIA GPU containers.\n\n"
              "  Commands:\n    info        Report information about the driver and devices\n"
              "    list        List driver components\n    configure   Configure a container "
              "with GPU support\n\n(gpufleet lab stand-in)")
        return 0
    if args[0] in ("--version", "-V"):
        print("cli-version: %s\nlib-version: %s\nbuild date: 2025-05-30T13:47+00:00\n"
              "build revision: gpufleet-lab-standin\nbuild compiler: x86_64-linux-gnu-gcc-7 "
              "7.5.0\nbuild platform: x86_64\nbuild flags: -D_GNU_SOURCE -D_FORTIFY_SOURCE=2 "
              "-DNDEBUG -std=gnu11 -O2 -g" % (VERSION, VERSION))
        return 0
    if args[0] == "info":
        return info()
    if args[0] == "list":
        return 0 if smi("-L") is not None else info()
    if args[0] == "configure":
        return 0
    sys.stderr.write("nvidia-container-cli: unknown command: %s\n" % args[0])
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
'''

NVIDIA_CONTAINER_RUNTIME = """#!/bin/sh
# gpufleet lab STAND-IN for nvidia-container-runtime @UPSTREAM@: plain runc (no GPU injection).
if [ "$1" = "--version" ] || [ "$1" = "-v" ]; then
  echo "NVIDIA Container Runtime version @UPSTREAM@"
  echo "commit: @COMMIT@"
  echo "spec: 1.2.1"
  echo
  exec runc --version
fi
exec runc "$@"
"""

NVIDIA_CONTAINER_RUNTIME_HOOK = """#!/bin/sh
# gpufleet lab STAND-IN for the NVIDIA OCI prestart hook @UPSTREAM@: reads the container
# state from stdin and does nothing. dockerd registers its "gpu" device driver when this file
# is in PATH, so `docker run --gpus all` works.
case "$1" in
  --version|-version) echo "NVIDIA Container Runtime Hook version @UPSTREAM@"; exit 0 ;;
esac
cat >/dev/null
exit 0
"""

NVIDIA_CDI_HOOK = """#!/bin/sh
# gpufleet lab STAND-IN for nvidia-cdi-hook @UPSTREAM@: does nothing.
exit 0
"""

CONFIG_TOML = """# gpufleet lab STAND-IN config for the NVIDIA Container Runtime @UPSTREAM@
#accept-nvidia-visible-devices-as-volume-mounts = false
#accept-nvidia-visible-devices-envvar-when-unprivileged = true
disable-require = false
supported-driver-capabilities = "compat32,compute,display,graphics,ngx,utility,video"

[nvidia-container-cli]
environment = []
ldconfig = "@/sbin/ldconfig"
load-kmods = true

[nvidia-container-runtime]
log-level = "info"
mode = "auto"
runtimes = ["runc", "crun"]

[nvidia-container-runtime.modes.cdi]
annotation-prefixes = ["cdi.k8s.io/"]
default-kind = "nvidia.com/gpu"
spec-dirs = ["/etc/cdi", "/var/run/cdi"]

[nvidia-container-runtime.modes.csv]
mount-spec-path = "/etc/nvidia-container-runtime/host-files-for-container.d"

[nvidia-container-runtime-hook]
path = "nvidia-container-runtime-hook"
skip-mode-detection = false

[nvidia-ctk]
path = "nvidia-ctk"
"""

TOOLKIT_POSTINST = """#!/bin/sh
set -e
# as NVIDIA's: keep the legacy name nvidia-container-toolkit pointing at the hook
if [ "$1" = configure ] && [ -f /usr/bin/nvidia-container-runtime-hook ] \\
    && [ ! -e /usr/bin/nvidia-container-toolkit ]; then
  ln -s /usr/bin/nvidia-container-runtime-hook /usr/bin/nvidia-container-toolkit
fi
exit 0
"""

TOOLKIT_POSTRM = """#!/bin/sh
set -e
if [ "$1" = remove ] || [ "$1" = purge ]; then
  if [ -L /usr/bin/nvidia-container-toolkit ]; then rm -f /usr/bin/nvidia-container-toolkit; fi
fi
exit 0
"""

STANDIN_NOTE = ("gpufleet lab STAND-IN: not NVIDIA software. Built by lab/src/gpufleet_lab/aptrepo.py "
                "so that deploys can install the toolkit from a signed apt repository in the "
                "lab.")


def _upstream(version: str) -> str:
    return version.rsplit("-", 1)[0]


def _commit(version: str) -> str:
    return hashlib.sha1(f"gpufleet-lab-standin {version}".encode()).hexdigest()


def package_specs(version: str) -> list[dict[str, Any]]:
    """Control fields and files of the four packages for one version."""
    up = _upstream(version)

    def fill(text: str) -> str:
        return (text.replace("@VERSION@", up).replace("@UPSTREAM@", up)
                .replace("@COMMIT@", _commit(version)))

    def desc(synopsis: str, body: str) -> str:
        lines = [f"{synopsis} (gpufleet lab stand-in)"]
        for para in (body, STANDIN_NOTE):
            lines.append(" " + para)
            lines.append(" .")
        return "\n".join(lines[:-1])

    breaks = "nvidia-container-runtime (<= 3.5.0-1), nvidia-container-runtime-hook"
    return [
        {
            "control": {
                "Package": "nvidia-container-toolkit-base", "Source": "nvidia-container-toolkit",
                "Version": version, "Architecture": ARCH, "Maintainer": MAINTAINER,
                "Section": "utils", "Priority": "optional",
                "Breaks": breaks + ", nvidia-container-toolkit (<= 1.10.0-1)",
                "Replaces": breaks + ", nvidia-container-toolkit (<= 1.10.0-1)",
                "Homepage": "https://github.com/NVIDIA/nvidia-container-toolkit",
                "Description": desc("NVIDIA Container Toolkit Base",
                                    "Provides tools such as the NVIDIA Container Runtime and "
                                    "NVIDIA Container Toolkit CLI to enable GPU support in "
                                    "containers."),
            },
            "files": {
                "usr/bin/nvidia-ctk": (fill(NVIDIA_CTK), 0o755),
                "usr/bin/nvidia-container-runtime": (fill(NVIDIA_CONTAINER_RUNTIME), 0o755),
                "usr/bin/nvidia-cdi-hook": (fill(NVIDIA_CDI_HOOK), 0o755),
                "etc/nvidia-container-runtime/config.toml": (fill(CONFIG_TOML), 0o644),
            },
            "conffiles": ["/etc/nvidia-container-runtime/config.toml"],
        },
        {
            "control": {
                "Package": "nvidia-container-toolkit", "Version": version,
                "Architecture": ARCH, "Maintainer": MAINTAINER, "Section": "utils",
                "Priority": "optional",
                "Depends": f"nvidia-container-toolkit-base (= {version}), "
                           f"libnvidia-container-tools (>= {version}), "
                           "libnvidia-container-tools (<< 2.0.0)",
                "Breaks": breaks, "Replaces": breaks,
                "Homepage": "https://github.com/NVIDIA/nvidia-container-toolkit",
                "Description": desc("NVIDIA Container toolkit",
                                    "Provides tools and utilities to enable GPU support in "
                                    "containers."),
            },
            "files": {
                "usr/bin/nvidia-container-runtime-hook":
                    (fill(NVIDIA_CONTAINER_RUNTIME_HOOK), 0o755),
            },
            "postinst": TOOLKIT_POSTINST,
            "postrm": TOOLKIT_POSTRM,
        },
        {
            "control": {
                "Package": "libnvidia-container-tools", "Source": "libnvidia-container",
                "Version": version, "Architecture": ARCH, "Maintainer": MAINTAINER,
                "Section": "utils", "Priority": "optional",
                "Depends": f"libnvidia-container1 (>= {version}), libc6 (>= 2.7)",
                "Homepage": "https://github.com/NVIDIA/libnvidia-container",
                "Description": desc("NVIDIA container runtime library (command-line tools)",
                                    "This package contains command-line tools that facilitate "
                                    "using the library."),
            },
            "files": {"usr/bin/nvidia-container-cli": (fill(NVIDIA_CONTAINER_CLI), 0o755)},
        },
        {
            "control": {
                "Package": "libnvidia-container1", "Source": "libnvidia-container",
                "Version": version, "Architecture": ARCH, "Maintainer": MAINTAINER,
                "Section": "libs", "Priority": "optional", "Multi-Arch": "same",
                "Depends": "libc6 (>= 2.34)",
                "Homepage": "https://github.com/NVIDIA/libnvidia-container",
                "Description": desc("NVIDIA container runtime library",
                                    "The nvidia-container library provides an interface to "
                                    "configure GNU/Linux containers leveraging NVIDIA "
                                    "hardware."),
            },
            "files": {
                "usr/share/libnvidia-container1/README.gpufleet-standin":
                    (f"libnvidia-container1 {version}: placeholder. {STANDIN_NOTE}\n", 0o644),
            },
        },
    ]


# --------------------------------------------------------------------------- building

def _run(cmd: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc


def build_deb(spec: dict[str, Any], out_dir: Path) -> Path:
    """Build one .deb with dpkg-deb (root-owned files, fixed mtimes, xz)."""
    control = spec["control"]
    name = f"{control['Package']}_{control['Version']}_{control['Architecture']}.deb"
    with tempfile.TemporaryDirectory(prefix="gf-deb-") as tmp:
        staging = Path(tmp) / "pkg"
        debian = staging / "DEBIAN"
        debian.mkdir(parents=True)
        size = 0
        for rel, (text, mode) in spec["files"].items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            os.chmod(path, mode)
            size += (len(text.encode()) + 1023) // 1024
        fields = dict(control)
        fields["Installed-Size"] = str(max(size, 1))
        order = ("Package", "Source", "Version", "Architecture", "Maintainer",
                 "Installed-Size", "Depends", "Breaks", "Replaces", "Multi-Arch", "Section",
                 "Priority", "Homepage", "Description")
        text = "".join(f"{k}: {fields[k]}\n" for k in order if k in fields)
        (debian / "control").write_text(text)
        if spec.get("conffiles"):
            (debian / "conffiles").write_text("\n".join(spec["conffiles"]) + "\n")
        for script in ("postinst", "postrm"):
            if spec.get(script):
                (debian / script).write_text(spec[script])
                os.chmod(debian / script, 0o755)
        for dirpath, dirnames, filenames in os.walk(staging):
            for n in dirnames:
                os.chmod(Path(dirpath) / n, 0o755)
            for n in [*dirnames, *filenames]:
                os.utime(Path(dirpath) / n, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))
        os.chmod(staging, 0o755)
        env = dict(os.environ, SOURCE_DATE_EPOCH=str(SOURCE_DATE_EPOCH))
        out = out_dir / name
        _run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(staging), str(out)],
             env=env)
    return out


def _gpg(home: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return _run(["gpg", "--homedir", str(home), "--batch", "--no-tty", "--pinentry-mode",
                 "loopback", "--passphrase", "", *args], **kw)


def _stop_agent(home: Path) -> None:
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"],
                   capture_output=True, check=False)


def ensure_signing_key(home: Path) -> str:
    """Create (once) the lab's ed25519 signing key in ``home``; return its fingerprint."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    with hosts.file_lock(home.with_name(home.name + ".lock")):
        try:
            fpr = _fingerprint(home)
            if fpr is None:
                _gpg(home, "--quick-generate-key", KEY_UID, "ed25519", "sign", "never")
                fpr = _fingerprint(home)
            if fpr is None:
                raise RuntimeError(f"no secret key in {home} after key generation")
            return fpr
        finally:
            _stop_agent(home)


def _fingerprint(home: Path) -> str | None:
    proc = subprocess.run(["gpg", "--homedir", str(home), "--batch", "--with-colons",
                           "--list-secret-keys"], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("fpr:"):
            return line.split(":")[9]
    return None


def _inputs_hash(versions: Sequence[str], fingerprint: str) -> str:
    h = hashlib.sha256(f"rev={RECIPE_REV}\n{','.join(versions)}\n{fingerprint}\n".encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def build_toolkit_repo(root: Path, versions: Sequence[str] = DEFAULT_VERSIONS, *,
                       gnupg_home: Path | None = None) -> RepoInfo:
    """Build (or reuse) the signed stand-in toolkit repository under ``root``.

    ``gnupg_home`` (default: ``<root>-gnupg`` next to ``root``, never inside the served tree)
    holds the lab signing key; it is generated on first use and reused afterwards.
    Re-running with the same inputs returns at once.
    """
    root = Path(root).resolve()
    home = Path(gnupg_home) if gnupg_home is not None else root.with_name(root.name + "-gnupg")
    if home.resolve().is_relative_to(root):
        raise ValueError("gnupg_home must not be inside the served root")
    versions = tuple(versions)
    repo_dir = root / REPO_SUBDIR / ARCH
    key_file = root / KEY_SUBPATH
    fpr = ensure_signing_key(home)
    stamp = repo_dir / ".gpufleet-inputs"
    with hosts.file_lock(root.with_name(root.name + ".lock")):
        wanted = _inputs_hash(versions, fpr)
        debs = tuple(repo_dir / f"{spec['control']['Package']}_{v}_{ARCH}.deb"
                     for v in versions for spec in package_specs(v))
        if (stamp.is_file() and stamp.read_text() == wanted and key_file.is_file()
                and all(d.is_file() for d in debs)):
            return RepoInfo(root, repo_dir, key_file, fpr, versions, debs)
        if repo_dir.exists():
            shutil.rmtree(repo_dir)
        repo_dir.mkdir(parents=True)
        built = tuple(build_deb(spec, repo_dir) for v in versions for spec in package_specs(v))
        _write_indexes(repo_dir)
        try:
            _sign(home, fpr, repo_dir)
            key_file.parent.mkdir(parents=True, exist_ok=True)
            armored = _gpg(home, "--armor", "--export", fpr).stdout
            key_file.write_text(armored)
        finally:
            _stop_agent(home)
        stamp.write_text(wanted)
        return RepoInfo(root, repo_dir, key_file, fpr, versions, built)


def _write_indexes(repo_dir: Path) -> None:
    packages = _run(["apt-ftparchive", "packages", "."], cwd=repo_dir).stdout
    (repo_dir / "Packages").write_text(packages)
    with open(repo_dir / "Packages.gz", "wb") as fh, \
            gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=9) as gz:
        gz.write(packages.encode())
    opts = {
        "Origin": "gpufleet lab stand-in for https://nvidia.github.io/libnvidia-container",
        "Label": "gpufleet lab stand-in (NVIDIA CORPORATION's libnvidia-container repository)",
        "Architectures": ARCH,
        "Description": "gpufleet lab STAND-IN packages named like NVIDIA's container toolkit",
    }
    cmd = ["apt-ftparchive"]
    for key, value in opts.items():
        cmd += ["-o", f"APT::FTPArchive::Release::{key}={value}"]
    release = _run([*cmd, "release", "."], cwd=repo_dir).stdout
    (repo_dir / "Release").write_text(release)


def _sign(home: Path, fpr: str, repo_dir: Path) -> None:
    for name in ("Release.gpg", "InRelease"):
        (repo_dir / name).unlink(missing_ok=True)
    base = ["--yes", "--local-user", fpr, "--digest-algo", "SHA512"]
    _gpg(home, *base, "--armor", "--detach-sign", "--output", str(repo_dir / "Release.gpg"),
         str(repo_dir / "Release"))
    _gpg(home, *base, "--clearsign", "--output", str(repo_dir / "InRelease"),
         str(repo_dir / "Release"))


# --------------------------------------------------------------------------- serving

class _StaticHandler(SimpleHTTPRequestHandler):
    """Static files, no dotfiles, access log to the server's stream (or nowhere)."""

    protocol_version = "HTTP/1.1"
    server_version = "gpufleet-lab-aptrepo-standin/1.0"
    sys_version = ""

    def translate_path(self, path: str) -> str:
        clean = posixpath.normpath(urllib.parse.unquote(path.split("?", 1)[0].split("#", 1)[0]))
        if any(part.startswith(".") for part in clean.split("/") if part):
            return os.path.join(self.directory, ".forbidden-dotfile")  # -> 404
        return super().translate_path(path)

    def list_directory(self, path: str | os.PathLike[str]) -> Any:
        self.send_error(404, "File not found")
        return None

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        server = self.server
        log = getattr(server, "access_log", None)
        if log is not None:
            with server.log_lock:  # type: ignore[attr-defined]
                log.write(f"[aptrepo] {self.address_string()} {format % args}\n")
                log.flush()


class StaticServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], root: Path, log: IO[str] | None = None) -> None:
        self.access_log = log
        self.log_lock = threading.Lock()
        handler = functools.partial(_StaticHandler, directory=str(root))
        super().__init__(address, handler)


def make_static_server(bind_host: str, port: int, root: Path, *,
                       log: IO[str] | None = None) -> ThreadingHTTPServer:
    """A bound (not yet serving) static file server for ``root``; ``serve_forever()`` it in a
    thread. Dotfiles are never served and there are no directory listings."""
    return StaticServer((bind_host, port), Path(root), log=log)
