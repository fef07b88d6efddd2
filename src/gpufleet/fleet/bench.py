"""``gpufleet bench``: vLLM's own ``vllm bench serve``, from the host's pinned image, against the
host's front, the blog's way by default (100 requests, 20 concurrent, random prompts).

Pure builders (the command, the table) and one run. The benchmark runs on the host in a
container of the release's image (``--network host``: it asks the front on the host's loopback,
as a client would, with the key from the root-only env file sourced inside the container: the
key is in no command line). Its JSON is kept next to the host's release record
(``releases/<id>/bench/``) and on the controller (``<state dir>/bench/<service>/<host>/``),
so ``--compare`` can set a run against an earlier one.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpufleet.fleet import session as fleet_session
from gpufleet.fleet.batches import order_hosts
from gpufleet.fleet.recorded import discover_service, read_states
from gpufleet.fleet.report import RolloutError
from gpufleet.model import names
from gpufleet.model.release import endpoint_of
from gpufleet.model.secrets import state_dir

ENV_IN_CONTAINER = "/run/gpufleet/service.env"
HF_CACHE = "/root/.cache/huggingface"
JSON_MARK = "##GPUFLEET_BENCH_JSON##"
# the key comes from the env file, inside the container; "$@" are vllm bench serve's arguments
ENTRY = (f'set -a && . {ENV_IN_CONTAINER} && set +a && export OPENAI_API_KEY="$VLLM_API_KEY" '
         '&& exec vllm bench serve "$@"')
# (label, JSON key, format) of the table, the blog's numbers
COLUMNS = (("req/s", "request_throughput", "{:.2f}"), ("out tok/s", "output_throughput", "{:.1f}"),
           ("TTFT p50 ms", "p50_ttft_ms", "{:.1f}"), ("TTFT p99 ms", "p99_ttft_ms", "{:.1f}"),
           ("TPOT p50 ms", "p50_tpot_ms", "{:.1f}"), ("TPOT p99 ms", "p99_tpot_ms", "{:.1f}"),
           ("failed", "failed", "{:.0f}"))


@dataclass(frozen=True)
class Workload:
    num_prompts: int = 100
    concurrency: int = 20
    input_len: int = 512
    output_len: int = 128

    def describe(self) -> str:
        return (f"{self.num_prompts} requests, {self.concurrency} concurrent, random prompts "
                f"{self.input_len} tokens in, {self.output_len} out")


def snapshot_dir(model: str, commit: str) -> str:
    """The staged snapshot inside the container (the tokenizer ``vllm bench`` loads offline)."""
    return f"{HF_CACHE}/hub/models--{model.replace('/', '--')}/snapshots/{commit}"


def bench_args(record: Mapping[str, Any], work: Workload, result_name: str,
               base_url: str | None = None) -> list[str]:
    """``vllm bench serve``'s arguments: against the host's own front, or ``base_url`` (the
    load balancer's address)."""
    url = base_url or endpoint_of(record)
    args = ["--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
            "--model", str(record.get("served_name") or record["model"]),
            "--tokenizer", snapshot_dir(str(record["model"]), str(record["revision"])),
            "--dataset-name", "random", "--random-input-len", str(work.input_len),
            "--random-output-len", str(work.output_len), "--num-prompts", str(work.num_prompts),
            "--max-concurrency", str(work.concurrency), "--ignore-eos",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--save-result", "--result-dir", "/results", "--result-filename", result_name,
            "--metadata", f"release={record['id']}", f"quantization={record.get('quantization')}"]
    if url.startswith("https:"):
        args.append("--insecure")  # the host asks itself by address, not by the cert's name
    return args


def host_command(service: str, record: Mapping[str, Any], work: Workload,
                 result_name: str, base_url: str | None = None) -> str:
    """The one shell command run on the host: the model store from the running container's
    mount, ``vllm bench serve`` in the release's image, then the result JSON after a marker."""
    container = str(record.get("container") or names.container_name(service))
    result_dir = f"{names.release_dir(service, str(record['id']))}/bench"
    mount = ('{{range .Mounts}}{{if eq .Destination "' + HF_CACHE + '"}}{{.Source}}{{end}}'
             '{{end}}')
    def words(*ws: str) -> list[str]:
        return [shlex.quote(w) for w in ws]

    docker = [*words("docker", "run", "--rm", "--network", "host", "-e", "HF_HUB_OFFLINE=1",
                     "-v", f"{record.get('env_file') or names.env_file(service)}:"
                     f"{ENV_IN_CONTAINER}:ro", "-v"),
              '"$models"' + shlex.quote(f":{HF_CACHE}:ro"),  # the store, read on the host
              *words("-v", f"{result_dir}:/results", "--entrypoint", "/bin/sh",
                     str(record["image"]), "-c", ENTRY, "vllm",
                     *bench_args(record, work, result_name, base_url))]
    quoted = " ".join(docker)
    return (f"set -e; models=$(docker inspect -f {shlex.quote(mount)} {shlex.quote(container)}); "
            f'[ -n "$models" ] || {{ echo "{container} is not running" >&2; exit 1; }}; '
            f"install -d -m 755 {shlex.quote(result_dir)}; {quoted} >&2; "
            f"echo {shlex.quote(JSON_MARK)}; cat {shlex.quote(result_dir + '/' + result_name)}")


def parse_output(lines: Sequence[str]) -> dict[str, Any] | None:
    if JSON_MARK not in lines:
        return None
    text = "\n".join(lines[list(lines).index(JSON_MARK) + 1:])
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """The blog's numbers from vLLM's result JSON (and what was run, for --compare)."""
    keys = [key for _, key, _ in COLUMNS] + ["completed", "duration", "num_prompts",
                                             "max_concurrency", "release", "quantization",
                                             "date"]
    return {k: result.get(k) for k in keys}


def table(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    head = ["run", *[label for label, _, _ in COLUMNS]]
    body = [[name, *[fmt.format(r[key]) if isinstance(r.get(key), (int, float)) else "-"
                     for _, key, fmt in COLUMNS]] for name, r in rows]
    if len(rows) == 2:
        (_, a), (_, b) = rows
        body.append(["ratio", *[f"{b[key] / a[key]:.2f}x"
                                if isinstance(a.get(key), (int, float)) and a.get(key)
                                and isinstance(b.get(key), (int, float)) else "-"
                                for _, key, _ in COLUMNS]])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                     for r in [head, *body]) + "\n"


def local_dir(service: str, host: str, environ: Mapping[str, str] | None = None) -> Path:
    return state_dir(dict(os.environ) if environ is None else environ) / "bench" / service / host


def earlier(service: str, host: str, before: str) -> Path | None:
    """The newest run of this host kept on the controller before ``before`` (a file name)."""
    runs = sorted(p for p in local_dir(service, host).glob("*.json") if p.name < before)
    return runs[-1] if runs else None


def run_bench(inventory_path: str, host: str | None = None, service: str | None = None,
              work: Workload | None = None, data: Mapping[str, Any] | None = None,
              base_url: str | None = None) -> tuple[str, str, dict[str, Any], Path]:
    """Benchmark one host (default: the first by name with a current release), or with
    ``base_url`` the load balancer, from that host. Returns the service, the host (``lb``
    for the load balancer), vLLM's result JSON and where the controller keeps it."""
    work = work or Workload()
    session = fleet_session.FleetSession(fleet_session.load_inventory(inventory_path, data))
    candidates = order_hosts(session.names()) if host is None else [host]
    if host is not None and host not in session.names():
        raise RolloutError(f"{host} is not in the inventory")
    state = session.state(candidates)
    try:
        hosts = fleet_session.connect(state)
        if not hosts:
            raise RolloutError("no host answers on SSH")
        found = discover_service(state, hosts, service)
        states = read_states(state, hosts, found)
        chosen = next((h for h in hosts if states[h.name]["current"]), None)
        if chosen is None:
            raise RolloutError("no host has a current release to benchmark: deploy first")
        record = states[chosen.name]["releases"][states[chosen.name]["current"]]
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        name = f"{stamp}-{record['id']}.json"
        ok, lines = fleet_session.shell(state, [chosen], lambda h: host_command(
            found, record, work, name, base_url), timeout=3600)[chosen.name]
    finally:
        fleet_session.shutdown(state)
    result = parse_output(lines)
    if not ok or result is None:
        tail = " ".join(line for line in lines if line != JSON_MARK)[-600:]
        raise RolloutError(f"vllm bench serve failed on {chosen.name}: {tail or 'no output'}")
    label = "lb" if base_url else chosen.name
    keep = local_dir(found, label)
    keep.mkdir(parents=True, exist_ok=True)
    (keep / name).write_text(json.dumps(result, sort_keys=True) + "\n")
    return found, label, result, keep / name
