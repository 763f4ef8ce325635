"""The server-side file browser: paths are resolved (symlinks and '..' followed) and must stay under an allowed root.

The GUI never opens a native dialog (it would open on the server, invisible over SSH); it lists folders under the
roots given with `lorakit gui --root DIR` (default: the current folder) and refuses anything outside them.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import UserError


@dataclass(frozen=True)
class Entry:
    name: str
    path: str
    is_dir: bool
    size: int
    modified: float

    def row(self) -> list:
        kind = "folder" if self.is_dir else "file"
        size = "" if self.is_dir else _human(self.size)
        return [self.name + ("/" if self.is_dir else ""), kind, size,
                time.strftime("%Y-%m-%d %H:%M", time.localtime(self.modified))]


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class Roots:
    """The folders the GUI may read and write under."""

    def __init__(self, roots):
        resolved = []
        for r in roots or [os.getcwd()]:
            p = Path(r).expanduser().resolve()
            if not p.is_dir():
                raise UserError(f"--root {r} is not a folder; give existing folders the GUI may use.")
            resolved.append(p)
        self.roots: list[Path] = list(dict.fromkeys(resolved))

    def __iter__(self):
        return iter(self.roots)

    def contains(self, path: str | os.PathLike) -> bool:
        try:
            self.check(path)
            return True
        except UserError:
            return False

    def check(self, path: str | os.PathLike, what: str = "path") -> Path:
        """The resolved path, or UserError when it lies outside every root (after following symlinks and '..')."""
        text = str(path).strip()
        if not text:
            raise UserError(f"The {what} is empty; type a path under {self.describe()} or pick one in the Files tab.")
        p = Path(text).expanduser()
        if not p.is_absolute():
            p = self.roots[0] / p
        real = p.resolve()  # follows symlinks, also for a missing tail
        for root in self.roots:
            if real == root or real.is_relative_to(root):
                return real
        raise UserError(f"The {what} {text} is outside the folders this GUI may use ({self.describe()}); "
                        f"start `lorakit gui --root DIR` to allow another folder.")

    def describe(self) -> str:
        return ", ".join(str(r) for r in self.roots)

    def listdir(self, path: str | os.PathLike, pattern: str | None = None, show_hidden: bool = False) -> list[Entry]:
        """Folders first, then files (optionally only those whose name ends with one of `pattern`'s suffixes)."""
        folder = self.check(path, "folder")
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder.")
        suffixes = tuple(s.strip().lower() for s in (pattern or "").split(",") if s.strip())
        out = []
        for child in folder.iterdir():
            if child.name.startswith(".") and not show_hidden:
                continue
            if not self.contains(child):  # a symlink pointing outside the roots is not shown
                continue
            try:
                st = child.stat()
            except OSError:
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if suffixes and not is_dir and not child.name.lower().endswith(suffixes):
                continue
            out.append(Entry(child.name, str(folder / child.name), is_dir, st.st_size, st.st_mtime))
        out.sort(key=lambda e: (not e.is_dir, e.name.lower()))
        return out

    def parent(self, path: str | os.PathLike) -> Path:
        """One folder up, but never above the root the path is under."""
        p = self.check(path, "folder")
        for root in self.roots:
            if p == root:
                return p
        up = p.parent
        return up if self.contains(up) else p


__all__ = ["Roots", "Entry"]
