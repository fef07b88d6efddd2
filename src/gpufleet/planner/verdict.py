"""What a plan's findings add up to: ``fits``, ``fragile`` or ``refused``."""

from __future__ import annotations

from gpufleet.planner.checks import Findings
from gpufleet.planner.memory import MemoryLayout
from gpufleet.planner.units import gib

FITS, FRAGILE, REFUSED = "fits", "fragile", "refused"

HEADROOM_MIN_FRACTION = 0.10   # KV cache under 10% of the budget: fragile
MIN_CONCURRENCY = 4.0          # fewer than 4 sequences of max_model_len at once: fragile


def check_capacity(layout: MemoryLayout, max_num_seqs: int, model_len: int,
                   found: Findings) -> None:
    """A plan that starts: is there room beyond the weights, for enough long requests?"""
    if found.reasons:
        return
    if layout.kv_cache < HEADROOM_MIN_FRACTION * layout.budget:
        found.warnings.append(
            f"KV cache {gib(layout.kv_cache)} is {layout.kv_cache / layout.budget:.1%} of the "
            f"{gib(layout.budget)} budget (< {HEADROOM_MIN_FRACTION:.0%}): little room beyond "
            "the weights")
    if layout.concurrency < MIN_CONCURRENCY:
        found.warnings.append(
            f"only {layout.concurrency:.2f} sequences of {model_len:,} tokens fit at once "
            f"({layout.tokens:,} tokens): long requests queue or are preempted")
    if max_num_seqs > layout.concurrency:
        found.notes.append(
            f"max_num_seqs {max_num_seqs} is above the {layout.concurrency:.2f} sequences of "
            f"{model_len:,} tokens the cache holds at once: fine for shorter requests; when "
            "the cache fills vLLM preempts (and later recomputes) sequences")


def verdict_of(found: Findings) -> str:
    """Refused with any reason; fragile with any warning; else fits."""
    return REFUSED if found.reasons else FRAGILE if found.warnings else FITS
