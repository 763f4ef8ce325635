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
        try:
            p = Path(text).expanduser()
            if not p.is_absolute():
                p = self.roots[0] / p
            real = p.resolve()  # follows symlinks, also for a missing tail
        except (ValueError, OSError, RuntimeError) as exc:  # NUL bytes, symlink loops, an unknown ~user
            raise UserError(f"The {what} {text!r} is not a usable path ({exc}).") from None
        for root in self.roots:
            if real == root or real.is_relative_to(root):
                return real
        raise UserError(f"The {what} {text} is outside the folders this GUI may use ({self.describe()}); "
                        f"start `lorakit gui --root DIR` to allow another folder.")

    def describe(self) -> str:
        return ", ".join(str(r) for r in self.roots)

    def check_tree(self, folder: str | os.PathLike, what: str = "folder", max_entries: int = 500_000) -> Path:
        """`folder` and everything under it (followed through symlinked folders that stay inside) lie inside the
        roots: a symlink anywhere below that leaves them is refused, naming it. Tools that walk a folder (dataset
        scan, tagging, tag editing, LoRA lists) read and write what the walk finds."""
        top = self.check(folder, what)
        if not top.is_dir():
            return top
        seen = {top}
        stack = [top]
        count = 0
        while stack:
            current = stack.pop()
            try:
                entries = list(os.scandir(current))
            except OSError:
                continue
            for e in entries:
                count += 1
                if count > max_entries:
                    return top
                if e.is_symlink():
                    target = Path(e.path).resolve()
                    if not any(target == r or target.is_relative_to(r) for r in self.roots):
                        raise UserError(f"The {what} {folder} contains {e.path}, a link to {target}, which is outside "
                                        f"the folders this GUI may use ({self.describe()}). Remove the link, copy the "
                                        "files in, or start `lorakit gui --root DIR` with that folder as a root too.")
                    if target.is_dir() and target not in seen:
                        seen.add(target)
                        stack.append(target)
                elif e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
        return top

    def check_metadata(self, path: str | os.PathLike, image_dir: str | os.PathLike | None, what: str) -> None:
        """The images a fine-tuning metadata JSON/JSONL names (absolute keys, or keys under image_dir) lie inside."""
        import json

        p = self.check(path, what)
        try:
            text = p.read_text(encoding="utf-8")
            if p.suffix.lower() == ".jsonl":
                keys = [json.loads(line).get("image_path", "") for line in text.splitlines() if line.strip()]
            else:
                keys = list(json.loads(text))
        except (OSError, ValueError, AttributeError):
            return  # unreadable: the dataset layer reports it with its own message
        for key in keys:
            image = Path(str(key))
            if not image.is_absolute():
                image = Path(image_dir or os.getcwd()) / image
            self.check(image, f"image listed in {what} {path}")

    def check_dataset(self, train_data_dir=None, reg_data_dir=None, dataset_config=None, in_json=None) -> dict:
        """Every folder and file a dataset reads lies inside the roots, including the image_dir/metadata_file/
        conditioning_data_dir entries of a dataset TOML and the images a metadata JSON names. Returns {field: error
        message} (empty when all is inside), keyed by the form field that led there."""
        errors: dict[str, str] = {}

        def guard(field: str, fn, *args) -> None:
            if field in errors:
                return
            try:
                fn(*args)
            except UserError as exc:
                errors[field] = str(exc)

        for field, folder in (("train_data_dir", train_data_dir), ("reg_data_dir", reg_data_dir)):
            if folder and not in_json:
                guard(field, self.check_tree, folder, field)
        if in_json:
            guard("in_json", self.check_metadata, in_json, train_data_dir, "in_json")
        if dataset_config:
            guard("dataset_config", self._check_dataset_config, dataset_config)
        return errors

    def _check_dataset_config(self, path) -> None:
        from lorakit.train.config_files import read_toml

        p = self.check(path, "dataset_config")
        if p.suffix.lower() == ".json":
            import json

            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return  # the dataset layer reports a broken file
        else:
            try:
                data = read_toml(p)
            except UserError:
                return
        if not isinstance(data, dict):
            return
        sections = [data.get("general") or {}]
        for ds in data.get("datasets") or []:
            if isinstance(ds, dict):
                sections.append(ds)
                sections += [s for s in ds.get("subsets") or [] if isinstance(s, dict)]
        where = f"dataset_config {path}"
        for sec in sections:
            for key in ("image_dir", "conditioning_data_dir"):
                value = sec.get(key)
                if isinstance(value, str) and value:
                    # relative entries are read from the worker's working folder, the server's own
                    self.check_tree(os.path.join(os.getcwd(), value), f"{key} {value!r} in {where}")
            meta = sec.get("metadata_file")
            if isinstance(meta, str) and meta:
                image_dir = sec.get("image_dir")
                self.check_metadata(os.path.join(os.getcwd(), meta),
                                    os.path.join(os.getcwd(), image_dir) if isinstance(image_dir, str) else None,
                                    f"metadata_file in {where}")

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
