"""The lab's services daemon (TEST INFRASTRUCTURE): one process serving the stand-ins for what the
lab cannot reach: the DigitalOcean API (emulator, on 127.0.0.1), NVIDIA's apt repository (a real
signed repo of stand-in packages) and Docker Hub (a read-only registry serving the stand-in vLLM
image), the last two on the lab bridge so that hosts reach them.

Started detached by ``gpufleet lab up`` (``python -m gpufleet_lab.services --prefix gf``), its PID
recorded in ``<state>/services.pid`` and its ports in ``lab.json`` under ``services``. The
emulator's cloud firewalls and load balancers are real (``cloudnet.LabNetwork``: iptables in the
hosts' netns, HAProxy in ``<prefix>lb<n>``); they go when the daemon stops.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from gpufleet_lab import (
    aptrepo,
    cloudnet,
    do_emulator,
    hosts,
    hub_emulator,
    images,
    manager,
    registry,
)

APT_PORT = 8701
REGISTRY_PORT = hosts.REGISTRY_PORT
HUB_PORT = 8703
log = logging.getLogger("gpufleet_lab.services")


def _hooks(cfg: hosts.LabConfig) -> do_emulator.Hooks:
    """Droplet actions act on the real lab hosts."""

    def rebuild(droplet: dict[str, Any], image: Any) -> None:
        # an image id that is no public image's is a snapshot (the emulator resolved it)
        snapshot = int(image) if str(image).isdigit() and (
            hosts.snapshot_dir(cfg, int(image)).is_dir()) else None
        hosts.rebuild_host(cfg, int(droplet["index"]), snapshot)

    def snapshot(droplet: dict[str, Any], name: str, snapshot_id: int) -> int:
        return hosts.snapshot_host(cfg, int(droplet["index"]), snapshot_id)

    def power_cycle(droplet: dict[str, Any]) -> None:
        hosts.power_cycle_host(cfg, int(droplet["index"]))

    def power_off(droplet: dict[str, Any]) -> None:
        hosts.power_off_host(cfg, int(droplet["index"]))

    # a lab reboot is a power cycle: same disk, fresh boot; power on boots a stopped host
    return do_emulator.Hooks(on_rebuild=rebuild, on_snapshot=snapshot, on_power_cycle=power_cycle,
                             on_reboot=power_cycle, on_power_on=power_cycle,
                             on_power_off=power_off, on_shutdown=power_off)


def serve(cfg: hosts.LabConfig, token: str, hf_token: str, do_port: int, repo_root: Path,
          image: images.ImageInfo, engine: str) -> None:
    hub = hub_emulator.make_hub_servers(
        [cfg.bridge_ip], HUB_PORT, hub_emulator.HubTokens(good=hf_token),
        repos=hub_emulator.lab_repos(engine))
    cloudnet.down(cfg)  # load balancers a killed daemon left behind
    servers = [
        do_emulator.make_server("127.0.0.1", do_port, token, cfg.lab_json, _hooks(cfg),
                                network=cloudnet.LabNetwork(cfg)),
        aptrepo.make_static_server(cfg.bridge_ip, APT_PORT, repo_root),
        registry.make_registry_server(cfg.bridge_ip, REGISTRY_PORT, [image]),
        *hub,
    ]
    urls = {
        "do_api": do_emulator.base_url(servers[0]),
        "apt": f"http://{cfg.bridge_ip}:{APT_PORT}",
        "registry": f"http://{cfg.bridge_ip}:{REGISTRY_PORT}",
        "hub": f"http://{cfg.bridge_ip}:{HUB_PORT}",
    }
    hosts.update_lab_json(cfg, lambda doc: doc.update({"services": {**urls, "pid": os.getpid()}}))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    (cfg.state_dir / "services.ready").write_text(json.dumps(urls) + "\n")
    log.info("serving %s", urls)
    stop.wait()
    for s in servers:
        s.shutdown()
        s.server_close()  # the emulator's also removes its load balancers and firewalls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefix", default="gf")
    p.add_argument("--subnet", default="10.213.0")
    p.add_argument("--do-port", type=int, default=0)
    p.add_argument("--repo-root", type=Path, required=True)
    p.add_argument("--image-dir", type=Path, required=True)
    p.add_argument("--engine", choices=manager.ENGINES, default=manager.DEFAULT_ENGINE)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = hosts.LabConfig(prefix=a.prefix, subnet=a.subnet)
    token = (cfg.state_dir / "do-token").read_text().strip()
    hf_token = (cfg.state_dir / "hf-token").read_text().strip()
    image = manager.build_image(a.engine, a.image_dir)
    serve(cfg, token, hf_token, a.do_port, a.repo_root, image, a.engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
