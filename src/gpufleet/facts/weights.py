"""Facts about model weights staged on a host."""

from __future__ import annotations

from pyinfra.api import FactBase, QuoteString, StringCommand
from typing_extensions import override


def marker_path(models_dir: str, model: str, commit: str) -> str:
    """The completion marker stage_weights.py writes last (same layout as the host script)."""
    repo = "models--" + model.replace("/", "--")
    return f"{models_dir.rstrip('/')}/hub/{repo}/.gpufleet/{commit}.complete"


class WeightsStaged(FactBase[bool]):
    """
    Returns whether ``model`` is completely staged at ``commit`` under ``models_dir`` (its
    completion marker exists), without listing the files.
    """

    @override
    def command(self, models_dir: str, model: str, commit: str) -> StringCommand:
        return StringCommand("test", "-f", QuoteString(marker_path(models_dir, model, commit)),
                             "&&", "echo", "yes", "||", "echo", "no")

    @staticmethod
    def default() -> bool:
        return False

    @override
    def process(self, output: list[str]) -> bool:
        return bool(output) and output[-1].strip() == "yes"
