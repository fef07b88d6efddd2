"""Both wheels build cleanly: the product carries its templates and host scripts (deploys must
not depend on the CWD) and no lab code; the lab carries its recordings."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def build(source: Path, out: Path) -> tuple[set[str], str]:
    """The file names in the wheel built from ``source``, and what the build printed."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", str(source),
                           "-w", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    return set(zipfile.ZipFile(wheel).namelist()), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def product(tmp_path_factory) -> tuple[set[str], str]:
    return build(ROOT, tmp_path_factory.mktemp("product"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> tuple[set[str], str]:
    return build(ROOT / "lab", tmp_path_factory.mktemp("lab"))


def test_the_product_wheel_ships_templates_and_host_scripts(product):
    names, _ = product
    for path in ("gpufleet/templates/vllm.service.j2", "gpufleet/hostscripts/verify_endpoint.py",
                 "gpufleet/hostscripts/stage_weights.py", "gpufleet/hostscripts/hostlock.py",
                 "gpufleet/hostscripts/docker_restart.py", "gpufleet/model/vllm_serve_flags.json"):
        assert path in names, path


def test_the_product_wheel_holds_no_lab(product):
    names, _ = product
    assert not [n for n in names if "lab" in n.split("/")[0] or "/lab/" in n
                or "recordings" in n], sorted(names)


def test_the_lab_wheel_ships_its_recordings(lab):
    names, _ = lab
    assert "gpufleet_lab/recordings/h100-80gb-hbm3/query-gpu-nounits.csv" in names
    assert not [n for n in names if n.startswith("gpufleet/")]


@pytest.mark.parametrize("which", ["product", "lab"])
def test_no_setuptools_warning(which, request):
    _, output = request.getfixturevalue(which)
    warnings = [line for line in output.splitlines()
                if "warning" in line.lower() and "setuptools" in line.lower()
                or "SetuptoolsDeprecationWarning" in line or "is absent from the" in line]
    assert warnings == [], "\n".join(warnings)
