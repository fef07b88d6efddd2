"""What a host's deploy hands back to the fleet driver that ran it: its release, its health gate.

A pyinfra ``@deploy`` returns what its function returns (``vllm_service`` returns a
:class:`DeployResult`), but the rollout driver runs a deploy *file* (``deploys/llama3.py``), whose
module-level calls return nothing to it. So the deploy also hands its result back here, once per
host, for the pyinfra ``State`` it is defined in; the driver reads it after defining the deploy:

* ``release``: the release the deploy records on the host (computed on the controller when the
  deploy is defined), the rollout's target for that host;
* ``health_gate``: the ``OperationMeta`` of the operation that proves the endpoint answers
  (``vllm.endpoint_verified``): the driver reports "waiting for health" and the time spent in
  health gates by that handle, not by an operation's name.

Results live as long as their ``State``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from pyinfra.api import State
from pyinfra.api.host import Host
from pyinfra.api.operation import OperationMeta
from pyinfra.context import ctx_host, ctx_state

from gpufleet.model.release import Release


@dataclass(frozen=True)
class DeployResult:
    health_gate: OperationMeta
    release: Release | None = None  # None: the deploy restores a recorded release


_RESULTS: weakref.WeakKeyDictionary[State, dict[str, DeployResult]] = (
    weakref.WeakKeyDictionary())


def hand_back(result: DeployResult) -> DeployResult:
    """Keep ``result`` for the current host of the current ``State`` (call it from a deploy)."""
    state, host = ctx_state.get(), ctx_host.get()
    if isinstance(state, State):
        _RESULTS.setdefault(state, {})[host.name] = result
    return result


def results_of(state: State) -> dict[str, DeployResult]:
    """Host name -> what its deploy handed back, for the hosts whose deploy did."""
    return dict(_RESULTS.get(state, {}))


def is_health_gate(state: State, host: Host, op_hash: str) -> bool:
    """Whether ``op_hash`` is the health gate of ``host``'s deploy in ``state``."""
    result = _RESULTS.get(state, {}).get(host.name)
    op = state.ops.get(host, {}).get(op_hash)
    return result is not None and op is not None and op.operation_meta is result.health_gate


def any_health_gate(state: State, op_hash: str) -> bool:
    """Whether ``op_hash`` is the health gate of any host's deploy in ``state``."""
    return any(is_health_gate(state, host, op_hash) for host in list(state.ops))
