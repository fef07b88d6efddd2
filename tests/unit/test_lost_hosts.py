"""A host lost during a deploy is reported with the operation, since when and the error, instead
of pyinfra's bare ``Error: executed 0 commands``; an ordinary failure is left alone."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from pyinfra.api import State

from gpufleet.fleet import lost_hosts

OP = "op-hash-1"


class SSHConnector:  # what watchdog.ssh_address looks for
    pass


class FakeTransport:
    def __init__(self, active: bool = True) -> None:
        self.active = active

    def is_active(self) -> bool:
        return self.active

    def close(self) -> None:
        self.active = False


def fake_host(name: str, transport: FakeTransport | None = None):
    client = SimpleNamespace(get_transport=lambda: transport)
    return SimpleNamespace(name=name, connector_cls=SSHConnector,
                           connector=SimpleNamespace(client=client),
                           data={"ssh_hostname": "10.0.0.2", "ssh_port": 22})


class FakeState:
    def __init__(self, hosts) -> None:
        self.inventory = hosts
        self.active_hosts = set(map(id, hosts))
        self.ops = {h.name: {OP: object()} for h in hosts}
        self.ops_by_host = self.ops

    def get_op_meta(self, op_hash):
        return SimpleNamespace(names={"vLLM service | Weights m@abc staged in /opt/models"})


def make_state(*hosts):
    state = FakeState(list(hosts))
    state.active_hosts = _Members(hosts)
    state.ops = _ByHost(state.ops)
    return state


class _Members:
    def __init__(self, hosts) -> None:
        self.ids = {id(h) for h in hosts}

    def __contains__(self, host) -> bool:
        return id(host) in self.ids


class _ByHost(dict):
    def __getitem__(self, host):
        return super().__getitem__(host.name)


@pytest.fixture
def errors(caplog):
    caplog.set_level(logging.ERROR, logger="pyinfra")
    return caplog


def test_connection_gone_and_host_silent_is_reported_as_lost(errors):
    host = fake_host("llama3-gpu-02", FakeTransport(active=False))
    state = make_state(host)
    reporter = lost_hosts.LostHostReporter(probe=lambda address: False, watch=False)
    reporter.operation_host_start(state, host, OP)
    reporter.operation_host_error(state, host, OP)
    (line,) = [r.getMessage() for r in errors.records]
    assert line.startswith("llama3-gpu-02: lost at operation 'Weights m@abc staged in "
                           "/opt/models' after ")
    assert "SSH connection closed; the host did not answer on port 22 since " in line


def test_a_host_powered_off_with_no_logged_error_and_an_open_transport_is_lost(errors):
    # what pyinfra shows as "executed 0 commands": no socket error logged, the transport still
    # looks active; the host's SSH port does not answer
    host = fake_host("llama3-gpu-01", FakeTransport(active=True))
    state = make_state(host)
    reporter = lost_hosts.LostHostReporter(probe=lambda address: False, watch=False)
    reporter.operation_host_start(state, host, OP)
    reporter.operation_host_error(state, host, OP)
    (line,) = [r.getMessage() for r in errors.records]
    assert line.startswith("llama3-gpu-01: lost at operation 'Weights m@abc staged in ")
    assert "the host did not answer on port 22 since " in line


def test_a_host_that_answers_once_more_while_powering_off_is_still_lost(errors):
    host = fake_host("llama3-gpu-01", FakeTransport(active=True))
    state = make_state(host)
    answers = iter([True, False])  # its listener takes one last connection, then it is gone
    reporter = lost_hosts.LostHostReporter(probe=lambda address: next(answers), watch=False,
                                           settle=0)
    reporter.operation_host_start(state, host, OP)
    reporter.operation_host_error(state, host, OP)
    assert errors.records and "lost at operation" in errors.records[-1].getMessage()


def test_the_ssh_error_pyinfra_logged_is_the_reason(errors):
    host = fake_host("llama3-gpu-02", FakeTransport(active=True))
    state = make_state(host)
    reporter = lost_hosts.LostHostReporter(probe=lambda address: False, watch=False)
    reporter.operation_host_start(state, host, OP)
    lost_hosts._ERRORS.last[host.name] = "SSH connection closed (Socket is closed)"
    reporter.operation_host_error(state, host, OP)
    assert "after 0.0 s: SSH connection closed (Socket is closed); the host did not answer" \
        in errors.records[-1].getMessage()


def test_an_ordinary_failure_on_a_host_that_answers_adds_nothing(errors):
    host = fake_host("llama3-gpu-01", FakeTransport(active=True))
    state = make_state(host)
    reporter = lost_hosts.LostHostReporter(probe=lambda address: True, watch=False)
    reporter.operation_host_start(state, host, OP)
    reporter.operation_host_error(state, host, OP)
    assert errors.records == []
    # a broken connection to a host that still answers is not "lost" either
    host.connector.client = SimpleNamespace(get_transport=lambda: None)
    reporter.operation_host_error(state, host, OP)
    assert errors.records == []


def test_the_watchdog_cuts_a_silent_host_after_the_misses_then_the_error_says_lost(errors):
    transport = FakeTransport(active=True)
    host, other = fake_host("llama3-gpu-02", transport), fake_host("llama3-gpu-01")
    state = make_state(host, other)
    reporter = lost_hosts.LostHostReporter(watch=False, misses=3)
    # both fakes have one address: the probes answer in the order of the hosts (02 silent)
    results = iter([False, True] * 3)
    reporter.probe = lambda address: next(results)
    for h in (host, other):
        reporter.operation_host_start(state, h, OP)
    reporter.check(state)
    reporter.check(state)
    assert transport.active and errors.records == []
    reporter.check(state)
    assert not transport.active  # cut: the hanging command fails instead of waiting forever
    assert reporter.lost == {"llama3-gpu-02"}
    line = errors.records[-1].getMessage()
    assert line.startswith("llama3-gpu-02: lost at operation 'Weights m@abc staged in "
                           "/opt/models' after ")
    assert ": unreachable, no answer on its SSH port to 3 probes in a row: gpufleet closed its " \
        "SSH connection so that the run does not hang on it; the host did not answer on port " \
        "22 since " in line
    reporter.operation_host_error(state, host, OP)  # said once per host
    assert len(errors.records) == 1


def test_registered_once_per_state():
    state = State.__new__(State)
    state.callback_handlers = []
    first = lost_hosts.register(state)
    assert lost_hosts.register(state) is first
    assert state.callback_handlers == [first] and first.watch


def test_in_a_rollout_the_driver_watches_not_the_reporter():
    from gpufleet.fleet.progress import Progress
    from gpufleet.fleet.report import Silent

    state = State.__new__(State)
    state.callback_handlers = [Progress(Silent(), "deploying")]
    assert lost_hosts.register(state).watch is False
