"""Lab GPU profiles and the stand-in nvidia-smi (tests of test stand-ins: no GPU involved)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpufleet_lab import profiles
from gpufleet_lab.profiles import (
    H100,
    PROFILES,
    RECORDING_FILES,
    RECORDINGS_DIR,
    STANDIN_SCRIPT,
    expected_gpus,
    load_recording,
    recorded_identity,
    synthesize,
    write_profile,
)

NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running."
)
FACT_QUERY = [
    "--query-gpu=index,uuid,name,memory.total,driver_version,compute_cap",
    "--format=csv,noheader,nounits",
]
# Debian bookworm's interpreter is what runs the stand-in inside a lab host; use it when present.
BOOKWORM_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


def smi(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the stand-in like a lab host does, against the recordings in ``directory``."""
    return subprocess.run(
        [BOOKWORM_PYTHON, str(STANDIN_SCRIPT), *args],
        env={"FAKE_NVIDIA_SMI_DIR": str(directory), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("profiles")
    return {name: write_profile(name, root / name) for name in PROFILES}


def test_profile_names() -> None:
    assert set(PROFILES) == {"h100", "h100x2", "rtx4000ada", "t4", "nodriver", "nogpu"}
    assert all(isinstance(d, str) and d for d in PROFILES.values())


def test_h100_is_the_recording_verbatim(written: dict[str, Path]) -> None:
    for f in RECORDING_FILES:
        assert (written["h100"] / f).read_bytes() == (RECORDINGS_DIR / f).read_bytes(), f


def test_synthesizer_reproduces_the_recording() -> None:
    """Synthesizing an H100 with the recorded identity gives back the recorded files."""
    rec = load_recording()
    files = synthesize(H100, [recorded_identity(rec)], rec)
    for f in ("L.txt", "q.txt", "q.xml", "query-gpu.csv", "query-gpu-nounits.csv"):
        assert files[f] == rec.texts[f], f
    # The table's temperature and power are a different sample than the CSV's: use the table's.
    row = dict(zip(rec.fields, rec.bare, strict=True))
    block = profiles.table_rows(row, temp_c=39, power_w=128)
    assert "\n".join(block) in rec.texts["default.txt"]


def test_units_rule_matches_the_recording() -> None:
    rec = load_recording()
    sampled = {"power.draw", "power.draw.average", "power.draw.instant", "timestamp"}
    for field, header, units, bare in zip(rec.fields, rec.header, rec.row, rec.bare, strict=True):
        if field not in sampled:
            assert profiles.with_unit(bare, header) == units, field


@pytest.mark.parametrize("name", ["h100", "h100x2", "rtx4000ada", "t4"])
def test_csvs_keep_188_fields(written: dict[str, Path], name: str) -> None:
    count = {"h100x2": 2}.get(name, 1)
    units = (written[name] / "query-gpu.csv").read_text().splitlines()
    bare = (written[name] / "query-gpu-nounits.csv").read_text().splitlines()
    assert len(units) == 1 + count and len(bare) == count
    assert units[0] == (RECORDINGS_DIR / "query-gpu.csv").read_text().splitlines()[0]
    for line in units + bare:
        assert len(line.split(", ")) == 188


EXPECTED = {
    "h100x2": [("NVIDIA H100 80GB HBM3", "81559", "9.0", "2")] * 2,
    "rtx4000ada": [("NVIDIA RTX 4000 Ada Generation", "20475", "8.9", "1")],
    "t4": [("Tesla T4", "15360", "7.5", "1")],
    "h100": [("NVIDIA H100 80GB HBM3", "81559", "9.0", "1")],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_synthesized_values(written: dict[str, Path], name: str) -> None:
    gpus = expected_gpus(name)
    got = [(g["name"], g["memory.total"], g["compute_cap"], g["count"]) for g in gpus]
    assert got == EXPECTED[name]
    assert [g["index"] for g in gpus] == [str(i) for i in range(len(gpus))]
    assert len({g["uuid"] for g in gpus}) == len(gpus)
    assert len({g["pci.bus_id"] for g in gpus}) == len(gpus)
    assert len({g["serial"] for g in gpus}) == len(gpus)
    for g in gpus:
        total, reserved = int(g["memory.total"]), int(g["memory.reserved"])
        assert int(g["memory.free"]) == total - reserved - int(g["memory.used"])
        assert g["uuid"].startswith("GPU-") and len(g["uuid"]) == 40
    # Every view agrees with the CSV.
    listing = (written[name] / "L.txt").read_text()
    table = (written[name] / "default.txt").read_text()
    q = (written[name] / "q.txt").read_text()
    xml = (written[name] / "q.xml").read_text()
    assert f"Attached GPUs                                          : {len(gpus)}" in q
    assert f"<attached_gpus>{len(gpus)}</attached_gpus>" in xml
    for g in gpus:
        assert f"GPU {g['index']}: {g['name']} (UUID: {g['uuid']})" in listing
        assert f"{g['memory.total']}MiB |" in table and g["pci.bus_id"] in table
        assert f": {g['uuid']}" in q and f": {g['memory.total']} MiB" in q
        assert f"<uuid>{g['uuid']}</uuid>" in xml and f'<gpu id="{g["pci.bus_id"]}">' in xml
        assert f"<total>{g['memory.total']} MiB</total>" in xml


def test_table_layout_is_kept(written: dict[str, Path]) -> None:
    recorded = (RECORDINGS_DIR / "default.txt").read_text().splitlines()
    width = len(recorded[1])
    assert {len(line) for line in recorded[1:] if line.startswith(("|", "+"))} == {width}
    for name in ("h100x2", "rtx4000ada", "t4"):
        lines = (written[name] / "default.txt").read_text().splitlines()
        widths = {len(line) for line in lines[1:] if line.startswith(("|", "+"))}
        assert widths == {width}, name
    t4 = (written["t4"] / "default.txt").read_text()
    assert "|   0  Tesla T4" in t4 and "70W |" in t4
    ada = (written["rtx4000ada"] / "default.txt").read_text()
    assert "NVIDIA RTX 4000 Ada Gene..." in ada and "|                  Off |" in ada


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_standin_answers_the_fact_query(written: dict[str, Path], name: str) -> None:
    r = smi(written[name], *FACT_QUERY)
    assert r.returncode == 0, r.stderr
    want = [
        ", ".join(
            (g["index"], g["uuid"], g["name"], g["memory.total"], "580.159.04", g["compute_cap"])
        )
        for g in expected_gpus(name)
    ]
    assert r.stdout.splitlines() == want


def test_standin_nodriver(written: dict[str, Path]) -> None:
    for args in (FACT_QUERY, [], ["-L"]):
        r = smi(written["nodriver"], *args)
        assert r.returncode == 9
        assert r.stdout.strip() == NO_DRIVER


def test_nogpu_has_no_files(written: dict[str, Path], tmp_path: Path) -> None:
    assert list(written["nogpu"].iterdir()) == []
    assert profiles.install_profile("nogpu", tmp_path) is False
    assert not (tmp_path / "usr/bin/nvidia-smi").exists()


def test_install_profile(tmp_path: Path) -> None:
    assert profiles.install_profile("t4", tmp_path) is True
    binary = tmp_path / "usr/bin/nvidia-smi"
    assert binary.stat().st_mode & 0o777 == 0o755
    assert binary.read_text().startswith("#!/usr/bin/python3\n")
    assert (tmp_path / "usr/share/fake-nvidia-smi/query-gpu.csv").is_file()


def test_standin_replays_the_recorded_views(written: dict[str, Path]) -> None:
    d = written["h100"]
    for args, f in (([], "default.txt"), (["-L"], "L.txt"), (["-q"], "q.txt")):
        r = smi(d, *args)
        assert (r.returncode, r.stdout) == (0, (RECORDINGS_DIR / f).read_text())
    for args in (["-q", "-x"], ["-x", "-q"], ["-q", "-x", "-i", "0"]):
        assert smi(d, *args).stdout == (RECORDINGS_DIR / "q.xml").read_text()
    assert smi(d, "-q", "-i", "0").stdout == (RECORDINGS_DIR / "q.txt").read_text()


def _edge_cases() -> list[tuple[list[str], str, int]]:
    """(argv, output, rc) from the real recording of edge cases."""
    text = (RECORDINGS_DIR / "edge-cases.txt").read_text()
    cases = []
    for block in text.split("### nvidia-smi ")[1:]:
        cmd, _, rest = block.partition("\n")
        out, _, rc = rest.rpartition("### rc=")
        cases.append((cmd.split(), out, int(rc.strip())))
    return cases


@pytest.mark.parametrize("argv,out,rc", _edge_cases(), ids=lambda v: str(v)[:40])
def test_standin_matches_recorded_edge_cases(
    written: dict[str, Path], argv: list[str], out: str, rc: int
) -> None:
    r = smi(written["h100"], *argv)
    assert (r.returncode, r.stdout) == (rc, out)


def test_standin_selects_gpus(written: dict[str, Path]) -> None:
    d = written["h100x2"]
    gpus = expected_gpus("h100x2")
    q = ["--query-gpu=index,uuid", "--format=csv,noheader"]
    assert smi(d, *q, "-i", "1").stdout == f"1, {gpus[1]['uuid']}\n"
    assert smi(d, *q, "-i", gpus[0]["uuid"]).stdout == f"0, {gpus[0]['uuid']}\n"
    assert smi(d, *q, "--id=0,1").stdout.count("\n") == 2
    assert smi(d, *q, "-i", "2").returncode == 6
    one = smi(d, "-q", "-i", "1").stdout
    assert gpus[1]["uuid"] in one and gpus[0]["uuid"] not in one
    xml = smi(d, "-q", "-x", "-i", "1").stdout
    assert xml.count("<gpu id=") == 1 and xml.rstrip().endswith("</nvidia_smi_log>")


def test_standin_units_and_aliases(written: dict[str, Path]) -> None:
    d = written["rtx4000ada"]
    r = smi(d, "--query-gpu=gpu_name,memory.total,memory.free", "--format=csv")
    assert r.stdout == (
        "name, memory.total [MiB], memory.free [MiB]\n"
        "NVIDIA RTX 4000 Ada Generation, 20475 MiB, 20103 MiB\n"
    )
    assert smi(d, "--version").stdout.startswith("NVIDIA-SMI version  : 580.159.04\n")


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs sh")
def test_exact_args_override(written: dict[str, Path], tmp_path: Path) -> None:
    d = write_profile("h100", tmp_path / "p")
    (d / "args").mkdir()
    (d / "args" / "-q_-d_MEMORY").write_text("recorded\n")
    assert smi(d, "-q", "-d", "MEMORY").stdout == "recorded\n"
