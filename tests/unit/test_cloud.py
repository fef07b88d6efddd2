"""The DigitalOcean load balancer and firewall gpufleet manages: the bodies it sends, how it
compares them with what the API has, the plan (``--dry``) and a second run that changes nothing,
and the rollout's load-balancer gate. The API here is a small in-memory fake; the lab's emulator
(with HAProxy and packet filters behind it) runs the same code in tests/e2e/test_cloud.py."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import pytest

from gpufleet.clients.digitalocean import Droplet
from gpufleet.fleet import cloud as fleet_cloud
from gpufleet.fleet import lb_gate
from gpufleet.model import cloud
from gpufleet.model.spec import SpecError, build_spec

BASE = {"service": "llama3", "model": "meta-llama/Meta-Llama-3-8B-Instruct",
        "image": "vllm/vllm-openai:v0.32.0", "ssh_from": ["203.0.113.0/24"]}
TOKEN = "dop_v1_unit-test-token-0123456789"


def droplet(i: int, tags: tuple[str, ...] = ("llama3",), region: str = "nyc2") -> Droplet:
    return Droplet(id=100 + i, name=f"gpu-{i}", region=region, size="gpu-h100x1-80gb",
                   status="active", tags=tags, public_ipv4=f"192.0.2.{i}",
                   private_ipv4=f"10.110.0.{i}", image_slug=None, image_id=None)


class FakeApi:
    """Droplets, tags, load balancers and firewalls, as the API's JSON, with a call log."""

    def __init__(self, droplets: list[Droplet]) -> None:
        self.droplets = {d.id: d for d in droplets}
        self.lbs: dict[str, dict[str, Any]] = {}
        self.firewalls: dict[str, dict[str, Any]] = {}
        self.calls: list[str] = []

    def list_droplets(self, tag: str) -> list[Droplet]:
        return [d for d in self.droplets.values() if tag in d.tags]

    def list_load_balancers(self) -> list[dict[str, Any]]:
        return copy.deepcopy(list(self.lbs.values()))

    def list_firewalls(self) -> list[dict[str, Any]]:
        return copy.deepcopy(list(self.firewalls.values()))

    def create_tag(self, name: str) -> None:
        self.calls.append(f"create_tag {name}")

    def tag_droplets(self, tag: str, ids: Any) -> None:
        self._retag(tag, list(ids), add=True)

    def untag_droplets(self, tag: str, ids: Any) -> None:
        self._retag(tag, list(ids), add=False)

    def _retag(self, tag: str, ids: list[int], add: bool) -> None:
        self.calls.append(f"{'tag' if add else 'untag'} {tag} {ids}")
        for i in ids:
            d = self.droplets[i]
            tags = (*d.tags, tag) if add else tuple(t for t in d.tags if t != tag)
            self.droplets[i] = Droplet(**{**d.__dict__, "tags": tags})

    def _lb_json(self, lb_id: str, body: dict[str, Any]) -> dict[str, Any]:
        # the API's answer: the region as an object, ports "0" for all, fields of its own
        return {**copy.deepcopy(body), "id": lb_id, "ip": "198.51.100.7", "status": "active",
                "region": {"slug": body["region"], "name": "New York 2"},
                "sticky_sessions": {"type": "none"}, "droplet_ids": [1, 2]}

    def create_load_balancer(self, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append("create_load_balancer")
        lb_id = str(uuid.uuid4())
        self.lbs[lb_id] = {**self._lb_json(lb_id, body), "status": "new", "ip": ""}
        return copy.deepcopy(self.lbs[lb_id])

    def get_load_balancer(self, lb_id: str) -> dict[str, Any]:
        self.lbs[lb_id].update(status="active", ip="198.51.100.7")  # ready on the first poll
        return copy.deepcopy(self.lbs[lb_id])

    def update_load_balancer(self, lb_id: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append("update_load_balancer")
        self.lbs[lb_id] = self._lb_json(lb_id, body)
        return copy.deepcopy(self.lbs[lb_id])

    def _fw_json(self, fw_id: str, body: dict[str, Any]) -> dict[str, Any]:
        data = {**copy.deepcopy(body), "id": fw_id, "status": "succeeded", "pending_changes": []}
        for rule in data["outbound_rules"]:
            if rule.get("ports") == "all":
                rule["ports"] = "0"
        for rule in data["inbound_rules"]:
            for key in ("addresses", "droplet_ids", "load_balancer_uids", "tags"):
                rule["sources"].setdefault(key, [])
        return data

    def create_firewall(self, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append("create_firewall")
        fw_id = str(uuid.uuid4())
        self.firewalls[fw_id] = self._fw_json(fw_id, body)
        return copy.deepcopy(self.firewalls[fw_id])

    def update_firewall(self, fw_id: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append("update_firewall")
        self.firewalls[fw_id] = self._fw_json(fw_id, body)
        return copy.deepcopy(self.firewalls[fw_id])


def apply(api: FakeApi, spec: Any) -> tuple[fleet_cloud.CloudPlan, dict[str, Any]]:
    the_plan = fleet_cloud.plan(api, spec, "llama3")  # type: ignore[arg-type]
    lb = fleet_cloud.apply(api, the_plan, emit=lambda _: None, sleep=lambda _: None)  # type: ignore[arg-type]
    return the_plan, lb


def test_the_load_balancer_follows_its_own_tag_and_checks_the_fronts_health():
    spec = build_spec({**BASE, "lb_check_interval": 5, "lb_healthy_threshold": 2})
    body = cloud.load_balancer(spec, "llama3", "nyc2")
    assert body["tag"] == "llama3-lb"
    assert body["forwarding_rules"] == [{"entry_protocol": "http", "entry_port": 80,
                                         "target_protocol": "http", "target_port": 8000,
                                         "tls_passthrough": False}]
    assert body["health_check"] == {"protocol": "http", "port": 8000, "path": "/health",
                                    "check_interval_seconds": 5, "response_timeout_seconds": 5,
                                    "healthy_threshold": 2, "unhealthy_threshold": 3}
    assert body["http_idle_timeout_seconds"] == 600  # long generations outlive DO's 60 s


def test_with_tls_the_load_balancer_passes_it_through_to_the_front(tmp_path):
    (tmp_path / "c.pem").write_text("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    (tmp_path / "k.pem").write_text("-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n")
    spec = build_spec({**BASE, "tls_certificate": str(tmp_path / "c.pem"),
                       "tls_key": str(tmp_path / "k.pem")})
    body = cloud.load_balancer(spec, "llama3", "nyc2")
    assert body["forwarding_rules"][0] == {"entry_protocol": "https", "entry_port": 443,
                                           "target_protocol": "https", "target_port": 8000,
                                           "tls_passthrough": True}
    assert body["health_check"]["protocol"] == "https"
    assert fleet_cloud.lb_url({"ip": "198.51.100.7", **body}) == "https://198.51.100.7"


def test_the_firewall_admits_ssh_the_api_and_the_peers_only_from_whom_the_spec_says():
    spec = build_spec({**BASE, "api_from": ["198.51.100.0/24"], "metrics_from": ["10.110.0.0/20"]})
    body = cloud.firewall(spec, "llama3", "lb-1")
    assert body["tags"] == ["llama3"]
    assert body["inbound_rules"] == [
        {"protocol": "tcp", "ports": "22", "sources": {"addresses": ["203.0.113.0/24"]}},
        {"protocol": "tcp", "ports": "8000",
         "sources": {"load_balancer_uids": ["lb-1"], "addresses": ["198.51.100.0/24"]}},
        {"protocol": "tcp", "ports": "8790", "sources": {"tags": ["llama3"]}},
        {"protocol": "tcp", "ports": "8002", "sources": {"addresses": ["10.110.0.0/20"]}},
    ]
    # DigitalOcean drops outbound traffic no rule allows: apt, the registry and the Hub need it
    assert {r["protocol"] for r in body["outbound_rules"]} == {"tcp", "udp", "icmp"}


def test_only_the_load_balancer_reaches_the_port_when_the_spec_names_nobody():
    body = cloud.firewall(build_spec(BASE), "llama3", "lb-1")
    assert body["inbound_rules"][1]["sources"] == {"load_balancer_uids": ["lb-1"]}


@pytest.mark.parametrize("key,value", [("lb_check_interval", 2), ("lb_healthy_threshold", 11),
                                       ("lb_idle_timeout", 601), ("lb_port", 0),
                                       ("ssh_from", ["not-a-network"])])
def test_bad_load_balancer_and_firewall_values_are_refused_with_the_key(key, value):
    with pytest.raises(SpecError, match=key):
        build_spec({**BASE, key: value})


def test_without_ssh_from_gpufleet_cloud_refuses_before_any_call():
    api = FakeApi([droplet(1)])
    spec = build_spec({k: v for k, v in BASE.items() if k != "ssh_from"})
    with pytest.raises(fleet_cloud.CloudError, match="ssh_from"):
        fleet_cloud.plan(api, spec, "llama3")  # type: ignore[arg-type]
    assert api.calls == []


def test_first_run_creates_both_and_tags_the_droplets_then_a_second_run_changes_nothing():
    api = FakeApi([droplet(1), droplet(2)])
    spec = build_spec(BASE)
    first, lb = apply(api, spec)
    assert [r.action for r in first.resources] == ["create", "create"]
    assert [d.name for d in first.to_tag] == ["gpu-1", "gpu-2"]
    assert api.calls == ["create_tag llama3-lb", "tag llama3-lb [101, 102]",
                         "create_load_balancer", "create_firewall"]
    fw = next(iter(api.firewalls.values()))
    assert fw["inbound_rules"][1]["sources"]["load_balancer_uids"] == [lb["id"]]
    assert fleet_cloud.lb_url(lb) == "http://198.51.100.7"

    api.calls.clear()
    second = fleet_cloud.plan(api, spec, "llama3")  # type: ignore[arg-type]
    assert not second.changes_anything, fleet_cloud.render_plan(second)
    assert [r.action for r in second.resources] == ["unchanged", "unchanged"]
    assert api.calls == []


def test_a_changed_setting_is_one_update_shown_field_by_field_in_the_dry_plan():
    api = FakeApi([droplet(1)])
    apply(api, build_spec(BASE))
    api.calls.clear()
    spec = build_spec({**BASE, "lb_healthy_threshold": 2, "api_from": ["198.51.100.0/24"]})
    the_plan = fleet_cloud.plan(api, spec, "llama3")  # type: ignore[arg-type]
    text = fleet_cloud.render_plan(the_plan)
    assert "~ load balancer gpufleet-llama3" in text
    assert "health_check.healthy_threshold: 3 -> 2" in text
    assert "~ firewall gpufleet-llama3" in text and "198.51.100.0/24" in text
    assert api.calls == []  # planning (--dry) writes nothing
    fleet_cloud.apply(api, the_plan, emit=lambda _: None, sleep=lambda _: None)  # type: ignore[arg-type]
    assert api.calls == ["update_load_balancer", "update_firewall"]
    assert not fleet_cloud.plan(api, spec, "llama3").changes_anything  # type: ignore[arg-type]


def test_droplets_in_two_regions_are_refused():
    api = FakeApi([droplet(1), droplet(2, region="ams3")])
    with pytest.raises(fleet_cloud.CloudError, match="2 regions"):
        fleet_cloud.plan(api, build_spec(BASE), "llama3")  # type: ignore[arg-type]


def test_a_second_load_balancer_of_the_same_name_is_refused():
    api = FakeApi([droplet(1)])
    apply(api, build_spec(BASE))
    lb = next(iter(api.lbs.values()))
    api.lbs["other"] = {**lb, "id": "other"}
    with pytest.raises(fleet_cloud.CloudError, match="2 load balancers are named"):
        fleet_cloud.plan(api, build_spec(BASE), "llama3")  # type: ignore[arg-type]


def test_the_rollout_gate_drains_then_waits_out_the_load_balancers_admission():
    api = FakeApi([droplet(1, ("llama3", "llama3-lb")), droplet(2, ("llama3", "llama3-lb"))])
    slept: list[float] = []
    lb = {"name": "gpufleet-llama3", "ip": "198.51.100.7",
          "health_check": {"check_interval_seconds": 3, "healthy_threshold": 2}}
    gate = lb_gate.LoadBalancerGate(api, "llama3", lb, drain=4, sleep=slept.append)  # type: ignore[arg-type]
    gate.take_out({"gpu-1": 101})
    assert api.droplets[101].tags == ("llama3",)  # still in the inventory, out of the pool
    gate.put_back({"gpu-1": 101}, ["gpu-1"])
    assert "llama3-lb" in api.droplets[101].tags
    assert slept == [4, 3 * (1 + 2)]


def test_the_gate_is_off_without_droplets_a_token_or_a_load_balancer():
    api = FakeApi([droplet(1)])
    env = {"DIGITALOCEAN_TOKEN": TOKEN}
    assert lb_gate.gate_for({"h": {"ssh_hostname": "x"}}, 1, env, lambda *_: api) is None
    assert lb_gate.gate_for({"h": {"droplet_id": 101}}, 1, {}, lambda *_: api) is None
    assert lb_gate.gate_for({"h": {"droplet_id": 101}}, 1, env, lambda *_: api) is None
    apply(api, build_spec(BASE))
    gate = lb_gate.gate_for({"h": {"droplet_id": 101}}, 1, env, lambda *_: api)
    assert gate is not None and gate.lb["name"] == "gpufleet-llama3"


def test_status_shows_the_load_balancers_view_of_each_host_only_when_there_is_one():
    from gpufleet.fleet import status

    api = FakeApi([droplet(1), droplet(2)])
    env = {"DIGITALOCEAN_TOKEN": TOKEN}
    data = {"gpu-1": {"droplet_id": 101, "droplet_tags": ["llama3", "llama3-lb"]},
            "gpu-2": {"droplet_id": 102, "droplet_tags": ["llama3"]}}
    assert lb_gate.membership(data, env, lambda *_: api) == {}
    apply(api, build_spec(BASE))
    assert lb_gate.membership(data, env, lambda *_: api) == {"gpu-1": "in", "gpu-2": "out"}
    rows = [{"host": "gpu-1", "unit": {"active": "active"}, "lb": "in"},
            {"host": "gpu-2", "error": "unreachable: no answer on 192.0.2.2:22", "lb": "out"}]
    text = status.render("llama3", rows)
    assert text.splitlines()[1].split()[-1] == "lb"
    assert text.splitlines()[2].split()[-1] == "in" and text.splitlines()[3].endswith("out")
    assert "lb" not in status.render("llama3", [{k: v for k, v in r.items() if k != "lb"}
                                                for r in rows]).splitlines()[1].split()
