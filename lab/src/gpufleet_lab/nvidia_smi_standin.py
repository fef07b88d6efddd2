#!/usr/bin/python3
"""TEST STAND-IN for ``nvidia-smi``: replays output recorded with the real one. No GPU involved.

Lab hosts get this file as ``/usr/bin/nvidia-smi``. It only reads recordings from
``$FAKE_NVIDIA_SMI_DIR`` (default ``/usr/share/fake-nvidia-smi``), written by
``gpufleet_lab.profiles``:

* ``default.txt`` (no arguments), ``L.txt`` (``-L``), ``q.txt`` (``-q``), ``q.xml`` (``-q -x``),
  verbatim; with ``-i`` the ``-q`` views are cut down to the selected GPU's section.
* ``query-gpu.csv`` (``--query-gpu=<all 188 fields> --format=csv``) and
  ``query-gpu-nounits.csv`` (``--format=csv,noheader,nounits``), one row per GPU: any
  ``--query-gpu=a,b,... [--format=csv[,noheader][,nounits]] [-i N|UUID|BUS_ID]`` is cut from them.
* ``args/<argv joined by _, / as %>``: the verbatim answer to one exact command line.
* ``FAIL``: behave like a VM whose NVIDIA driver is not loaded (rc 9, the real message).

Error texts and exit codes are the real ones, recorded on a real H100 host (driver 580.159.04):
unknown field rc 2, missing device rc 6, ``-i`` with ``-L`` rc 2, unknown option rc 255.
Standard library only; runs under Debian bookworm's ``/usr/bin/python3``.
"""

from __future__ import annotations

import os
import sys

RECORDINGS = os.environ.get("FAKE_NVIDIA_SMI_DIR", "/usr/share/fake-nvidia-smi")

NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running.\n"
)
NO_DEVICES = "No devices were found"
RC_INVALID_ARG = 2
RC_NOT_FOUND = 6
RC_NO_DRIVER = 9
RC_UNKNOWN_OPTION = 255

# Alternative names that --help-query-gpu lists next to the canonical ones.
ALIASES = {
    "gpu_name": "name",
    "gpu_serial": "serial",
    "gpu_uuid": "uuid",
    "gpu_bus_id": "pci.bus_id",
    "inforom.image": "inforom.img",
    "inforom.power": "inforom.pwr",
    "gpu_operation_mode.current": "gom.current",
    "gpu_operation_mode.pending": "gom.pending",
    "clocks.gr": "clocks.current.graphics",
    "clocks.sm": "clocks.current.sm",
    "clocks.mem": "clocks.current.memory",
    "clocks.video": "clocks.current.video",
    "clocks.applications.gr": "clocks.applications.graphics",
    "clocks.applications.mem": "clocks.applications.memory",
    "clocks.default_applications.gr": "clocks.default_applications.graphics",
    "clocks.default_applications.mem": "clocks.default_applications.memory",
    "clocks.max.gr": "clocks.max.graphics",
    "clocks.max.mem": "clocks.max.memory",
}
# --query-compute-apps: no process ever runs on a stand-in GPU, so only the header is printed.
COMPUTE_APP_FIELDS = {
    "pid": "pid",
    "process_name": "process_name",
    "name": "process_name",
    "used_memory": "used_gpu_memory [MiB]",
    "used_gpu_memory": "used_gpu_memory [MiB]",
    "gpu_uuid": "gpu_uuid",
    "gpu_name": "gpu_name",
    "gpu_bus_id": "gpu_bus_id",
    "gpu_serial": "gpu_serial",
    "timestamp": "timestamp",
}
VALUE_OPTIONS = {"--query-gpu", "--query-compute-apps", "--format", "-i", "--id", "-d", "--display"}
FLAG_OPTIONS = {"-L", "--list-gpus", "-q", "--query", "-x", "--xml-format", "-h", "--help"}
FLAG_OPTIONS |= {"--version"}


class Exit(Exception):
    """Stop with this output and exit status."""

    def __init__(self, rc: int, out: str = "", err: str = "") -> None:
        super().__init__(rc)
        self.rc, self.out, self.err = rc, out, err


def read(name: str) -> str:
    path = os.path.join(RECORDINGS, name)
    if not os.path.isfile(path):
        raise Exit(RC_INVALID_ARG, err=f"nvidia-smi (lab stand-in): no recording {path}\n")
    with open(path, encoding="utf-8") as f:
        return f.read()


def parse(args: list[str]) -> dict[str, str]:
    """Options as ``{name: value}`` (flags map to ""), in nvidia-smi's accepted spellings."""
    opts: dict[str, str] = {}
    it = iter(args)
    for a in it:
        if a.startswith("--") and "=" in a:
            key, value = a.split("=", 1)
        elif a in VALUE_OPTIONS:
            key, value = a, next(it, "")
        else:
            key, value = a, ""
        if key not in VALUE_OPTIONS and key not in FLAG_OPTIONS:
            raise Exit(
                RC_UNKNOWN_OPTION,
                f"ERROR: Option {key} is not recognized. Please run 'nvidia-smi -h'.\n\n",
            )
        opts[{"--id": "-i", "--display": "-d"}.get(key, key)] = value
    return opts


class Table:
    """The 188-field recording: header, and rows with and without units."""

    def __init__(self) -> None:
        lines = read("query-gpu.csv").splitlines()
        self.header = lines[0].split(", ")
        self.rows = [line.split(", ") for line in lines[1:] if line]
        self.bare = [
            line.split(", ") for line in read("query-gpu-nounits.csv").splitlines() if line
        ]
        self.fields = [h.split(" [")[0] for h in self.header]

    def value(self, gpu: int, field: str) -> str:
        return self.bare[gpu][self.fields.index(field)]

    def select(self, ident: str | None) -> list[int]:
        """GPU positions chosen by ``-i`` (indexes, UUIDs or PCI bus ids, comma-separated)."""
        if ident is None:
            return list(range(len(self.rows)))
        chosen = []
        for part in (p.strip() for p in ident.split(",")):
            for gpu in range(len(self.rows)):
                keys = {self.value(gpu, "index"), self.value(gpu, "uuid")}
                keys.add(self.value(gpu, "pci.bus_id").lower())
                if part in keys or part.lower() in keys:
                    chosen.append(gpu)
                    break
            else:
                raise Exit(RC_NOT_FOUND, NO_DEVICES + "\n")
        return chosen


def query_gpu(opts: dict[str, str]) -> str:
    table = Table()
    gpus = table.select(opts.get("-i"))
    fmt = [x.strip() for x in opts.get("--format", "csv").split(",")]
    cols = []
    for q in (x.strip() for x in opts["--query-gpu"].split(",")):
        if not q:
            continue
        field = ALIASES.get(q, q)
        if field.startswith("clocks_throttle_reasons."):  # the pre-555 names
            field = "clocks_event_reasons." + field.split(".", 1)[1]
        if field not in table.fields:
            raise Exit(RC_INVALID_ARG, f'Field "{q}" is not a valid field to query.\n\n')
        cols.append(table.fields.index(field))
    out = [] if "noheader" in fmt else [", ".join(table.header[c] for c in cols)]
    src = table.bare if "nounits" in fmt else table.rows
    out += [", ".join(src[g][c] for c in cols) for g in gpus]
    return "\n".join(out) + "\n"


def query_compute_apps(opts: dict[str, str]) -> str:
    names = []
    for q in (x.strip() for x in opts["--query-compute-apps"].split(",")):
        if q and q not in COMPUTE_APP_FIELDS:
            raise Exit(RC_INVALID_ARG, f'Field "{q}" is not a valid field to query.\n\n')
        if q:
            names.append(COMPUTE_APP_FIELDS[q])
    fmt = [x.strip() for x in opts.get("--format", "csv").split(",")]
    return "" if "noheader" in fmt else ", ".join(names) + "\n"


def gpu_sections(text: str, start_marker: str, end_marker: str | None) -> tuple[str, list[str]]:
    """Split a ``-q`` view into its header and one section per GPU (trailer kept in the last)."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith(start_marker)]
    head = "\n".join(lines[: starts[0]])
    sections = []
    for n, s in enumerate(starts):
        e = starts[n + 1] if n + 1 < len(starts) else len(lines)
        sections.append("\n".join(lines[s:e]))
    if end_marker is not None:  # XML: the document's closing lines follow the last </gpu>
        last = sections[-1].split("\n")
        close = max(i for i, line in enumerate(last) if line == end_marker) + 1
        sections[-1] = "\n".join(last[:close]) + "\n"
        return head, [*sections, "\n".join(last[close:])]
    return head, sections


def query(opts: dict[str, str]) -> str:
    xml = "-x" in opts or "--xml-format" in opts
    if "-d" in opts:
        raise Exit(RC_INVALID_ARG, err="nvidia-smi (lab stand-in): -q -d is not recorded\n")
    text = read("q.xml" if xml else "q.txt")
    if "-i" not in opts:
        return text
    chosen = Table().select(opts["-i"])
    if xml:
        head, parts = gpu_sections(text, "\t<gpu id=", "\t</gpu>")
        gpus, tail = parts[:-1], parts[-1]
        return "\n".join([head, *[gpus[g].rstrip("\n") for g in chosen], tail])
    head, gpus = gpu_sections(text, "GPU 0000", None)
    body = [gpus[g].rstrip("\n") for g in chosen]
    return head + "\n" + "\n\n".join(body) + "\n\n"


def version() -> str:
    driver = Table().value(0, "driver_version")
    cuda = next(
        (
            line.split(":")[1].strip()
            for line in read("q.txt").splitlines()
            if line.startswith("CUDA Version")
        ),
        "N/A",
    )
    return (
        f"NVIDIA-SMI version  : {driver}\n"
        f"NVML version        : {'.'.join(driver.split('.')[:2])}\n"
        f"DRIVER version      : {driver}\n"
        f"CUDA Version        : {cuda}\n"
    )


def usage() -> str:
    return (
        "NVIDIA System Management Interface -- lab stand-in replaying recordings from\n"
        f"{RECORDINGS}; it supports: (no options), -L, -q [-x] [-i ID],\n"
        "--query-gpu=FIELDS [--format=csv[,noheader][,nounits]] [-i ID],\n"
        "--query-compute-apps=FIELDS [--format=...], --version.\n"
    )


def answer(args: list[str]) -> str:
    """The output for ``args``; raises ``Exit`` for a non-zero exit status."""
    if os.path.exists(os.path.join(RECORDINGS, "FAIL")):
        raise Exit(RC_NO_DRIVER, NO_DRIVER + "\n")
    exact = os.path.join("args", "_".join(args).replace("/", "%"))
    if args and os.path.isfile(os.path.join(RECORDINGS, exact)):
        return read(exact)
    if not args:
        return read("default.txt")
    opts = parse(args)
    if "-h" in opts or "--help" in opts:
        return usage()
    if "--version" in opts:
        return version()
    if "-L" in opts or "--list-gpus" in opts:
        if "-i" in opts:
            raise Exit(
                RC_INVALID_ARG,
                "ERROR: Option -i is not valid for this command. "
                "Please run 'nvidia-smi -h' for help.\n\n",
            )
        return read("L.txt")
    if "--query-gpu" in opts:
        return query_gpu(opts)
    if "--query-compute-apps" in opts:
        return query_compute_apps(opts)
    if "-q" in opts or "--query" in opts:
        return query(opts)
    raise Exit(RC_INVALID_ARG, err=f"nvidia-smi (lab stand-in): nothing recorded for {args!r}\n")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        sys.stdout.write(answer(args))
    except Exit as e:
        sys.stdout.write(e.out)
        sys.stderr.write(e.err)
        return e.rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
