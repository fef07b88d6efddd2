"""Render gpufleet's templates, found inside the installed package (not the working directory)."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

_PLAIN = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


def template_path(name: str) -> Path:
    """Absolute path of a shipped template (pyinfra's files.template wants a path)."""
    return Path(str(resources.files("gpufleet.templates").joinpath(name)))


def systemd_quote(value: object) -> str:
    """Quote one word for a systemd ExecStart= line (and escape systemd's % and $ specifiers)."""
    text = str(value).replace("%", "%%").replace("$", "$$")
    if _PLAIN.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources.files("gpufleet.templates"))),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["systemd_quote"] = systemd_quote
    return env


def render(name: str, **context: Any) -> str:
    return environment().get_template(name).render(**context)
