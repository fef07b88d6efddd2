"""``gpufleet plan SPEC --gpu all``: every catalogue size side by side, cheapest that fits first,
prices from the catalogue or from the (lab's emulated) ``GET /v2/sizes``, and its exit status.

No Hub (``--offline`` and the built-in shapes), no hosts; the API is the lab's emulator in
process.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpufleet.cli import plan as plan_cli
from gpufleet.model import gpus as gpu_catalog
from gpufleet.planner.plan import plan_for_spec
from gpufleet.planner.shapes import KNOWN_SHAPES
from gpufleet.planner.sizes import CATALOGUE, NO_REGION, NOT_LISTED, choose_plan
from gpufleet_lab.do_emulator import EmulatorServer, base_url, make_server

TOKEN = "dop_v1_plan-all-test-secret"
L8 = "meta-llama/Meta-Llama-3-8B-Instruct"
L70 = "meta-llama/Meta-Llama-3-70B-Instruct"
SLUGS = [s.slug for s in gpu_catalog.SIZES]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither the Hub nor a real DigitalOcean account: only what a test sets."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("HF_TOKEN", "HF_ENDPOINT", "DIGITALOCEAN_TOKEN", "DIGITALOCEAN_ACCESS_TOKEN",
                 "DIGITALOCEAN_API_URL"):
        monkeypatch.delenv(name, raising=False)


def write_spec(tmp_path: Path, model: str = L8, **keys: Any) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "service": "llama3", "model": model, "image": "vllm/vllm-openai:v0.11.0",
        "quantization": "fp8", "gpu_memory_utilization": 0.9, "max_model_len": 8192,
        "max_num_seqs": 32, **keys}))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = plan_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, dict[str, Any]]:
    code, out, err = run(capsys, *argv, "--json")
    assert err == ""
    return code, json.loads(out)


@pytest.fixture
def emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    servers: list[EmulatorServer] = []

    def start(**options: Any) -> EmulatorServer:
        server = make_server("127.0.0.1", 0, TOKEN, [], **options)
        server.start_background()
        servers.append(server)
        monkeypatch.setenv("DIGITALOCEAN_TOKEN", TOKEN)
        monkeypatch.setenv("DIGITALOCEAN_API_URL", base_url(server))
        return server

    yield start
    for server in servers:
        server.close()


# -- the rows ----------------------------------------------------------------------------------


def test_every_size_once_fitting_ones_cheapest_first(tmp_path, capsys) -> None:
    code, data = run_json(capsys, write_spec(tmp_path), "--gpu", "all", "--offline")
    rows = data["sizes"]
    assert sorted(r["slug"] for r in rows) == sorted(SLUGS)
    assert code == plan_cli.EXIT_OK and data["ok"] is True and data["prices_from"] == CATALOGUE
    # Llama 3 8B in fp8 fits every size: priced ones cheapest first, then those without a price
    assert all(r["fits"] for r in rows)
    priced = [r["price_hourly"] for r in rows if r["price_hourly"] is not None]
    assert priced == sorted(priced) and len(priced) == 5
    assert [r["slug"] for r in rows if r["price_hourly"] is None] == [
        "gpu-h200x1-141gb", "gpu-h200x8-1128gb"]
    assert rows[0]["slug"] == "gpu-4000adax1-20gb" and rows[0]["price_hourly"] == 0.76
    for row in rows:  # the catalogue's price, its quantization, the plan's own numbers
        assert row["price_hourly"] == gpu_catalog.lookup(row["slug"]).price_hourly
        assert row["quantization"] == "fp8" and row["available"] is None
        assert row["kv_cache_tokens"] == row["plan"]["kv_cache_tokens"]
        assert row["tensor_parallel_size"] == row["plan"]["tensor_parallel_size"]


def test_refused_sizes_come_after_the_fitting_ones_with_their_reason(tmp_path, capsys) -> None:
    code, data = run_json(capsys, write_spec(tmp_path, L70, quantization="fp16"),
                          "--gpu", "all", "--offline")
    rows = data["sizes"]
    verdicts = [r["fits"] for r in rows]
    assert verdicts == sorted(verdicts, reverse=True) and True in verdicts and False in verdicts
    refused = [r for r in rows if not r["fits"]]
    assert {r["slug"] for r in refused} >= {"gpu-4000adax1-20gb", "gpu-h100x1-80gb"}
    assert all(r["verdict"] == "refused" and r["reason"].startswith("weights ") for r in refused)
    # 70B in 16 bits: the 8 x H100 size fits with tensor parallelism, so the command succeeds
    h100x8 = next(r for r in rows if r["slug"] == "gpu-h100x8-640gb")
    assert h100x8["fits"] and h100x8["tensor_parallel_size"] > 1
    assert code == plan_cli.EXIT_OK


def test_the_table_has_one_line_per_size_and_names_the_cheapest(tmp_path, capsys) -> None:
    code, out, err = run(capsys, write_spec(tmp_path), "--gpu", "ALL", "--offline")
    assert code == plan_cli.EXIT_OK and err == ""
    lines = out.splitlines()
    assert lines[1].startswith("prices: " + gpu_catalog.PRICE_SOURCE)
    head = next(i for i, line in enumerate(lines) if line.startswith("size "))
    body = lines[head + 1: head + 1 + len(SLUGS)]
    assert [line.split()[0] for line in body] == [
        "gpu-4000adax1-20gb", "gpu-l40sx1-48gb", "gpu-6000adax1-48gb", "gpu-h100x1-80gb",
        "gpu-h100x8-640gb", "gpu-h200x1-141gb", "gpu-h200x8-1128gb"]
    assert "$0.76" in body[0] and "1 x 20.0 GiB" in body[0] and " fp8 " in body[0]
    assert body[-1].split()[5] == "?"      # size, "8 x 140.4 GiB", then no list price
    assert "cheapest that fits: gpu-4000adax1-20gb ($0.76/hour, fp8, tensor parallel 1)" in out
    assert "also fit, price unknown: gpu-h200x1-141gb, gpu-h200x8-1128gb" in out


def test_each_size_gets_the_first_quantization_that_fits(tmp_path, capsys) -> None:
    spec_path = write_spec(tmp_path)
    _, data = run_json(capsys, spec_path, "--gpu", "all", "--offline",
                       "--quantization", "fp16,fp8")
    spec = plan_cli.load_spec(spec_path, environ={})
    for row in data["sizes"]:
        size = gpu_catalog.lookup(row["slug"])
        plans = [plan_for_spec(spec, KNOWN_SHAPES[L8], [size.gpu], quantization=q, label=q)
                 for q in ("fp16", "fp8")]
        assert row["quantization"] == choose_plan(plans).quantization
        assert row["verdict"] == choose_plan(plans).verdict


def test_exit_3_when_no_size_fits(tmp_path, capsys) -> None:
    code, data = run_json(capsys, write_spec(tmp_path, gpu_count=16), "--gpu", "all",
                          "--offline")
    assert code == plan_cli.EXIT_REFUSED and data["ok"] is False
    assert not any(r["fits"] for r in data["sizes"])
    code, out, _ = run(capsys, write_spec(tmp_path, gpu_count=16), "--gpu", "all",
                       "--offline")
    assert code == plan_cli.EXIT_REFUSED and out.rstrip().endswith("no size fits")


def test_bad_input_is_exit_2(tmp_path, capsys) -> None:
    code, out, err = run(capsys, write_spec(tmp_path), "--gpu", "all", "--offline",
                         "--quantization", "int3")
    assert code == plan_cli.EXIT_INPUT and out == "" and "int3" in err
    assert len(err.strip().splitlines()) == 1


# -- prices and availability from GET /v2/sizes ------------------------------------------------


def test_prices_and_availability_come_from_the_api(tmp_path, capsys, emulator) -> None:
    server = emulator(unavailable_sizes=["gpu-h100x8-640gb"])
    code, data = run_json(capsys, write_spec(tmp_path), "--gpu", "all")
    assert code == plan_cli.EXIT_OK and data["prices_from"] == "api"
    assert base_url(server) in data["price_source"]
    by_slug = {r["slug"]: r for r in data["sizes"]}
    assert by_slug["gpu-h100x1-80gb"]["available"] == "yes"
    assert by_slug["gpu-h100x1-80gb"]["price_source"] == "api"
    assert by_slug["gpu-h100x8-640gb"]["available"] == NO_REGION
    assert by_slug["gpu-h200x1-141gb"]["available"] == NOT_LISTED
    # unavailable sizes sort after the ones the account can buy
    assert [r["available"] for r in data["sizes"]][-3:] == [NO_REGION, NOT_LISTED, NOT_LISTED]
    # the emulator's lab-only GPU sizes are not in the catalogue: named, not planned
    assert {u["slug"] for u in data["uncatalogued"]} == {"gpu-h100x2-160gb", "gpu-t4x1-16gb"}
    assert ("GET", "/v2/sizes?per_page=200") in server.state.requests


def test_exit_3_when_only_sizes_the_account_cannot_buy_fit(tmp_path, capsys, emulator) -> None:
    emulator(unavailable_sizes=["gpu-h100x8-640gb"])
    code, out, err = run(capsys, write_spec(tmp_path, L70, quantization="fp16"),
                         "--gpu", "all")
    assert code == plan_cli.EXIT_REFUSED, out + err
    assert "no size fits that this account can buy" in out
    assert "not planned, not in gpufleet's GPU catalogue: gpu-h100x2-160gb ($6.78/hour)" in out


def test_a_failing_api_falls_back_to_the_catalogue(tmp_path, capsys, emulator,
                                                   monkeypatch) -> None:
    emulator()
    monkeypatch.setenv("DIGITALOCEAN_TOKEN", "dop_v1_wrong-token")
    code, out, err = run(capsys, write_spec(tmp_path), "--gpu", "all")
    assert code == plan_cli.EXIT_OK and err == ""
    assert "GET /v2/sizes failed: " in out and "401" in out
    assert "dop_v1_wrong-token" not in out
    assert "$0.76" in out


def test_offline_does_not_ask_the_api(tmp_path, capsys, emulator) -> None:
    server = emulator()
    _, data = run_json(capsys, write_spec(tmp_path), "--gpu", "all", "--offline")
    assert data["prices_from"] == CATALOGUE and "--offline" in data["price_source"]
    assert server.state.requests == []


def test_every_catalogue_price_is_cited_or_left_empty() -> None:
    """A list price is in the catalogue only with its source: the module's docstring quotes it."""
    doc = gpu_catalog.__doc__ or ""
    assert "docs.digitalocean.com/products/droplets/details/pricing/" in doc
    for size in gpu_catalog.SIZES:
        if size.price_hourly is not None:
            assert size.price_hourly > 0 and f"${size.price_hourly:.2f}" in doc, size.slug
    assert gpu_catalog.lookup("h200").price_hourly is None     # no DigitalOcean page found


def test_a_fragile_cheapest_size_names_the_cheapest_clean_one_too(tmp_path, capsys) -> None:
    code, out, _ = run(capsys, write_spec(tmp_path, quantization="fp16"), "--gpu", "all",
                       "--offline")
    # Llama 3 8B in 16 bits on the 20 GB RTX 4000 Ada starts, with little room for the KV cache
    assert code == plan_cli.EXIT_OK
    first = next(line for line in out.splitlines() if line.startswith("gpu-"))
    assert first.split()[0] == "gpu-4000adax1-20gb" and " fragile " in first
    assert "KV cache" in first                                 # the warning, in one line
    assert ("cheapest that fits: gpu-4000adax1-20gb ($0.76/hour, fp16, tensor parallel 1, "
            "fragile)") in out
    assert "cheapest that fits without warnings: gpu-l40sx1-48gb ($1.57/hour" in out
