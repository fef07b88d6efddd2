"""A fleet run's pyinfra plumbing: the inventory, one ``State`` per step, connections, and
commands or facts on many hosts at once.

The inventory is loaded once, as ``pyinfra INVENTORY ...`` loads it; each step of a run (the
preflight, each batch, the end) works on a sub-inventory of some of its hosts in a fresh pyinfra
``State`` (one ``State`` runs its operations once). Parallel work runs in gevent greenlets, which
needs gevent's monkey-patching (the ``gpufleet`` command does it when it is imported).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pyinfra.api import BaseStateCallback, Config, Inventory, State
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS, pop_global_arguments
from pyinfra.api.connect import connect_all
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.host import Host
from pyinfra.context import ctx_state

from gpufleet.fleet.report import RolloutError
from gpufleet.fleet.watchdog import close_connection

ShellResult = tuple[bool, list[str]]  # (the command succeeded, its output lines)


def load_inventory(path: str, data: Mapping[str, Any] | None = None) -> Inventory:
    """The inventory exactly as ``pyinfra INVENTORY ...`` builds it (file, groups, group_data,
    ``--data`` overrides)."""
    from pyinfra_cli.inventory import make_inventory

    if not os.path.exists(path):
        raise RolloutError(f"inventory {path} does not exist")
    try:
        with ctx_state.use(State()):  # exec_file notes the file it runs on the state
            inventory = make_inventory(path, override_data=dict(data or {}), cwd=os.getcwd())
    except PyinfraError as e:
        raise RolloutError(f"{path}: {e}") from None
    if not len(inventory):
        raise RolloutError(f"inventory {path} has no hosts")
    return inventory


def connector_args(state: State, host: Host) -> dict[str, Any]:
    """The host's connector arguments (``_sudo`` ...), as an operation would get them."""
    arguments, _ = pop_global_arguments(state, host, {})
    return {k: v for k, v in arguments.items() if k in CONNECTOR_ARGUMENT_KEYS}


def in_parallel(fn: Callable[[Host], Any], hosts: Iterable[Host],
                timeout: float = 60) -> dict[str, Any]:
    """``fn`` on every host at once: host name -> its result, or the exception it raised (a
    ``TimeoutError`` when it took longer than ``timeout``)."""
    import gevent

    def guarded(h: Host) -> Any:
        try:
            with gevent.Timeout(timeout):
                return fn(h)
        except gevent.Timeout:
            return TimeoutError(f"no answer within {timeout:.0f}s")
        except Exception as e:  # noqa: BLE001 - reported per host
            return e

    greenlets = {h.name: gevent.spawn(guarded, h) for h in hosts}
    gevent.joinall(list(greenlets.values()))
    return {name: g.value for name, g in greenlets.items()}


def shell(state: State, hosts: Iterable[Host], command_for: Callable[[Host], Any],
          timeout: float = 60) -> dict[str, ShellResult]:
    """Run ``command_for(host)`` on every host at once, outside any operation."""
    def one(h: Host) -> ShellResult:
        ok, output = h.run_shell_command(command_for(h), print_output=False,
                                         **connector_args(state, h))
        return ok, list(output.output_lines)

    out = {}
    for name, value in in_parallel(one, hosts, timeout).items():
        out[name] = value if isinstance(value, tuple) else (False, [str(value)])
    return out


def connect(state: State) -> list[Host]:
    """Connect the state's hosts; returns those connected (the others failed to)."""
    try:
        connect_all(state)
    except PyinfraError:
        pass  # "No hosts remaining!": every host failed to connect
    return [h for h in state.inventory if h in state.active_hosts]


def shutdown(state: State) -> None:
    """Close every connection the state opened."""
    for h in list(state.activated_hosts):
        close_connection(h)


class FleetSession:
    """The inventory of a run and the pyinfra ``State`` of each of its steps."""

    def __init__(self, inventory: Inventory, connect_timeout: int = 10) -> None:
        self.inventory = inventory
        self.connect_timeout = connect_timeout

    def host(self, name: str) -> Host:
        """The inventory's host ``name`` (not connected: states connect their own)."""
        return self.inventory.get_host(name)

    def names(self) -> list[str]:
        return [h.name for h in self.inventory]

    def state(self, names: Sequence[str], *callbacks: BaseStateCallback) -> State:
        """A fresh ``State`` over the hosts ``names`` (their data and the ``--data``
        overrides as in the inventory), running all of them in parallel."""
        hosts = [(n, self.host(n).data.dict()) for n in names]
        sub = Inventory((hosts, {}), override_data=self.inventory.get_override_data())
        config = Config(PARALLEL=max(1, len(names)), CONNECT_TIMEOUT=self.connect_timeout)
        state = State(sub, config, check_for_changes=False)
        for callback in callbacks:
            state.add_callback_handler(callback)
        return state
