"""``gpufleet lab up|down|status|env|ask``: compose the lab from its parts (TEST INFRASTRUCTURE).

``up`` builds (or reuses) the host images, the stand-in vLLM image and the stand-in toolkit apt
repository, boots the hosts, starts the services daemon and writes ``<state>/lab.env``: the
environment that makes ``pyinfra inventories/do.py deploys/llama3.py`` run, unchanged, against
the lab. ``down`` leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpufleet_lab import aptrepo, cloudnet, hosts, hub_emulator, images, profiles, realimage

DEFAULT_PROFILES = ("h100", "rtx4000ada")
# what serves behind the pinned image name: upstream vLLM on CPU, or the stand-in (fast, and
# with fault knobs: the scale and fault-injection tests use it)
ENGINES = hub_emulator.ENGINES
DEFAULT_ENGINE = "real"
DEFAULT_TAG = "llama3"
SERVICES_TIMEOUT = 120.0


@dataclass(frozen=True)
class HostWish:
    profile: str
    flavour: str = "docker"

    @classmethod
    def parse(cls, text: str) -> HostWish:
        profile, _, flavour = text.partition(":")
        profiles.get_profile(profile)  # raises on an unknown profile
        if flavour and flavour not in hosts.FLAVOURS:
            raise ValueError(f"{text!r}: flavour must be one of {', '.join(hosts.FLAVOURS)}")
        return cls(profile, flavour or "docker")


def plan_hosts(cfg: hosts.LabConfig, wishes: list[HostWish], count: int | None,
               tag: str) -> list[hosts.LabHost]:
    """``count`` hosts (default: one per wish), profiles cycling through ``wishes``."""
    n = count or len(wishes)
    return [
        hosts.LabHost.create(cfg, i, profile=wishes[(i - 1) % len(wishes)].profile,
                             flavour=wishes[(i - 1) % len(wishes)].flavour,
                             droplet_name=f"{tag}-gpu-{i:02d}", tags=(tag, "gpufleet-lab"))
        for i in range(1, n + 1)
    ]


def _secret_file(path: Path, prefix: str) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(prefix + secrets.token_hex(20) + "\n")
    return path.read_text().strip()


def _services_pidfile(cfg: hosts.LabConfig) -> Path:
    return cfg.state_dir / "services.pid"


def _stop_services(cfg: hosts.LabConfig) -> None:
    pidfile = _services_pidfile(cfg)
    try:
        pid, start = (int(x) for x in pidfile.read_text().split())
    except (OSError, ValueError):
        return
    if _start_time(pid) == start:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _start_time(pid) == start and time.monotonic() < deadline:
            time.sleep(0.1)
        if _start_time(pid) == start:
            os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
    (cfg.state_dir / "services.ready").unlink(missing_ok=True)


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def build_image(engine: str, image_dir: Path) -> images.ImageInfo:
    """The image this lab's registry serves under the pinned name (built once, cached)."""
    if engine == "real":
        return realimage.build_real_image(image_dir)
    return images.build_vllm_image(image_dir)


def _start_services(cfg: hosts.LabConfig, repo_root: Path, image_dir: Path,
                    engine: str) -> dict[str, str]:
    _stop_services(cfg)
    ready = cfg.state_dir / "services.ready"
    ready.unlink(missing_ok=True)
    log = open(cfg.state_dir / "services.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpufleet_lab.services", "--prefix", cfg.prefix, "--subnet",
         cfg.subnet, "--repo-root", str(repo_root), "--image-dir", str(image_dir),
         "--engine", engine],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
    )
    _services_pidfile(cfg).write_text(f"{proc.pid} {_start_time(proc.pid)}\n")
    deadline = time.monotonic() + SERVICES_TIMEOUT
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise hosts.LabError(f"the lab services did not start; see {cfg.state_dir}/services.log")
        time.sleep(0.1)
    return json.loads(ready.read_text())


def lab_env(cfg: hosts.LabConfig, urls: dict[str, str], tag: str) -> dict[str, str]:
    return {
        "DIGITALOCEAN_API_URL": urls["do_api"],
        "DIGITALOCEAN_TOKEN": _secret_file(cfg.state_dir / "do-token", "dop_v1_lab"),
        "GPUFLEET_TAG": tag,
        "GPUFLEET_SSH_KEY": str(cfg.ssh_key),
        "GPUFLEET_KNOWN_HOSTS": str(cfg.known_hosts),
        "GPUFLEET_STRICT_HOST_KEYS": "yes",
        "GPUFLEET_STATE_DIR": str(cfg.state_dir / "controller"),
        "GPUFLEET_TOOLKIT_REPO_URL": f"{urls['apt']}/libnvidia-container/stable/deb/$(ARCH)",
        "GPUFLEET_TOOLKIT_KEY_URL": f"{urls['apt']}/libnvidia-container/gpgkey",
        "HF_TOKEN": _secret_file(cfg.state_dir / "hf-token", "hf_lab"),
        "HF_ENDPOINT": urls["hub"],
    }


def env_file(cfg: hosts.LabConfig) -> Path:
    return cfg.state_dir / "lab.env"


# every tool ``lab up`` runs on this machine -> the Debian package that provides it
REQUIRED_TOOLS = hosts.TOOLS


class LabUpError(hosts.LabError):
    """``lab up`` stopped: the message is one line naming the step and why."""


def missing_tools(which: Callable[[str], str | None] | None = None,
                  exists: Callable[[str], bool] | None = None) -> dict[str, str]:
    """The tools (and files) ``lab up`` needs that this machine lacks -> their package."""
    which = which or shutil.which
    exists = exists or os.path.exists
    missing = {cmd: pkg for cmd, pkg in sorted(REQUIRED_TOOLS.items()) if which(cmd) is None}
    missing.update({path: pkg for path, pkg in sorted(hosts.TOOL_FILES.items())
                    if not exists(path)})
    return missing


def check_tools(which: Callable[[str], str | None] | None = None,
                exists: Callable[[str], bool] | None = None) -> None:
    """Refuse, before anything is made, when a tool is missing: one line with what to
    install (``apt-ftparchive is missing: apt-get install apt-utils``)."""
    missing = missing_tools(which, exists)
    if not missing:
        return
    names = ", ".join(missing)
    verb = "is" if len(missing) == 1 else "are"
    packages = " ".join(sorted(set(missing.values())))
    raise LabUpError(f"{names} {verb} missing: apt-get install {packages}")


def _services_running(cfg: hosts.LabConfig) -> bool:
    try:
        pid, start = (int(x) for x in _services_pidfile(cfg).read_text().split())
    except (OSError, ValueError):
        return False
    return _start_time(pid) == start


def _is_up(cfg: hosts.LabConfig) -> bool:
    """Whether a host or the services daemon of this lab runs."""
    if not cfg.state_dir.exists():
        return False
    return _services_running(cfg) or any(st.running for st in hosts.status(cfg))


def _one_line(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    raw = error.args[0] if isinstance(error, KeyError) and error.args else error
    text = " ".join(str(raw).split()) or type(error).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def read_env(cfg: hosts.LabConfig) -> dict[str, str]:
    """The lab's environment as ``up`` wrote it (``lab.env``)."""
    return _read_env(env_file(cfg))


def _read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            env[key] = shlex.split(value)[0] if value else ""
    return env


def up(cfg: hosts.LabConfig, wishes: list[HostWish], count: int | None = None,
       tag: str = DEFAULT_TAG, engine: str = DEFAULT_ENGINE) -> dict[str, str]:
    """Boot the lab. Missing tools are refused before anything is made; a lab that is up
    already is kept as it is (its environment is returned, so ``make demo`` runs twice); when
    a later step fails, everything this run made is taken down again (``down``) and
    ``LabUpError`` names the step and why."""
    check_tools()
    if _is_up(cfg):
        if env_file(cfg).exists():
            print(f"lab {cfg.prefix} is already up: kept as it is (gpufleet-lab --prefix "
                  f"{cfg.prefix} down to start afresh)", file=sys.stderr)
            return _read_env(env_file(cfg))
        raise LabUpError(f"lab {cfg.prefix!r} is half up: take it down first "
                         f"(gpufleet-lab --prefix {cfg.prefix} --subnet {cfg.subnet} down)")
    t0 = t1 = t2 = time.monotonic()
    step = "check the tools"
    try:
        step = "build the stand-in toolkit apt repository"
        repo_root = aptrepo.build_toolkit_repo(cfg.cache_dir / "aptrepo").root
        step = f"build the vLLM image ({engine})"
        image_dir = cfg.cache_dir / "vllm-image"
        build_image(engine, image_dir)
        step = "write the lab's state and tokens"
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        _secret_file(cfg.state_dir / "do-token", "dop_v1_lab")
        _secret_file(cfg.state_dir / "hf-token", "hf_lab")
        t1 = time.monotonic()
        step = "boot the hosts"
        hosts.boot(cfg, plan_hosts(cfg, wishes, count, tag))
        t2 = time.monotonic()
        step = "start the lab services"
        hosts.update_lab_json(cfg, lambda doc: doc.update({"engine": engine}))
        urls = _start_services(cfg, repo_root, image_dir, engine)
        step = "write the lab environment"
        env = lab_env(cfg, urls, tag)
        path = env_file(cfg)
        path.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
        path.chmod(0o600)
    except (Exception, KeyboardInterrupt) as e:
        why = _one_line(e)
        try:
            down(cfg)
            after = "everything it made was taken down again"
        except Exception as d:  # noqa: BLE001 - report both, never a traceback
            after = (f"taking it down failed too ({_one_line(d)}): run gpufleet-lab --prefix "
                     f"{cfg.prefix} --subnet {cfg.subnet} down")
        raise LabUpError(f"lab up failed at step '{step}': {why}; {after}") from e
    print(f"lab {cfg.prefix}: images {t1 - t0:.1f}s, hosts {t2 - t1:.1f}s, services "
          f"{time.monotonic() - t2:.1f}s", file=sys.stderr)
    return env


def down(cfg: hosts.LabConfig) -> None:
    _stop_services(cfg)
    cloudnet.down(cfg)  # load balancers, should the daemon have died without removing them
    hosts.down(cfg)
    env_file(cfg).unlink(missing_ok=True)


def all_labs() -> list[hosts.LabConfig]:
    labs = []
    for d in sorted(hosts.STATE_ROOT.iterdir()) if hosts.STATE_ROOT.is_dir() else []:
        doc = d / "lab.json"
        if d.name != "cache" and doc.exists():
            subnet = json.loads(doc.read_text()).get("subnet", "10.213.0")
            labs.append(hosts.LabConfig(prefix=d.name, subnet=subnet))
    return labs


def ask(cfg: hosts.LabConfig, prompt: str, service: str = "llama3") -> str:
    """One chat completion from the first lab host that serves ``service``."""
    env = dict(os.environ)
    for line in env_file(cfg).read_text().splitlines():
        key, _, value = line.partition("=")
        env.setdefault(key, shlex.split(value)[0] if value else "")
    from gpufleet.model import secrets as service_secrets

    key = service_secrets.api_key(service, env).reveal()
    for host in hosts.load_hosts(cfg):
        base = f"http://{host.public_ip}:8000"
        try:
            with urllib.request.urlopen(f"{base}/v1/models", timeout=3) as r:
                pass
        except urllib.error.HTTPError:
            pass  # 401 without a key: it serves
        except OSError:
            continue
        req = urllib.request.Request(
            f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            model = json.load(r)["data"][0]["id"]
        body = json.dumps({"model": model, "max_tokens": 32, "temperature": 0,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        req = urllib.request.Request(f"{base}/v1/chat/completions", data=body, headers={
            "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.load(r)["choices"][0]["message"]["content"]
        return f"{host.droplet_name} ({host.public_ip}:8000, {model}): {answer}"
    raise hosts.LabError("no lab host answers on port 8000: run the deploy first")


def configure(lab: argparse.ArgumentParser) -> None:
    """The ``gpufleet-lab`` command's options and subcommands."""
    lab.add_argument("--prefix", default=os.environ.get("GPUFLEET_LAB_PREFIX", "gf"))
    lab.add_argument("--subnet", default=os.environ.get("GPUFLEET_LAB_SUBNET", "10.213.0"))
    lab.set_defaults(func=main)
    lsub = lab.add_subparsers(dest="lab_command", required=True)
    p = lsub.add_parser("up", help="boot the lab and print its environment")
    p.add_argument("--hosts", type=int, default=None, help="number of hosts (1-8)")
    p.add_argument("--profile", action="append", default=[],
                   help=f"host profile[:flavour], repeatable or comma-separated, cycled over the "
                        f"hosts; profiles: {', '.join(profiles.PROFILES)}; flavours: docker, base")
    p.add_argument("--tag", default=DEFAULT_TAG)
    p.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE,
                   help="what the pinned vllm/vllm-openai image runs: upstream vLLM on CPU "
                        "(real, the default) or the lab's stand-in")
    d = lsub.add_parser("down", help="stop the lab and remove everything it made")
    d.add_argument("--all", action="store_true", help="every lab on this machine")
    lsub.add_parser("status", help="hosts and services")
    lsub.add_parser("env", help="print the lab environment (for `set -a; . <(gpufleet-lab env)`)")
    a = lsub.add_parser("ask", help="one chat completion from the lab's served endpoint")
    a.add_argument("prompt")
    a.add_argument("--service", default="llama3")


def main(args: argparse.Namespace) -> int:
    cfg = hosts.LabConfig(prefix=args.prefix, subnet=args.subnet)
    if args.lab_command == "up":
        names = [n for p in args.profile for n in p.split(",") if n] or list(DEFAULT_PROFILES)
        if args.hosts is not None and not 1 <= args.hosts <= 8:
            raise SystemExit("gpufleet-lab up: --hosts must be between 1 and 8")
        try:
            wishes = [HostWish.parse(n) for n in names]
        except (KeyError, ValueError) as e:
            raise SystemExit(f"gpufleet-lab up: {_one_line(e)}") from None
        try:
            env = up(cfg, wishes, args.hosts, args.tag, args.engine)
        except hosts.LabError as e:
            print(f"gpufleet-lab up: {e}", file=sys.stderr)
            return 1
        for host in hosts.load_hosts(cfg):
            print(f"# {host.droplet_name}: {host.profile} ({host.flavour}) {host.public_ip}")
        print(f"# environment for pyinfra (also in {env_file(cfg)}):")
        for key, value in env.items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    if args.lab_command == "down":
        for lab in (all_labs() if args.all else [cfg]):
            down(lab)
        return 0
    if args.lab_command == "status":
        for st in hosts.status(cfg):
            print(f"{st.host.droplet_name:16} {st.host.machine:6} {st.host.profile:11} "
                  f"{st.host.public_ip:15} {'running' if st.running else 'stopped'}"
                  f"{' ssh-up' if st.ssh else ''}")
        ready = cfg.state_dir / "services.ready"
        if cfg.lab_json.exists():
            print(f"engine: {json.loads(cfg.lab_json.read_text()).get('engine', 'standin')}")
        print(f"services: {ready.read_text().strip() if ready.exists() else 'not running'}")
        return 0
    if args.lab_command == "env":
        print(env_file(cfg).read_text(), end="")
        return 0
    if args.lab_command == "ask":
        print(ask(cfg, args.prompt, args.service))
        return 0
    return 2
