"""Reading untrusted TOML into typed structs, with errors that name file and key.

``tomllib`` reports syntax errors with a line and column; ``msgspec`` reports
type errors with a JSON-path (``$.quirk[0].match.vendor``). Both become an
``InputError`` whose position is a plain key path (``quirk[0].match.vendor``),
so every message reads ``file: where: what``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from mediator.errors import InputError

T = TypeVar("T")


def read_toml(path: Path, source: str | None = None) -> dict[str, Any]:
    """The parsed file. Raises InputError for a missing, unreadable or malformed file."""
    name = source or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(name, "", f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise InputError(name, "", f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_toml(text, name)


def parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(source, "", f"invalid TOML: {e}") from None


def convert(obj: object, kind: type[T], source: str, where: str) -> T:
    """``obj`` as a ``kind``; a mismatch is an InputError at ``where`` + the inner path."""
    try:
        return msgspec.convert(obj, kind, strict=True)
    except msgspec.ValidationError as e:
        message, _, path = str(e).partition(" - at `$")
        path = path.rstrip("`")
        raise InputError(source, join_path(where, path), message) from None


def join_path(where: str, inner: str) -> str:
    """``quirk[0]`` + ``.match.vendor`` -> ``quirk[0].match.vendor``."""
    if not inner:
        return where
    if not where:
        return inner.lstrip(".")
    return where + inner if inner.startswith(("[", ".")) else f"{where}.{inner}"
