"""Read and write the TOML files of training options.

Reading uses tomllib (Python 3.11+) or tomli. Writing needs no package: option files are flat key/value tables of
strings, numbers, booleans and lists of those, which `dumps_toml` writes itself.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from lorakit.errors import UserError

try:  # Python 3.11+
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as _toml  # type: ignore[no-redef]


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a TOML file; a syntax error is a UserError naming the file and the line."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            return _toml.load(fh)
    except FileNotFoundError:
        raise UserError(f"{p} does not exist.") from None
    except _toml.TOMLDecodeError as exc:
        raise UserError(f"{p} is not valid TOML: {exc}. Strings need quotes (\"...\"), Windows paths single quotes "
                        f"('C:\\dir') or doubled backslashes.") from None
    except UnicodeDecodeError:
        raise UserError(f"{p} is not UTF-8 text; save it as UTF-8.") from None


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # repr round-trips and always has '.' or 'e'
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        out = ['"']
        for ch in text:
            if ch == '"':
                out.append('\\"')
            elif ch == "\\":
                out.append("\\\\")
            elif ch == "\n":
                out.append("\\n")
            elif ch == "\t":
                out.append("\\t")
            elif ord(ch) < 0x20 or ord(ch) == 0x7F:
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        out.append('"')
        return "".join(out)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _key(key: str) -> str:
    if key and all(c.isalnum() or c in "-_" for c in key) and key.isascii():
        return key
    return _scalar(key)


def dumps_toml(data: dict[str, Any]) -> str:
    """Write a dict as TOML: top-level scalars/lists first, then one [table] per nested dict (one level; deeper
    dicts become inline tables). None values are left out (TOML has no null)."""
    lines: list[str] = []
    tables: list[tuple[str, dict]] = []
    for k, v in data.items():
        if v is None:
            continue
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{_key(k)} = {_scalar(v)}")
    for name, table in tables:
        lines.append("")
        lines.append(f"[{_key(name)}]")
        for k, v in table.items():
            if v is None:
                continue
            if isinstance(v, dict):
                inner = ", ".join(f"{_key(a)} = {_scalar(b)}" for a, b in v.items() if b is not None)
                lines.append(f"{_key(k)} = {{ {inner} }}")
            else:
                lines.append(f"{_key(k)} = {_scalar(v)}")
    return "\n".join(lines) + "\n"


def write_toml(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Atomically write `data` as TOML."""
    from lorakit.utils.atomic import write_text_atomic

    write_text_atomic(path, dumps_toml(data))
