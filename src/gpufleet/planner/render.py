"""Plans side by side as text: what ``gpufleet plan`` prints (``--gpu all``: one row per size)."""

from __future__ import annotations

from collections.abc import Sequence

from gpufleet.planner.plan import Plan
from gpufleet.planner.sizes import SizeRow, reason
from gpufleet.planner.units import gib
from gpufleet.planner.verdict import REFUSED

_WIDTH = 34

Row = tuple[str, list[list[str]]]   # name, then one cell (its lines) per plan


def render_table(plans: Sequence[Plan]) -> str:
    """Plans side by side (e.g. fp16 | fp8 | awq), then each plan's reasons, warnings, notes."""
    if not plans:
        return "(no plan)"
    first = plans[0]
    same_host = all((p.gpu_name, p.gpu_count, p.memory_mib)
                    == (first.gpu_name, first.gpu_count, first.memory_mib) for p in plans)
    same_model = all(p.model == first.model for p in plans)
    rows = _rows(plans, same_host=same_host, same_model=same_model)
    out = [*_heading(first, same_host=same_host, same_model=same_model), ""]
    out.extend(_columns(plans, rows))
    out.extend(_findings(plans))
    return "\n".join(out)


def _heading(first: Plan, *, same_host: bool, same_model: bool) -> list[str]:
    head: list[str] = []
    if same_model:
        head.append(f"model  {first.model}" + (f" @ {first.commit[:12]}" if first.commit else "")
                    + f" ({first.parameters:,} parameters)")
    if same_host:
        head.append(f"GPUs   {first.gpu_count} x {first.gpu_name}, {first.memory_mib:,} MiB "
                    f"({first.memory_mib - first.reserved_mib:,} usable"
                    f"{', reserve estimated' if first.reserved_estimated else ''}), "
                    f"compute capability {first.compute_capability}")
    return head


def _flag_lines(flags: Sequence[str]) -> list[str]:
    """One line per flag, with its value."""
    lines: list[str] = []
    for item in flags:
        if item.startswith("--") or not lines:
            lines.append(item)
        else:
            lines[-1] += " " + item
    return lines


def _rows(plans: Sequence[Plan], *, same_host: bool, same_model: bool) -> list[Row]:
    def cells(values: list[str]) -> list[list[str]]:
        return [[v] for v in values]

    rows: list[Row] = []
    if not same_model:
        rows.append(("model", cells([p.model for p in plans])))
    if not same_host:
        rows.append(("GPUs", cells([f"{p.gpu_count} x {p.gpu_name}" for p in plans])))
    rows += [
        ("vLLM", cells([_release_cell(p) for p in plans])),
        ("weights as", cells([p.weight_format for p in plans])),
        ("tensor parallel", cells([str(p.tensor_parallel_size) for p in plans])),
        ("weights / GPU", cells([f"{gib(p.weight_bytes_per_gpu)} "
                                 f"({p.bytes_per_parameter:.2f} B/param)" for p in plans])),
        ("budget / GPU", cells([f"{gib(p.budget_bytes_per_gpu)} (x {p.gpu_memory_utilization:g})"
                                for p in plans])),
        ("reserve / GPU", cells([_reserve_cell(p) for p in plans])),
        ("KV / token", cells([f"{p.kv_bytes_per_token_per_gpu / 1024:,.0f} KiB/GPU "
                              f"({'8-bit' if p.kv_cache_dtype.startswith('fp8') else '16-bit'}, "
                              f"{p.kv_cache_dtype})" for p in plans])),
        ("KV cache / GPU", cells([f"{gib(p.kv_cache_bytes_per_gpu)} "
                                  f"({p.headroom_fraction:.0%} of budget)" for p in plans])),
        ("tokens", cells([f"{p.kv_cache_tokens:,}" for p in plans])),
        ("KV cache bytes", cells([_kv_bytes_cell(p) for p in plans])),
        ("concurrency", cells([f"{p.max_concurrency:.2f} x {p.max_model_len:,} tokens"
                               for p in plans])),
        ("max_num_seqs", cells([str(p.max_num_seqs) for p in plans])),
        ("verdict", cells([p.verdict.upper() if p.verdict == REFUSED else p.verdict
                           for p in plans])),
        ("flags", [_flag_lines(p.flags) for p in plans]),
    ]
    return rows


def _release_cell(p: Plan) -> str:
    return f"{p.vllm_version} (graphs {'in' if p.graphs_in_budget else 'outside'} budget)"


def _reserve_cell(p: Plan) -> str:
    graphs = (f"{gib(p.graph_estimate_bytes_per_gpu)} graphs + "
              if p.graph_estimate_bytes_per_gpu else "")
    return (f"{gib(p.reserve_bytes_per_gpu)} + {graphs}"
            f"{gib(p.outside_budget_bytes_per_gpu)} outside")


def _kv_bytes_cell(p: Plan) -> str:
    """The exact KV cache, as --kv-cache-memory-bytes takes it (passed: in the flags too)."""
    if not p.kv_cache_memory_bytes:
        return "-"
    passed = "--kv-cache-memory-bytes" in p.flags
    return f"{p.kv_cache_memory_bytes:,}" + (" (passed)" if passed else "")


def _columns(plans: Sequence[Plan], rows: list[Row]) -> list[str]:
    name_w = max(len(n) for n, _ in rows) + 2
    widths = [max(_WIDTH, len(p.label) + 2) for p in plans]
    out = [" " * name_w + "".join(f"{p.label:<{w}}"
                                  for p, w in zip(plans, widths, strict=True)).rstrip(),
           " " * name_w + "".join(("-" * (w - 2)).ljust(w) for w in widths).rstrip()]
    for name, cells in rows:
        for i in range(max(len(c) for c in cells)):
            line = f"{name if i == 0 else '':<{name_w}}" + "".join(
                f"{(c[i] if i < len(c) else ''):<{w}}" for c, w in zip(cells, widths, strict=True))
            out.append(line.rstrip())
    return out


def _findings(plans: Sequence[Plan]) -> list[str]:
    out: list[str] = []
    for p in plans:
        if not (p.reasons or p.warnings or p.notes):
            continue
        out += ["", f"{p.label}: {p.verdict}"]
        out.extend(f"  x {r}" for r in p.reasons)
        out.extend(f"  ! {w}" for w in p.warnings)
        out.extend(f"  - {n}" for n in p.notes)
    return out


# -- --gpu all: one row per size ---------------------------------------------------------------

SIZE_COLUMNS = ("size", "GPUs", "$/hour", "available", "verdict", "quant", "tp", "KV tokens",
                "concurrency", "why")


def price_text(price: float | None) -> str:
    return "?" if price is None else f"${price:,.2f}"


def _size_cells(row: SizeRow) -> tuple[str, ...]:
    p = row.plan
    return (row.size.slug, f"{p.gpu_count} x {p.memory_mib / 1024:.1f} GiB",
            price_text(row.offer.price_hourly), row.offer.availability or "?",
            p.verdict.upper() if p.verdict == REFUSED else p.verdict, p.quantization,
            str(p.tensor_parallel_size), f"{p.kv_cache_tokens:,}",
            f"{p.max_concurrency:.2f} x {p.max_model_len:,}", reason(p))


def render_sizes(rows: Sequence[SizeRow]) -> str:
    """The sizes in their order, one line each, in aligned columns (the last one unpadded)."""
    table = [SIZE_COLUMNS, *(_size_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(SIZE_COLUMNS) - 1)]
    out = []
    for line in table:
        out.append("  ".join([*(c.ljust(w) for c, w in zip(line, widths, strict=False)),
                              line[-1]]).rstrip())
    return "\n".join(out)
