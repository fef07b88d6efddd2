"""GPU profiles of lab hosts: folders of ``nvidia-smi`` recordings for the TEST STAND-IN.

Nothing here talks to a GPU. Each profile is a folder in the format of the real recordings in
``recordings/h100-80gb-hbm3/`` (``default.txt``, ``L.txt``, ``q.txt``, ``q.xml``,
``query-gpu.csv`` with its header, ``query-gpu-nounits.csv`` without; one row per GPU), which
``nvidia_smi_standin.py`` replays inside a lab host as ``/usr/bin/nvidia-smi``.

* ``h100`` is the real recording of an NVIDIA H100 80GB HBM3 (driver 580.159.04), verbatim.
* ``h100x2``, ``rtx4000ada`` and ``t4`` are SYNTHESIZED from that recording: the identity,
  memory, compute capability, PCI and power columns are changed and every file is regenerated
  from the changed rows, so all the views (CSV, table, ``-L``, ``-q``, ``-q -x``) agree. Columns
  that nobody could derive without the real card (clocks, temperatures, VBIOS, ...) keep the
  H100's values.
* ``nodriver``: ``nvidia-smi`` is installed but fails like on a VM whose driver is not loaded
  (rc 9 and the real message), from a ``FAIL`` marker file.
* ``nogpu``: no ``nvidia-smi`` at all.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

LAB_DIR = Path(__file__).resolve().parent
RECORDINGS_DIR = LAB_DIR / "recordings" / "h100-80gb-hbm3"
STANDIN_SCRIPT = LAB_DIR / "nvidia_smi_standin.py"

RECORDING_FILES = (
    "default.txt",
    "L.txt",
    "q.txt",
    "q.xml",
    "query-gpu.csv",
    "query-gpu-nounits.csv",
)
FAIL_MARKER = "FAIL"
# Where a lab host gets the stand-in and its recordings (paths relative to the host's root).
HOST_RECORDINGS_DIR = Path("usr/share/fake-nvidia-smi")
HOST_NVIDIA_SMI = Path("usr/bin/nvidia-smi")

SEP = ", "  # nvidia-smi's CSV separator


# ------------------------------------------------------------------------------------------
# Models and profiles
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuModel:
    """What distinguishes one GPU model in nvidia-smi's output (all else is the H100's)."""

    name: str
    architecture: str
    memory_total_mib: int
    memory_reserved_mib: int
    compute_cap: str
    power_limit_w: float
    power_min_limit_w: float
    pci_device_id: str  # "0x233010DE": device 0x2330, vendor 0x10DE
    pci_sub_device_id: str
    pcie_gen: int
    ecc: bool
    mig: bool
    fan_percent: int | None = None  # None: passively cooled, "[N/A]"
    power_draw_w: float | None = None  # None: keep the recording's power samples


H100 = GpuModel(
    name="NVIDIA H100 80GB HBM3",
    architecture="Hopper",
    memory_total_mib=81559,
    memory_reserved_mib=480,
    compute_cap="9.0",
    power_limit_w=700.0,
    power_min_limit_w=200.0,
    pci_device_id="0x233010DE",
    pci_sub_device_id="0x16C110DE",
    pcie_gen=5,
    ecc=True,
    mig=True,
)
RTX_4000_ADA = GpuModel(
    name="NVIDIA RTX 4000 Ada Generation",
    architecture="Ada Lovelace",
    memory_total_mib=20475,
    memory_reserved_mib=372,
    compute_cap="8.9",
    power_limit_w=130.0,
    power_min_limit_w=70.0,
    pci_device_id="0x27B210DE",
    pci_sub_device_id="0x181B10DE",
    pcie_gen=4,
    ecc=False,
    mig=False,
    fan_percent=30,
    power_draw_w=11.84,
)
T4 = GpuModel(
    name="Tesla T4",
    architecture="Turing",
    memory_total_mib=15360,
    memory_reserved_mib=257,
    compute_cap="7.5",
    power_limit_w=70.0,
    power_min_limit_w=60.0,
    pci_device_id="0x1EB810DE",
    pci_sub_device_id="0x12A210DE",
    pcie_gen=3,
    ecc=True,
    mig=False,
    power_draw_w=27.31,
)


@dataclass(frozen=True)
class Profile:
    """A lab GPU profile: which GPUs a host has and how its ``nvidia-smi`` behaves."""

    name: str
    description: str
    size_slug: str  # the DigitalOcean size slug a droplet of this profile reports
    model: GpuModel | None = None
    count: int = 0
    verbatim: bool = False  # copy the real recordings instead of synthesizing
    driver_loaded: bool = True
    has_nvidia_smi: bool = True


PROFILE_SPECS: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            "h100",
            "1x NVIDIA H100 80GB HBM3, the real recordings verbatim (driver 580.159.04)",
            "gpu-h100x1-80gb",
            H100,
            1,
            verbatim=True,
        ),
        Profile(
            "h100x2",
            "2x NVIDIA H100 80GB HBM3 (synthesized from the H100 recording)",
            "gpu-h100x2-160gb",
            H100,
            2,
        ),
        Profile(
            "rtx4000ada",
            "1x NVIDIA RTX 4000 Ada Generation, 20475 MiB, compute capability 8.9 (synthesized)",
            "gpu-4000adax1-20gb",
            RTX_4000_ADA,
            1,
        ),
        Profile(
            "t4",
            "1x Tesla T4, 15360 MiB, compute capability 7.5 (synthesized; below 8.9)",
            "gpu-t4x1-16gb",
            T4,
            1,
        ),
        Profile(
            "nodriver",
            "nvidia-smi installed but the driver is not loaded: rc 9 and the real message",
            "gpu-h100x1-80gb",
            driver_loaded=False,
        ),
        Profile("nogpu", "no GPU and no nvidia-smi at all", "s-4vcpu-8gb", has_nvidia_smi=False),
    )
}

PROFILES: dict[str, str] = {name: p.description for name, p in PROFILE_SPECS.items()}
DEFAULT_PROFILE = "h100"


def get_profile(name: str) -> Profile:
    """The profile called ``name``; ``KeyError`` with the known names otherwise."""
    try:
        return PROFILE_SPECS[name]
    except KeyError:
        raise KeyError(f"unknown GPU profile {name!r}; known: {', '.join(PROFILES)}") from None


# ------------------------------------------------------------------------------------------
# The recording, parsed
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recording:
    """The H100 recording: the 188-field header and the one GPU's row, with and without units."""

    header: tuple[str, ...]
    row: tuple[str, ...]
    bare: tuple[str, ...]
    texts: dict[str, str]

    @property
    def fields(self) -> tuple[str, ...]:
        """Field names without their ``[unit]`` suffix, as ``--query-gpu`` takes them."""
        return tuple(h.split(" [")[0] for h in self.header)


def load_recording(directory: Path = RECORDINGS_DIR) -> Recording:
    """Parse the real recordings in ``directory``."""
    texts = {f: (directory / f).read_text() for f in RECORDING_FILES}
    lines = texts["query-gpu.csv"].splitlines()
    bare_lines = texts["query-gpu-nounits.csv"].splitlines()
    return Recording(
        header=tuple(lines[0].split(SEP)),
        row=tuple(lines[1].split(SEP)),
        bare=tuple(bare_lines[0].split(SEP)),
        texts=texts,
    )


def with_unit(bare: str, header: str) -> str:
    """The ``--format=csv`` value of a ``nounits`` value, e.g. ``81559`` -> ``81559 MiB``."""
    m = re.search(r" \[(.+)\]$", header)
    if not m or not bare or bare.startswith("[") or bare == "N/A":
        return bare
    return f"{bare} {m.group(1)}"


# ------------------------------------------------------------------------------------------
# Synthesis
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuIdentity:
    """Per-GPU identity columns."""

    index: int
    uuid: str
    serial: str
    pci_device: int  # PCI device number; bus id 00000000:00:<device>.0

    @property
    def bus_id(self) -> str:
        return f"00000000:00:{self.pci_device:02X}.0"


def synthetic_identity(profile: str, index: int) -> GpuIdentity:
    """A stable, made-up identity for GPU ``index`` of ``profile`` (distinct per GPU)."""
    h = hashlib.sha256(f"gpufleet-lab:{profile}:{index}".encode()).hexdigest()
    uuid = f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
    serial = f"16537{int(h[32:40], 16) % 10**8:08d}"
    return GpuIdentity(index=index, uuid=uuid, serial=serial, pci_device=6 + index)


def recorded_identity(rec: Recording) -> GpuIdentity:
    """The identity of the recorded H100."""
    v = dict(zip(rec.fields, rec.bare, strict=True))
    return GpuIdentity(
        index=int(v["index"]),
        uuid=v["uuid"],
        serial=v["serial"],
        pci_device=int(v["pci.device"], 16),
    )


def _watts(w: float) -> str:
    return f"{w:.2f}"


def gpu_values(model: GpuModel, ident: GpuIdentity, count: int) -> dict[str, str]:
    """The ``nounits`` values this model and identity change in the 188-field row."""
    free = model.memory_total_mib - model.memory_reserved_mib
    v = {
        "name": model.name,
        "index": str(ident.index),
        "uuid": ident.uuid,
        "serial": ident.serial,
        "count": str(count),
        "pci.bus_id": ident.bus_id,
        "pci.device": f"0x{ident.pci_device:02X}",
        "pci.device_id": model.pci_device_id,
        "pci.sub_device_id": model.pci_sub_device_id,
        "compute_cap": model.compute_cap,
        "memory.total": str(model.memory_total_mib),
        "memory.reserved": str(model.memory_reserved_mib),
        "memory.used": "0",
        "memory.free": str(free),
        "power.limit": _watts(model.power_limit_w),
        "enforced.power.limit": _watts(model.power_limit_w),
        "power.default_limit": _watts(model.power_limit_w),
        "power.max_limit": _watts(model.power_limit_w),
        "power.min_limit": _watts(model.power_min_limit_w),
        "ecc.mode.current": "Enabled" if model.ecc else "Disabled",
        "ecc.mode.pending": "Enabled" if model.ecc else "Disabled",
        "mig.mode.current": "Disabled" if model.mig else "[N/A]",
        "mig.mode.pending": "Disabled" if model.mig else "[N/A]",
        "fan.speed": "[N/A]" if model.fan_percent is None else str(model.fan_percent),
    }
    for gen in ("current", "gpucurrent", "gpumax", "max"):
        v[f"pcie.link.gen.{gen}"] = str(model.pcie_gen)
    if model.power_draw_w is not None:
        for f in ("power.draw", "power.draw.average", "power.draw.instant"):
            v[f] = _watts(model.power_draw_w)
    return v


def gpu_rows(rec: Recording, model: GpuModel, idents: list[GpuIdentity]) -> list[dict[str, str]]:
    """One ``{field: nounits value}`` row per GPU (the recording's values where unchanged)."""
    rows = []
    for ident in idents:
        row = dict(zip(rec.fields, rec.bare, strict=True))
        row.update(gpu_values(model, ident, len(idents)))
        rows.append(row)
    return rows


def csv_texts(rec: Recording, model: GpuModel, idents: list[GpuIdentity]) -> tuple[str, str]:
    """``(query-gpu.csv, query-gpu-nounits.csv)`` for these GPUs."""
    units_lines = [SEP.join(rec.header)]
    bare_lines = []
    for ident in idents:
        changed = gpu_values(model, ident, len(idents))
        units, bare = list(rec.row), list(rec.bare)
        for i, (field, header) in enumerate(zip(rec.fields, rec.header, strict=True)):
            if field in changed:
                bare[i] = changed[field]
                units[i] = with_unit(changed[field], header)
        units_lines.append(SEP.join(units))
        bare_lines.append(SEP.join(bare))
    return "\n".join(units_lines) + "\n", "\n".join(bare_lines) + "\n"


def list_text(rows: list[dict[str, str]]) -> str:
    """``nvidia-smi -L``."""
    return "".join(f"GPU {r['index']}: {r['name']} (UUID: {r['uuid']})\n" for r in rows)


def _table_name(name: str) -> str:
    # nvidia-smi shortens long product names in the table ("NVIDIA RTX 4000 Ada Gene...").
    return name if len(name) <= 27 else name[:24] + "..."


def table_rows(row: dict[str, str], temp_c: int, power_w: int) -> list[str]:
    """The three table lines and the separator of one GPU in ``nvidia-smi``'s default view."""
    pm = "On" if row["persistence_mode"] == "Enabled" else "Off"
    disp = "On" if row["display_active"] == "Enabled" else "Off"
    if row["ecc.mode.current"] == "Enabled":
        ecc = row["ecc.errors.uncorrected.volatile.total"]
    else:
        ecc = "Off"
    fan = "N/A" if row["fan.speed"].startswith("[") else f"{row['fan.speed']}%"
    cap = f"{float(row['power.limit']):.0f}W"
    util = row["utilization.gpu"]
    mig = row["mig.mode.current"]
    mig = "N/A" if mig.startswith("[") else mig
    return [
        f"|{row['index']:>4}  {_table_name(row['name']):<30} {pm:<3} |"
        f"   {row['pci.bus_id']} {disp:<3} |{ecc:>21} |",
        f"|{fan:>4}   {str(temp_c) + 'C':>3}    {row['pstate']:<2}{str(power_w) + 'W':>16} /"
        f" {cap:>5} |{row['memory.used']:>8}MiB / {row['memory.total']:>6}MiB |"
        f"{util:>7}%{row['compute_mode']:>13} |",
        f"|{'':41}|{'':24}|{mig:>21} |",
        "+" + "-" * 41 + "+" + "-" * 24 + "+" + "-" * 22 + "+",
    ]


def default_text(template: str, rows: list[dict[str, str]]) -> str:
    """``nvidia-smi`` with no arguments: the recording's frame around one block per GPU."""
    lines = template.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("|===")) + 1
    end = next(i for i in range(start, len(lines)) if lines[i] == "")
    body: list[str] = []
    for row in rows:
        temp = int(row["temperature.gpu"])
        body += table_rows(row, temp, round(float(row["power.draw"])))
    return "\n".join(lines[:start] + body + lines[end:])


# --- nvidia-smi -q and -q -x: the recorded GPU section, repeated per GPU with changed values --


def _q_txt_subs(row: dict[str, str], model: GpuModel) -> dict[tuple[str, ...], str]:
    mib = lambda f: f"{row[f]} MiB"  # noqa: E731
    watts = lambda f: f"{row[f]} W"  # noqa: E731
    subs = {
        ("Product Name",): row["name"],
        ("Product Architecture",): model.architecture,
        ("Serial Number",): row["serial"],
        ("GPU UUID",): row["uuid"],
        ("Minor Number",): row["index"],
        ("PCI", "Device"): row["pci.device"],
        ("PCI", "Device Id"): row["pci.device_id"],
        ("PCI", "Bus Id"): row["pci.bus_id"],
        ("PCI", "Sub System Id"): row["pci.sub_device_id"],
        ("Fan Speed",): "N/A" if row["fan.speed"].startswith("[") else f"{row['fan.speed']} %",
        ("FB Memory Usage", "Total"): mib("memory.total"),
        ("FB Memory Usage", "Reserved"): mib("memory.reserved"),
        ("FB Memory Usage", "Used"): mib("memory.used"),
        ("FB Memory Usage", "Free"): mib("memory.free"),
        ("ECC Mode", "Current"): row["ecc.mode.current"],
        ("ECC Mode", "Pending"): row["ecc.mode.pending"],
        ("MIG Mode", "Current"): row["mig.mode.current"].strip("[]"),
        ("MIG Mode", "Pending"): row["mig.mode.pending"].strip("[]"),
        ("GPU Power Readings", "Current Power Limit"): watts("power.limit"),
        ("GPU Power Readings", "Requested Power Limit"): watts("power.limit"),
        ("GPU Power Readings", "Default Power Limit"): watts("power.default_limit"),
        ("GPU Power Readings", "Min Power Limit"): watts("power.min_limit"),
        ("GPU Power Readings", "Max Power Limit"): watts("power.max_limit"),
    }
    for key in ("Max", "Current", "Device Current", "Device Max"):
        subs[("PCI", "GPU Link Info", "PCIe Generation", key)] = str(model.pcie_gen)
    if model.power_draw_w is not None:
        subs[("GPU Power Readings", "Average Power Draw")] = watts("power.draw.average")
        subs[("GPU Power Readings", "Instantaneous Power Draw")] = watts("power.draw.instant")
    return subs


def _q_xml_subs(row: dict[str, str], model: GpuModel) -> dict[tuple[str, ...], str]:
    txt = _q_txt_subs(row, model)
    keys = {
        ("Product Name",): ("product_name",),
        ("Product Architecture",): ("product_architecture",),
        ("Serial Number",): ("serial",),
        ("GPU UUID",): ("uuid",),
        ("Minor Number",): ("minor_number",),
        ("PCI", "Bus Id"): ("pci", "pci_bus_id"),
        ("Fan Speed",): ("fan_speed",),
        ("FB Memory Usage", "Total"): ("fb_memory_usage", "total"),
        ("FB Memory Usage", "Reserved"): ("fb_memory_usage", "reserved"),
        ("FB Memory Usage", "Used"): ("fb_memory_usage", "used"),
        ("FB Memory Usage", "Free"): ("fb_memory_usage", "free"),
        ("ECC Mode", "Current"): ("ecc_mode", "current_ecc"),
        ("ECC Mode", "Pending"): ("ecc_mode", "pending_ecc"),
        ("MIG Mode", "Current"): ("mig_mode", "current_mig"),
        ("MIG Mode", "Pending"): ("mig_mode", "pending_mig"),
    }
    power = {
        "Current Power Limit": "current_power_limit",
        "Requested Power Limit": "requested_power_limit",
        "Default Power Limit": "default_power_limit",
        "Min Power Limit": "min_power_limit",
        "Max Power Limit": "max_power_limit",
        "Average Power Draw": "average_power_draw",
        "Instantaneous Power Draw": "instant_power_draw",
    }
    for k, tag in power.items():
        keys[("GPU Power Readings", k)] = ("gpu_power_readings", tag)
    subs = {xml: txt[t] for t, xml in keys.items() if t in txt}
    subs[("pci", "pci_device")] = row["pci.device"][2:]
    subs[("pci", "pci_device_id")] = row["pci.device_id"][2:]
    subs[("pci", "pci_sub_system_id")] = row["pci.sub_device_id"][2:]
    gens = ("max_link_gen", "current_link_gen", "device_current_link_gen", "max_device_link_gen")
    for tag in gens:
        subs[("pci", "pci_gpu_link_info", "pcie_gen", tag)] = str(model.pcie_gen)
    return subs


_TXT_LINE = re.compile(r"^( *)(\S.*?)(\s+): (.*)$")


def _substitute_q_txt(section: list[str], subs: dict[tuple[str, ...], str]) -> list[str]:
    """Replace values in one ``-q`` GPU section; keys are paths of section names."""
    out, path = [], []
    for line in section:
        indent = (len(line) - len(line.lstrip(" "))) // 4
        m = _TXT_LINE.match(line)
        if m:
            key = (*path[: indent - 1], m.group(2))
            if key in subs:
                line = f"{m.group(1)}{m.group(2)}{m.group(3)}: {subs[key]}"
        elif line.strip() and indent >= 1:
            path = [*path[: indent - 1], line.strip()]
        out.append(line)
    return out


_XML_LINE = re.compile(r"^(\t*)<([a-z_A-Z0-9]+)>(.*)</\2>$")
_XML_OPEN = re.compile(r"^\t*<([a-z_A-Z0-9]+)>$")


def _substitute_q_xml(section: list[str], subs: dict[tuple[str, ...], str]) -> list[str]:
    """Replace values in one ``-q -x`` ``<gpu>`` element; keys are tag paths below ``<gpu>``."""
    out, path = [], []
    for line in section:
        depth = len(line) - len(line.lstrip("\t")) - 2  # 2 tabs: a direct child of <gpu>
        m = _XML_LINE.match(line)
        if m:
            key = (*path[:depth], m.group(2))
            if key in subs:
                line = f"{m.group(1)}<{m.group(2)}>{subs[key]}</{m.group(2)}>"
        elif (o := _XML_OPEN.match(line)) and depth >= 0:
            path = [*path[:depth], o.group(1)]
        out.append(line)
    return out


def q_txt(template: str, rows: list[dict[str, str]], model: GpuModel) -> str:
    """``nvidia-smi -q``: the recorded header, then the recorded GPU section once per GPU."""
    lines = template.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("GPU 0000"))
    head, section = lines[:start], lines[start:]
    head = [
        re.sub(r": \d+$", f": {len(rows)}", h) if h.startswith("Attached GPUs") else h for h in head
    ]
    trailer: list[str] = []
    while section and section[-1] == "":
        trailer.append(section.pop())
    body: list[str] = []
    for row in rows:
        gpu = _substitute_q_txt(section, _q_txt_subs(row, model))
        gpu[0] = f"GPU {row['pci.bus_id']}"
        body += gpu + ([""] if row is not rows[-1] else [])
    return "\n".join(head + body + trailer)


def q_xml(template: str, rows: list[dict[str, str]], model: GpuModel) -> str:
    """``nvidia-smi -q -x``: the recorded document with one ``<gpu>`` element per GPU."""
    lines = template.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("\t<gpu id="))
    end = next(i for i, line in enumerate(lines) if line == "\t</gpu>") + 1
    head = [
        re.sub(r">\d+<", f">{len(rows)}<", h) if "<attached_gpus>" in h else h
        for h in lines[:start]
    ]
    body: list[str] = []
    for row in rows:
        gpu = _substitute_q_xml(lines[start:end], _q_xml_subs(row, model))
        gpu[0] = f'\t<gpu id="{row["pci.bus_id"]}">'
        body += gpu + ([""] if row is not rows[-1] else [])
    return "\n".join(head + body + lines[end:])


def synthesize(
    model: GpuModel, idents: list[GpuIdentity], rec: Recording | None = None
) -> dict[str, str]:
    """Every recording file for ``model`` with these GPUs, derived from the H100 recording."""
    rec = rec or load_recording()
    rows = gpu_rows(rec, model, idents)
    units, bare = csv_texts(rec, model, idents)
    return {
        "default.txt": default_text(rec.texts["default.txt"], rows),
        "L.txt": list_text(rows),
        "q.txt": q_txt(rec.texts["q.txt"], rows, model),
        "q.xml": q_xml(rec.texts["q.xml"], rows, model),
        "query-gpu.csv": units,
        "query-gpu-nounits.csv": bare,
    }


def profile_files(name: str) -> dict[str, str]:
    """The files of profile ``name`` (file name -> text); empty for ``nogpu``."""
    p = get_profile(name)
    if not p.has_nvidia_smi:
        return {}
    if not p.driver_loaded:
        return {FAIL_MARKER: "driver not loaded: nvidia-smi fails with rc 9 (lab stand-in)\n"}
    if p.verbatim:
        return {f: (RECORDINGS_DIR / f).read_text() for f in RECORDING_FILES}
    assert p.model is not None
    return synthesize(p.model, [synthetic_identity(p.name, i) for i in range(p.count)])


def write_profile(name: str, dest_dir: str | Path) -> Path:
    """Write profile ``name``'s recordings into ``dest_dir`` (created); returns ``dest_dir``.

    ``nogpu`` writes nothing (the folder is left empty): such a host gets no ``nvidia-smi``.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for fname, text in profile_files(name).items():
        (dest / fname).write_text(text)
    return dest


def install_profile(name: str, root: str | Path) -> bool:
    """Install the stand-in ``nvidia-smi`` and profile ``name``'s recordings below ``root``.

    ``root`` is a host's root file system. Returns False (and installs nothing) for ``nogpu``.
    """
    if not get_profile(name).has_nvidia_smi:
        return False
    root = Path(root)
    write_profile(name, root / HOST_RECORDINGS_DIR)
    binary = root / HOST_NVIDIA_SMI
    binary.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(STANDIN_SCRIPT, binary)
    binary.chmod(0o755)
    return True


def expected_gpus(name: str) -> list[dict[str, str]]:
    """The GPUs of profile ``name`` as ``{field: nounits value}`` rows (empty without GPUs)."""
    files = profile_files(name)
    if "query-gpu.csv" not in files:
        return []
    fields = [h.split(" [")[0] for h in files["query-gpu.csv"].splitlines()[0].split(SEP)]
    return [
        dict(zip(fields, line.split(SEP), strict=True))
        for line in files["query-gpu-nounits.csv"].splitlines()
        if line
    ]


__all__ = [
    "DEFAULT_PROFILE",
    "GpuIdentity",
    "GpuModel",
    "PROFILES",
    "PROFILE_SPECS",
    "Profile",
    "expected_gpus",
    "get_profile",
    "install_profile",
    "load_recording",
    "profile_files",
    "synthesize",
    "write_profile",
]
