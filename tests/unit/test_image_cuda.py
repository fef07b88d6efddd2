"""The driver floor of a vllm/vllm-openai tag, checked per host before the pull: the one table
(gpufleet.model.image_cuda), the spec's image_cuda, the deploy's host_image and gpufleet plan.
Facts are the real H100 recording (driver 580.159.04), with only the driver column changed for
the older drivers."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpufleet.cli import plan as plan_cli
from gpufleet.deploy import service
from gpufleet.model import image_cuda
from gpufleet.model.release import release_for
from gpufleet.model.spec import SpecError, build_spec
from gpufleet.model.vllm_version import PINNED_IMAGE
from gpufleet.planner.shapes import KNOWN_SHAPES

ROOT = Path(__file__).resolve().parents[2]
RECORDED = yaml.safe_load((ROOT / "tests/facts/nvidia.NvidiaGpus/h100_recorded.yaml").read_text())
NEW, CU129_ONLY, TOO_OLD = "580.159.04", "575.57.08", "570.133.20"
CU129 = PINNED_IMAGE + "-cu129"
BASE = {"service": "llama3", "model": "meta-llama/Meta-Llama-3-8B-Instruct",
        "image": PINNED_IMAGE}


def fact(driver: str = NEW) -> dict[str, Any]:
    out = copy.deepcopy(RECORDED["fact"])
    for gpu in out["gpus"]:
        gpu["driver_version"] = driver
    return out


def test_the_recording_is_new_enough_for_the_pinned_cuda_13_image():
    assert image_cuda.fact_driver(fact()) == NEW == "580.159.04"
    assert image_cuda.image_build(PINNED_IMAGE) == image_cuda.CUDA_13_0
    assert image_cuda.driver_verdict(PINNED_IMAGE, NEW) == image_cuda.DriverVerdict(
        PINNED_IMAGE, None, None)


@pytest.mark.parametrize(("image", "cuda", "floor"), [
    ("vllm/vllm-openai:v0.32.0", "13.0", "580.65.06"),
    ("vllm/vllm-openai:v0.32.0-cu129", "12.9", "575.51.03"),
    ("vllm/vllm-openai:v0.20.0", "13.0", "580.65.06"),
    ("vllm/vllm-openai:v0.20.0-cu130", "13.0", "580.65.06"),
    ("docker.io/vllm/vllm-openai:v0.20.0-cu129", "12.9", "575.51.03"),
    ("vllm/vllm-openai:v0.19.1", "12.8", "570.26"),
    ("vllm/vllm-openai:v0.19.1-cu130", "13.0", "580.65.06"),
    ("vllm/vllm-openai:v0.11.0", "12.8", "570.26"),
])
def test_the_table_flips_at_v0_20_0(image, cuda, floor):
    build = image_cuda.image_build(image)
    assert build is not None and (build.cuda, build.driver_floor) == (cuda, floor)


@pytest.mark.parametrize("image", [
    "vllm/vllm-openai@sha256:" + "a" * 64, "vllm/vllm-openai:nightly",
    "vllm/vllm-openai:v0.26.0-ubuntu2404", "vllm/vllm-openai:v0.32.0-cu130",
    "example.org/me/vllm:v0.32.0"])
def test_no_version_tag_or_digest_is_not_judged(image):
    verdict = image_cuda.driver_verdict(image, TOO_OLD)
    assert verdict.problem is None and verdict.image == image
    assert "not known" in verdict.note


def test_driver_versions_compare_numerically():
    assert image_cuda.driver_version("570.26") == image_cuda.driver_version("570.26.00")
    assert image_cuda.driver_version("580.159.04") > image_cuda.driver_version("580.65.06")
    assert image_cuda.runs_on(image_cuda.CUDA_13_0, "580.65.06")
    assert not image_cuda.runs_on(image_cuda.CUDA_13_0, "575.64.05")


def test_too_old_pinned_names_the_tag_that_would_run():
    verdict = image_cuda.driver_verdict(PINNED_IMAGE, CU129_ONLY, image_cuda.PINNED)
    assert verdict.image == PINNED_IMAGE
    assert verdict.problem == (
        f"driver {CU129_ONLY} is older than 580.65.06, which {PINNED_IMAGE} (CUDA 13.0) needs: "
        f"upgrade the driver, or pin {CU129} (CUDA 12.9, driver >= 575.51.03), or set "
        "image_cuda: match_driver")


def test_too_old_with_match_driver_runs_the_cu129_tag():
    verdict = image_cuda.driver_verdict(PINNED_IMAGE, CU129_ONLY, image_cuda.MATCH_DRIVER)
    assert verdict.problem is None and verdict.image == CU129
    assert f"runs {CU129}" in verdict.note


@pytest.mark.parametrize("mode", image_cuda.MODES)
def test_too_old_for_every_build_says_how_far_to_upgrade(mode):
    verdict = image_cuda.driver_verdict(PINNED_IMAGE, TOO_OLD, mode)
    assert verdict.image == PINNED_IMAGE
    assert verdict.problem == (
        f"driver {TOO_OLD} is older than 580.65.06, which {PINNED_IMAGE} (CUDA 13.0) needs: "
        f"upgrade the driver (at least to 575.51.03 for {CU129}, CUDA 12.9)")


def test_match_driver_keeps_a_tag_the_driver_runs():
    assert image_cuda.driver_verdict(CU129, NEW, image_cuda.MATCH_DRIVER).image == CU129
    assert image_cuda.driver_verdict(PINNED_IMAGE, NEW, image_cuda.MATCH_DRIVER).image \
        == PINNED_IMAGE


def test_before_v0_20_match_driver_falls_back_from_cu130_to_cuda_12():
    verdict = image_cuda.driver_verdict("vllm/vllm-openai:v0.11.0-cu130", TOO_OLD,
                                        image_cuda.MATCH_DRIVER)
    assert verdict.image == "vllm/vllm-openai:v0.11.0" and verdict.problem is None


def test_unknown_driver_is_left_to_the_gpu_check():
    assert image_cuda.fact_driver({"installed": False, "gpus": []}) is None
    assert image_cuda.driver_verdict(PINNED_IMAGE, None).problem is None


# -- the spec ------------------------------------------------------------------------------------


def test_image_cuda_defaults_to_pinned_and_takes_match_driver():
    assert build_spec(BASE).image_cuda == "pinned"
    assert build_spec({**BASE, "image_cuda": "match_driver"}).image_cuda == "match_driver"
    with pytest.raises(SpecError, match="image_cuda must be one of pinned, match_driver"):
        build_spec({**BASE, "image_cuda": "auto"})


@pytest.mark.parametrize("image", ["vllm/vllm-openai@sha256:" + "a" * 64,
                                   "example.org/me/vllm:v0.32.0"])
def test_match_driver_needs_a_version_tag(image):
    with pytest.raises(SpecError, match="image_cuda match_driver needs a vllm/vllm-openai "
                                        "version tag"):
        build_spec({**BASE, "image": image, "image_cuda": "match_driver"})


# -- the deploy ----------------------------------------------------------------------------------


class FakeHost:
    name = "gpu-01"
    print_prefix = "[gpu-01] "

    def __init__(self, fact: dict[str, Any]) -> None:
        self.fact = fact

    def get_fact(self, _cls: object) -> dict[str, Any]:
        return self.fact


@pytest.mark.parametrize(("driver", "mode", "image", "refused"), [
    (NEW, "pinned", PINNED_IMAGE, False),
    (CU129_ONLY, "pinned", PINNED_IMAGE, True),
    (CU129_ONLY, "match_driver", CU129, False),
    (TOO_OLD, "match_driver", PINNED_IMAGE, True),
])
def test_host_image_decides_from_the_driver_fact(monkeypatch, driver, mode, image, refused):
    monkeypatch.setattr(service, "host", FakeHost(fact(driver)))
    spec, problem = service.host_image(build_spec({**BASE, "image_cuda": mode}))
    assert spec.image == image and (problem is not None) == refused


def test_the_matched_tag_is_what_the_unit_and_the_release_pin(monkeypatch):
    monkeypatch.setattr(service, "host", FakeHost(fact(CU129_ONLY)))
    spec, _ = service.host_image(build_spec({**BASE, "image_cuda": "match_driver"}))
    unit = service.render_unit(spec)
    assert f" {CU129} " in unit or f" {CU129}\n" in unit
    assert f" {PINNED_IMAGE} " not in unit
    assert release_for(spec, unit, "0" * 64).image == CU129
    # a rebuild from the recorded spec keeps the tag: the driver runs it
    again, _ = service.host_image(spec)
    assert again == spec


# -- gpufleet plan -------------------------------------------------------------------------------


@pytest.fixture
def plan_files(tmp_path: Path) -> tuple[Path, Path]:
    spec = tmp_path / "llama3.yaml"
    spec.write_text(yaml.safe_dump({**BASE, "max_model_len": 8192, "max_num_seqs": 32}))
    shape = tmp_path / "shape.json"
    shape.write_text(json.dumps(KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B-Instruct"].to_json()))
    return spec, shape


def _plan(capsys, tmp_path, plan_files, driver, *extra):
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps({"gpu-01": fact(driver)}))
    spec, shape = plan_files
    code = plan_cli.main([str(spec), "--host-fact", str(facts), "--model-shape", str(shape),
                          *extra])
    return code, capsys.readouterr().out


def test_plan_shows_the_driver_verdict(capsys, tmp_path, plan_files):
    code, out = _plan(capsys, tmp_path, plan_files, NEW)
    assert code == plan_cli.EXIT_OK and f"image: {PINNED_IMAGE} runs on driver {NEW}" in out
    code, out = _plan(capsys, tmp_path, plan_files, CU129_ONLY)
    assert code == plan_cli.EXIT_REFUSED
    assert f"image refused: driver {CU129_ONLY} is older than 580.65.06" in out


def test_plan_json_and_match_driver(capsys, tmp_path, plan_files):
    code, out = _plan(capsys, tmp_path, plan_files, CU129_ONLY, "--json", "--data",
                      "image_cuda=match_driver")
    host = json.loads(out)["hosts"][0]
    assert code == plan_cli.EXIT_OK and host["image"]["image"] == CU129
    assert host["image"]["problem"] is None
