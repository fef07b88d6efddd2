"""``gpufleet plan``: will the spec's model fit on a GPU, with which flags, before any host changes.

    gpufleet plan deploys/llama3.yaml --gpu rtx4000ada --quantization fp16,fp8,awq
    gpufleet plan deploys/llama3.yaml --host-fact facts.json     # pyinfra ... fact NvidiaGpus
    gpufleet plan deploys/llama3.yaml --local --json              # this machine's nvidia-smi

The model's shape comes from ``--model-shape FILE`` (JSON of ``ModelShape.to_json()``), else
from the Hub (``gpufleet.clients.hub.model_shape``, with ``HF_TOKEN`` and ``HF_ENDPOINT``),
else, offline (``--offline``, ``HF_HUB_OFFLINE=1`` or the Hub failing), from
``gpufleet.planner.shapes.KNOWN_SHAPES``.
With a host's fact (``--host-fact``, ``--local``) the image is also checked against its NVIDIA
driver, as the deploy checks it (``gpufleet.model.image_cuda``).
Exit status: 0 when every plan fits (``fits`` or ``fragile``), 3 when one is refused, a host
has no usable GPU or its driver cannot run the image, 2 for bad input.

    gpufleet plan deploys/llama3.yaml --gpu all --quantization fp16,fp8 --offline

``--gpu all`` plans every DigitalOcean GPU size of the catalogue, one row per size: the first of
the quantizations (in the order given) that fits, else the first fragile one, else the first;
sizes that fit first, cheapest first, then the refused ones. Prices per hour: the catalogue's
list prices, or, when ``DIGITALOCEAN_TOKEN`` (or ``DIGITALOCEAN_ACCESS_TOKEN``) is set and not
``--offline``, ``price_hourly`` and availability from ``GET /v2/sizes`` at
``DIGITALOCEAN_API_URL`` (default the real API); the output says which. Its exit status: 0 when
at least one size fits and the account is not known to be unable to buy it, 3 when none does,
2 for bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pyinfra.api.exceptions import PyinfraError

from gpufleet.cli import plan_sizes
from gpufleet.cli.data import parse_data
from gpufleet.model import gpus as gpu_catalog
from gpufleet.model import image_cuda
from gpufleet.model.gpus import Gpu
from gpufleet.model.model_shape import ModelShape
from gpufleet.model.spec import ServiceSpec, load_spec
from gpufleet.model.vllm_args import QUANTIZATION_FLAGS
from gpufleet.planner.plan import Plan, plan_for_spec
from gpufleet.planner.render import render_table
from gpufleet.planner.shapes import known_shape

EXIT_OK, EXIT_INPUT, EXIT_REFUSED = 0, 2, 3
_TRUE = ("1", "true", "yes", "on")


class PlanInputError(PyinfraError):
    """Bad input to ``gpufleet plan``: the message says what and how to fix it."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``gpufleet plan`` on the ``gpufleet`` sub-command parsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "plan", help="plan GPU memory, tensor parallelism and vLLM flags for a spec",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path, nargs="?", default=Path("deploys/llama3.yaml"))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gpu", metavar="NAME",
                        help=f"a DigitalOcean GPU size or alias, or {plan_sizes.ALL!r} for every "
                             "size side by side with its price: " + ", ".join(gpu_catalog.names()))
    source.add_argument("--gpus-json", type=Path, metavar="FILE",
                        help="JSON list of GPUs (name, memory_mib, compute_capability[, count])")
    source.add_argument("--host-fact", type=Path, metavar="FILE",
                        help="output of `pyinfra INVENTORY fact gpufleet.facts.nvidia.NvidiaGpus`"
                             " (host -> fact), or one fact")
    source.add_argument("--local", action="store_true",
                        help="read this machine's GPUs with nvidia-smi")
    parser.add_argument("--quantization", metavar="Q1,Q2,...",
                        help="plan these instead of the spec's, side by side: "
                             + "|".join(QUANTIZATION_FLAGS))
    parser.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec key, as pyinfra --data does")
    parser.add_argument("--model-shape", type=Path, metavar="FILE",
                        help="JSON of ModelShape.to_json(); skips the Hub")
    parser.add_argument("--offline", action="store_true",
                        help="do not ask the Hub (--model-shape or the built-in shapes) nor, "
                             "with --gpu all, the DigitalOcean API (catalogue list prices)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(func=cmd_plan)
    return parser


# -- inputs ------------------------------------------------------------------------------------


def _read_structured(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PlanInputError(f"cannot read {path}: {e.strerror}") from e
    try:
        return yaml.safe_load(text)     # JSON is YAML; pyinfra-style fixtures too
    except yaml.YAMLError as e:
        raise PlanInputError(f"{path} is not JSON or YAML: {e}") from e


def load_model_shape(path: Path) -> ModelShape:
    data = _read_structured(path)
    if not isinstance(data, dict):
        raise PlanInputError(f"{path}: expected a JSON object of ModelShape.to_json()")
    names = {f.name for f in dataclasses.fields(ModelShape)}
    try:
        return ModelShape.from_json({k: v for k, v in data.items() if k in names})
    except TypeError as e:
        raise PlanInputError(f"{path}: not a ModelShape: {e}") from e


def resolve_shape(spec: ServiceSpec, model_shape: Path | None, offline: bool,
                  environ: Mapping[str, str]) -> tuple[ModelShape, str]:
    """The model's shape and where it came from (said in the output)."""
    if model_shape is not None:
        return load_model_shape(model_shape), f"file {model_shape}"
    problem = "offline"
    if not offline and environ.get("HF_HUB_OFFLINE", "").lower() not in _TRUE:
        try:  # lazy: the Hub client is only needed here
            hub = importlib.import_module("gpufleet.clients.hub")
        except ImportError as e:
            problem = f"gpufleet.clients.hub is not available ({e})"
        else:
            try:
                shape = hub.model_shape(spec.model, spec.revision,
                                        token=environ.get("HF_TOKEN") or None,
                                        endpoint=environ.get("HF_ENDPOINT") or None)
                return shape, f"the Hub at revision {spec.revision}"
            except Exception as e:  # any Hub failure: fall back to a built-in shape, say why
                problem = f"the Hub failed: {type(e).__name__}: {e}"
    shape = known_shape(spec.model)
    if shape is None:
        raise PlanInputError(
            f"cannot get the shape of {spec.model} ({problem}) and it is not one of the "
            "built-in shapes: pass --model-shape FILE (JSON of ModelShape.to_json())")
    return shape, f"built-in shape, not pinned to a revision ({problem})"


def _facts_by_host(data: Any, source: str) -> dict[str, Any]:
    """``{host: fact}`` from pyinfra's fact JSON, one fact, or a pyinfra-testing fixture."""
    if isinstance(data, dict) and isinstance(data.get("fact"), dict) and "command" in data:
        data = data["fact"]                                    # tests/facts/*.yaml
    if isinstance(data, dict) and ("gpus" in data or "installed" in data):
        return {source: data}
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        return dict(data)
    raise PlanInputError(f"{source}: expected the NvidiaGpus fact or a mapping host -> fact")


def local_fact() -> dict[str, Any]:
    """This machine's NvidiaGpus fact, running the fact's own command."""
    from gpufleet.facts.nvidia import NvidiaGpus

    fact = NvidiaGpus()
    try:
        done = subprocess.run(["sh", "-c", fact.command()], capture_output=True, text=True,
                              timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PlanInputError(f"cannot run nvidia-smi here: {e}") from e
    return fact.process(done.stdout.splitlines())


def host_facts(args: argparse.Namespace) -> dict[str, Any] | None:
    """Host name -> its NvidiaGpus fact, for ``--local`` and ``--host-fact`` (else None)."""
    if args.local:
        return {"localhost": local_fact()}
    if args.host_fact:
        return _facts_by_host(_read_structured(args.host_fact), str(args.host_fact))
    return None


def gpu_sources(args: argparse.Namespace, facts: dict[str, Any] | None = None
                ) -> dict[str, list[Gpu] | str]:
    """Host name -> its GPUs, or why it has none (``facts``: already read by host_facts)."""
    if args.gpu:
        try:
            size = gpu_catalog.lookup(args.gpu)
        except KeyError as e:
            raise PlanInputError(str(e.args[0])) from None
        return {size.slug: [size.gpu]}
    if args.gpus_json:
        data = _read_structured(args.gpus_json)
        if isinstance(data, dict) and "gpus" in data:
            data = data["gpus"]
        if not isinstance(data, list) or not data:
            raise PlanInputError(f"{args.gpus_json}: expected a list of GPUs")
        try:
            return {str(args.gpus_json): gpu_catalog.group(
                [gpu_catalog.gpu_from_dict(g) for g in data])}
        except (ValueError, TypeError, AttributeError) as e:
            raise PlanInputError(f"{args.gpus_json}: {e}") from e
    out: dict[str, list[Gpu] | str] = {}
    for host, fact in (facts if facts is not None else host_facts(args) or {}).items():
        try:
            out[host] = gpu_catalog.gpus_from_fact(fact)
        except (ValueError, TypeError, KeyError) as e:
            out[host] = str(e)
    return out


# -- the command -------------------------------------------------------------------------------


def driver_verdicts(spec: ServiceSpec, facts: dict[str, Any] | None
                    ) -> dict[str, image_cuda.DriverVerdict]:
    """Host name -> whether its driver runs the spec's image, as the deploy decides it."""
    return {host: image_cuda.driver_verdict(spec.image, image_cuda.fact_driver(fact),
                                            spec.image_cuda)
            for host, fact in (facts or {}).items() if image_cuda.fact_driver(fact)}


def driver_line(verdict: image_cuda.DriverVerdict, driver: str | None) -> str:
    if verdict.problem:
        return f"image refused: {verdict.problem}"
    return f"image: {verdict.note}" if verdict.note else \
        f"image: {verdict.image} runs on driver {driver}"


@dataclasses.dataclass(frozen=True)
class Request:
    """What every plan of one ``gpufleet plan`` run shares."""

    spec: ServiceSpec
    quantizations: list[str]
    util: float | None
    shape: ModelShape
    shape_source: str


def make_request(args: argparse.Namespace, environ: Mapping[str, str]) -> Request:
    """The spec (with ``--data``), the quantizations to compare and the model's shape."""
    overrides: dict[str, Any] = parse_data(args.data)
    # gpu_memory_utilization goes to the planner unvalidated, so that 1.0 is refused *with
    # numbers* rather than by the spec validator
    util: float | None = None
    if "gpu_memory_utilization" in overrides:
        raw = overrides.pop("gpu_memory_utilization")
        try:
            util = float(raw)
        except ValueError:
            raise PlanInputError(f"gpu_memory_utilization must be a number, got {raw!r}") from None
    spec = load_spec(args.spec, overrides=overrides, environ=environ)
    quantizations = [q.strip() for q in (args.quantization or spec.quantization).split(",")
                     if q.strip()]
    for q in quantizations:
        if q not in QUANTIZATION_FLAGS:
            raise PlanInputError(f"--quantization {q!r}: must be one of "
                                 + ", ".join(QUANTIZATION_FLAGS))
    shape, shape_source = resolve_shape(spec, args.model_shape, args.offline, environ)
    return Request(spec, quantizations, util, shape, shape_source)


def make_plans(args: argparse.Namespace, environ: Mapping[str, str],
               facts: dict[str, Any] | None = None,
               ) -> tuple[ServiceSpec, ModelShape, str, dict[str, list[Plan] | str]]:
    req = make_request(args, environ)
    result: dict[str, list[Plan] | str] = {}
    for host, gpus in gpu_sources(args, facts).items():
        if isinstance(gpus, str):
            result[host] = gpus
            continue
        result[host] = [plan_for_spec(req.spec, req.shape, gpus, quantization=q,
                                      gpu_memory_utilization=req.util, label=q)
                        for q in req.quantizations]
    return req.spec, req.shape, req.shape_source, result


def cmd_plan_all(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """``--gpu all``: every catalogue size, one row each (see the module docstring)."""
    req = make_request(args, environ)
    plans = {size.slug: [plan_for_spec(req.spec, req.shape, [size.gpu], quantization=q,
                                       gpu_memory_utilization=req.util, label=q)
                         for q in req.quantizations]
             for size in gpu_catalog.SIZES}
    report = plan_sizes.compare(plans, plan_sizes.gather_offers(environ, offline=args.offline))
    header = {"spec": str(args.spec), "model": req.shape.model, "revision": req.spec.revision,
              "commit": req.shape.commit, "shape_source": req.shape_source}
    if args.json:
        print(json.dumps({**header, "shape": req.shape.to_json(), **report.to_json()}, indent=2))
    else:
        print(f"{args.spec}: {req.spec.model} (revision {req.spec.revision}; shape from "
              f"{req.shape_source})")
        print(report.render())
    return EXIT_OK if report.ok else EXIT_REFUSED


def cmd_plan(args: argparse.Namespace) -> int:
    if plan_sizes.is_all(args.gpu):
        return cmd_plan_all(args, os.environ)
    facts = None if args.gpu or args.gpus_json else host_facts(args)
    spec, shape, shape_source, result = make_plans(args, os.environ, facts)
    drivers = driver_verdicts(spec, facts)
    refused = any(isinstance(v, str) or any(not p.fits for p in v) for v in result.values()) \
        or any(v.problem for v in drivers.values())
    if args.json:
        print(json.dumps({
            "spec": str(args.spec),
            "model": shape.model,
            "revision": spec.revision,
            "commit": shape.commit,
            "shape_source": shape_source,
            "shape": shape.to_json(),
            "hosts": [
                ({"host": host, "error": v} if isinstance(v, str)
                 else {"host": host, "plans": [p.to_json() for p in v]})
                | ({"image": dataclasses.asdict(drivers[host])} if host in drivers else {})
                for host, v in result.items()],
            "ok": not refused,
        }, indent=2))
    else:
        print(f"{args.spec}: {spec.model} (revision {spec.revision}; shape from {shape_source})")
        for host, v in result.items():
            print()
            print(f"== {host} ==")
            print(f"cannot plan: {v}" if isinstance(v, str) else render_table(v))
            if host in drivers:
                print(driver_line(drivers[host], image_cuda.fact_driver((facts or {})[host])))
    return EXIT_REFUSED if refused else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``python -m gpufleet.cli.plan ...`` (the same as ``gpufleet plan ...``)."""
    parser = argparse.ArgumentParser(prog="gpufleet")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *(argv if argv is not None else sys.argv[1:])])
    try:
        return int(args.func(args))
    except PyinfraError as e:
        print(f"gpufleet: {e}", file=sys.stderr)
        return EXIT_INPUT


if __name__ == "__main__":
    sys.exit(main())
