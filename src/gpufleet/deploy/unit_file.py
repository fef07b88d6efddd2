"""Render gpufleet's templates, found inside the installed package (not the working directory).

Every value that lands in a systemd unit goes through a filter made for where it lands:
``systemd_quote`` for one word of an ``Exec*=`` command line (always exactly one argument, taken
literally), ``systemd_text`` for the value of a setting such as ``Description=`` and
``systemd_comment`` for a comment line. The spec validates values first; these filters make
sure a value that got through could still never add a line, a word or a specifier.
"""

from __future__ import annotations

import re
import unicodedata
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

# words systemd takes literally when unquoted: no quotes, backslash, whitespace, ";", "$"
_PLAIN = re.compile(r"[A-Za-z0-9_@%+=:,./-]+", re.ASCII)  # after % is doubled
# C escapes systemd's command-line parser undoes (systemd.service(5), "Command lines")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "\a": "\\a",
            "\b": "\\b", "\f": "\\f", "\v": "\\v"}


def template_path(name: str) -> Path:
    """Absolute path of a shipped template (pyinfra's files.template wants a path)."""
    return Path(str(resources.files("gpufleet.templates").joinpath(name)))


def _unprintable(c: str) -> bool:
    return unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")


def _escape(c: str) -> str:
    if c in _ESCAPES:
        return _ESCAPES[c]
    if _unprintable(c):
        return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000 \
            else f"\\U{ord(c):08x}"
    return c


def systemd_quote(value: object) -> str:
    """Quote one word for a systemd ``Exec*=`` line: exactly one argument, taken literally.

    ``%`` (specifiers) and ``$`` (environment variables) are doubled; anything else than a plain
    word is double-quoted with backslash, double quote, newline, tab and every other control or
    separator character as a C escape, so the word can never end the line, split into several
    words, or be a lone ``;`` (systemd's command separator). NUL cannot be passed at all."""
    text = str(value)
    if "\0" in text:
        raise ValueError("a NUL character cannot be passed on a systemd command line")
    text = text.replace("%", "%%").replace("$", "$$")
    if _PLAIN.fullmatch(text):
        return text
    return '"' + "".join(_escape(c) for c in text) + '"'


def _check_line(value: object, where: str) -> str:
    text = str(value)
    bad = next((c for c in text if _unprintable(c)), None)
    if bad is not None:
        raise ValueError(f"refusing to render {text!r} into a systemd {where}: it contains "
                         f"the character U+{ord(bad):04X}")
    return text


def systemd_text(value: object) -> str:
    """A value for a unit setting such as ``Description=``: one line (control characters are
    refused), ``%`` doubled (systemd expands specifiers there), no trailing backslash (which
    would continue the setting on the next line)."""
    text = _check_line(value, "setting")
    if text.endswith("\\"):
        raise ValueError(f"refusing to render {text!r} into a systemd setting: a trailing "
                         "backslash continues the line")
    return text.replace("%", "%%")


def systemd_comment(value: object) -> str:
    """Text for a ``#`` comment line: one line (control characters are refused)."""
    return _check_line(value, "comment")


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources.files("gpufleet.templates"))),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["systemd_quote"] = systemd_quote
    env.filters["systemd_text"] = systemd_text
    env.filters["systemd_comment"] = systemd_comment
    return env


def render(name: str, **context: Any) -> str:
    return environment().get_template(name).render(**context)
