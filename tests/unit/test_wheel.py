"""The wheel carries the templates and host scripts: deploys must not depend on the CWD."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_templates_host_scripts_and_recordings(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w",
                    str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("gpufleet-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("gpufleet/templates/vllm.service.j2",
                 "gpufleet/hostscripts/verify_endpoint.py",
                 "gpufleet/hostscripts/stage_weights.py",
                 "gpufleet/lab/recordings/h100-80gb-hbm3/query-gpu-nounits.csv"):
        assert path in names, path
