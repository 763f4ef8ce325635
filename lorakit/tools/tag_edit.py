"""Editing the tag captions of a dataset: replace, remove (by name, glob or category), add a trigger word, de-duplicate,
sort and count tags across a folder of caption files.

A caption file is `<stem><caption_extension>` beside its image; the trainer reads its first line only, so edits apply to
the first line and anything after it is kept as is. Tags are separated by "," and re-joined with `separator` (", ").

Tag names are compared in a normalised form (lower case, "_" and " " equal, "\\(" and "(" equal), so
"aiming_at_viewer", "Aiming at viewer" and "aiming at viewer" are the same tag for matching, de-duplication and
category look-up; the text written is the caption's own spelling (or the replacement's, as typed).

`--keep_tokens N` names how many leading tags the trainer keeps fixed when it shuffles: de-duplication and sorting never
move or remove those N tags (nor a trigger added with `add_front`), so a trigger stays where the trainer expects it.

Writes are atomic; unless `backup=False`, each file is first copied to `DIR/.lorakit-backup/<timestamp>/<relative path>`.
A dry run prints a unified diff per changed file and touches nothing on disk.
"""

from __future__ import annotations

import csv
import datetime as _dt
import difflib
import fnmatch
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, TextIO

from lorakit.errors import UserError
from lorakit.utils.images import is_image_file

BACKUP_DIRNAME = ".lorakit-backup"

# Danbooru's tag categories; 9 (rating) exists only in the WD14 taggers' selected_tags.csv.
CATEGORY_NAMES = {"general": 0, "artist": 1, "copyright": 3, "character": 4, "meta": 5, "rating": 9}


# ----------------------------------------------------------------------------------------------------- tag strings


def split_tags(text: str) -> list[str]:
    """Tags of one caption line: split on ",", whitespace stripped, empty pieces dropped."""
    return [t.strip() for t in text.split(",") if t.strip()]


def join_tags(tags: Iterable[str], separator: str = ", ") -> str:
    return separator.join(tags)


_WS = re.compile(r"\s+")


def normalize_tag(tag: str) -> str:
    """The form used to compare tags: lower case, "_" as space, prompt escapes of parentheses undone."""
    t = tag.strip().lower().replace("\\(", "(").replace("\\)", ")").replace("_", " ")
    return _WS.sub(" ", t)


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _split_unescaped(text: str, sep: str) -> list[str]:
    """Split on `sep` not preceded by a backslash; "\\<sep>" becomes a literal sep. Other backslashes are kept."""
    parts, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] == sep:
            cur.append(sep)
            i += 2
            continue
        if c == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def parse_replacement(spec: str) -> tuple[str, list[str]]:
    """"old=new" -> (old, [new tags]). "\\=" is a literal "=" (kaomoji such as "=_="); "old=" removes old;
    "old=a, b" replaces one tag with two."""
    parts = _split_unescaped(spec, "=")
    if len(parts) != 2 or not parts[0].strip():
        raise UserError(
            f'--replace "{spec}" is not of the form "old tag=new tag". Write one replacement per --replace, e.g. '
            '--replace "aiming at viewer=aav"; escape a literal "=" in a tag as "\\=".'
        )
    return parts[0].strip(), split_tags(parts[1])


# ------------------------------------------------------------------------------------------------- categories CSV


def load_tag_categories(path: str | os.PathLike) -> dict[str, int]:
    """normalised tag -> Danbooru category number, from a WD14 `selected_tags.csv` (tag_id,name,category,count) or a
    danbooru-style CSV (tag,category[,count[,"alias,alias"]]; with or without a header). Aliases get the tag's category."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"tag CSV {path} does not exist. Pass --tags_csv with a WD14 tagger's selected_tags.csv or a danbooru-style "
            "tag,category CSV (e.g. the danbooru.csv of the a1111 tag-autocomplete extension)."
        )
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = [r for r in csv.reader(fh) if r]
    if not rows:
        raise UserError(f"tag CSV {path} is empty.")
    head = [c.strip().lower() for c in rows[0]]
    out: dict[str, int] = {}
    if "name" in head and "category" in head:  # selected_tags.csv or any CSV with a header naming the columns
        ni, ci = head.index("name"), head.index("category")
        body, ai = rows[1:], None
    else:
        ni, ci, ai = 0, 1, 3
        body = rows[1:] if not _is_int(rows[0][1] if len(rows[0]) > 1 else "") else rows
    bad = 0
    for r in body:
        if len(r) <= max(ni, ci) or not _is_int(r[ci]):
            bad += 1
            continue
        cat = int(r[ci].strip())
        out[normalize_tag(r[ni])] = cat
        if ai is not None and len(r) > ai and r[ai].strip():
            for alias in r[ai].split(","):
                if alias.strip():
                    out.setdefault(normalize_tag(alias), cat)
    if not out:
        raise UserError(
            f"tag CSV {path} has no rows of the form tag,category (category a number: 0 general, 1 artist, 3 copyright, "
            "4 character, 5 meta, 9 rating). Check that this is a tag list, not a caption or score file."
        )
    return out


def _is_int(s: str) -> bool:
    try:
        int(s.strip())
        return True
    except ValueError:
        return False


def parse_category(name: str) -> int:
    key = name.strip().lower()
    if key in CATEGORY_NAMES:
        return CATEGORY_NAMES[key]
    if _is_int(key):
        return int(key)
    raise UserError(
        f"--remove_category {name!r} is not a tag category. Use one of {', '.join(CATEGORY_NAMES)} or a Danbooru category "
        "number (0 general, 1 artist, 3 copyright, 4 character, 5 meta)."
    )


# ------------------------------------------------------------------------------------------------------ the edits


@dataclass
class TagEditOptions:
    replace: list[tuple[str, list[str]]] = field(default_factory=list)  # (old, new tags); see parse_replacement
    remove: list[str] = field(default_factory=list)  # tags or glob patterns (fnmatch: * ? [..])
    remove_categories: set[int] = field(default_factory=set)
    categories: dict[str, int] | None = None  # normalised tag -> category (load_tag_categories)
    add_front: list[str] = field(default_factory=list)  # trigger word(s), in order
    keep_tokens: int = 0
    dedupe: bool = False
    sort: bool = False

    def is_noop(self) -> bool:
        return not (self.replace or self.remove or self.remove_categories or self.add_front or self.dedupe or self.sort)


def edit_tags(tags: list[str], opts: TagEditOptions) -> list[str]:
    """Apply, in this order: replacements, removals (names/globs), category removals, trigger, de-duplication, sorting.

    The first `keep_tokens` tags (and the trigger words) are the fixed head: de-duplication drops later copies of a
    head tag but never touches the head itself, and sorting orders only the tags after it (case-insensitively).
    """
    out = list(tags)
    if opts.replace:
        table = {normalize_tag(old): new for old, new in opts.replace}
        res: list[str] = []
        for t in out:
            new = table.get(normalize_tag(t))
            res.extend([t] if new is None else new)
        out = res
    if opts.remove:
        exact = {normalize_tag(p) for p in opts.remove if not _is_glob(p)}
        globs = [normalize_tag(p) for p in opts.remove if _is_glob(p)]
        out = [t for t in out if not _matches(normalize_tag(t), exact, globs)]
    if opts.remove_categories:
        cats = opts.categories or {}
        out = [t for t in out if cats.get(normalize_tag(t)) not in opts.remove_categories]

    keep = max(0, opts.keep_tokens)
    if opts.add_front:
        triggers = [t.strip() for t in opts.add_front if t.strip()]
        head_norm = [normalize_tag(t) for t in out[:keep]]
        # A trigger already inside the fixed head stays where it is; any other copy moves to the front.
        missing = [t for t in triggers if normalize_tag(t) not in head_norm]
        if missing:
            gone = {normalize_tag(t) for t in missing}
            out = missing + [t for t in out if normalize_tag(t) not in gone]
        keep = max(keep, len(triggers))

    head, tail = out[:keep], out[keep:]
    if opts.dedupe:
        seen = {normalize_tag(t) for t in head}
        new_tail = []
        for t in tail:
            n = normalize_tag(t)
            if n not in seen:
                seen.add(n)
                new_tail.append(t)
        tail = new_tail
    if opts.sort:
        tail = sorted(tail, key=lambda t: (normalize_tag(t), t))
    return head + tail


def _matches(norm: str, exact: set[str], globs: list[str]) -> bool:
    return norm in exact or any(fnmatch.fnmatchcase(norm, g) for g in globs)


# ----------------------------------------------------------------------------------------------- caption files


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts[:-1])


# `N_name` (also `0_x`, `-3_x`: clearly dataset folders, even if training refuses their count)
_REPEAT_FOLDER = re.compile(r"-?\d+_")


def is_dataset_config(source: str | os.PathLike) -> bool:
    p = Path(source)
    return p.is_file() and p.suffix.lower() in (".toml", ".json")


def dataset_folders(source: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """The folders whose files a dataset command works on, as `lorakit train` reads the same source: a folder and its
    DreamBooth subfolders (`N_name`, e.g. `train/20_usu bear`), or every image_dir of a dataset TOML. With
    `recursive` a folder's whole tree is walked instead (hidden folders, e.g. backups, never)."""
    p = Path(source)
    if is_dataset_config(p):
        from lorakit.data.config import load_dataset_toml

        data = load_dataset_toml(p)
        dirs = [Path(sub["image_dir"]) for ds in data.get("datasets", []) for sub in ds.get("subsets", [])
                if sub.get("image_dir")]
        if not dirs:
            raise UserError(f"{p} has no subset with an image_dir; dataset commands work on image folders.")
        for d in dirs:
            if not d.is_dir():
                raise UserError(f"{p}: image_dir {d} is not a folder; fix the path in the dataset config.")
        return list(dict.fromkeys(dirs))
    if not p.is_dir():
        raise UserError(f"{p} is not a folder. Pass the dataset folder that holds the images and caption files (or "
                        "their `N_name` subfolders), or a dataset TOML.")
    if recursive:
        return [p]
    subs = sorted(d for d in p.iterdir() if d.is_dir() and _REPEAT_FOLDER.match(d.name))
    return [p, *subs]


def dataset_root(source: str | os.PathLike) -> Path:
    """The folder that relative paths, backups and --out copies are measured from: the folder itself, or for a dataset
    TOML the deepest folder holding all of its image_dirs."""
    if is_dataset_config(source):
        dirs = [d.resolve() for d in dataset_folders(source)]
        return Path(os.path.commonpath(dirs)) if len(dirs) > 1 else dirs[0]
    return Path(source)


def find_files(root: str | os.PathLike, pred: Callable[[Path], bool], recursive: bool) -> list[Path]:
    """Files (sorted) for which pred holds in the folders of `dataset_folders(root, recursive)`; hidden folders (our
    backups) are never entered."""
    out: set[Path] = set()
    for folder in dataset_folders(root, recursive):
        it = folder.rglob("*") if recursive else folder.iterdir()
        if is_dataset_config(root):
            folder = folder.resolve()
            it = (q.resolve() for q in it)
        out.update(q for q in it if q.is_file() and not _hidden(q.relative_to(folder)) and pred(q))
    return sorted(out)


def looked_in(source: str | os.PathLike, recursive: bool) -> str:
    """Where find_files looked, for a "nothing found" message."""
    if is_dataset_config(source):
        return f"the image_dir folders of {source}"
    return f"{source} and all its subfolders" if recursive else f"{source} and its `N_name` subfolders"


def nothing_found(source: str | os.PathLike, recursive: bool, what: str, hint: str = "") -> UserError:
    """The error for a dataset command that found nothing to work on (exit 0 with "0 images" looked like success)."""
    more = "" if recursive or is_dataset_config(source) else " Pass --recursive to search deeper folders too."
    return UserError(f"no {what} in {looked_in(source, recursive)}.{more}{hint}")


def find_images(root: str | os.PathLike, recursive: bool = False) -> list[Path]:
    return find_files(root, lambda p: is_image_file(p) and not p.name.startswith("."), recursive)


def find_captions(root: str | os.PathLike, caption_extension: str = ".txt", recursive: bool = False) -> list[Path]:
    ext = caption_extension.lower()
    return find_files(root, lambda p: p.name.lower().endswith(ext) and not p.name.startswith("."), recursive)


IMAGE_KINDS = "images (.png, .jpg, .jpeg, .webp, .bmp, ...)"


def caption_path(image: Path, caption_extension: str = ".txt") -> Path:
    return image.with_name(image.stem + caption_extension)


@dataclass
class CaptionText:
    """A caption file split into the first line (edited) and everything after it (kept byte for byte)."""

    first: str
    eol: str  # "\r\n", "\n" or "" (no line break after the first line)
    rest: str

    @classmethod
    def parse(cls, text: str) -> "CaptionText":
        first, nl, rest = text.partition("\n")
        eol = nl
        if first.endswith("\r"):
            first, eol = first[:-1], "\r" + nl
        return cls(first, eol, rest)

    def render(self, first: str | None = None) -> str:
        return (self.first if first is None else first) + self.eol + self.rest


def read_caption(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"caption file {path} is not UTF-8 text ({exc}). Re-save it as UTF-8 or remove it."
        ) from None


class Backup:
    """Copies originals to ROOT/.lorakit-backup/<timestamp>/ (created on first use, one folder per run)."""

    def __init__(self, root: Path, enabled: bool = True):
        self.root, self.enabled, self.dir = Path(root), enabled, None

    def save(self, path: Path) -> None:
        if not self.enabled or not path.exists():
            return
        if self.dir is None:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            d, i = self.root / BACKUP_DIRNAME / stamp, 1
            while d.exists():
                d, i = self.root / BACKUP_DIRNAME / f"{stamp}-{i}", i + 1
            self.dir = d
        dst = self.dir / path.relative_to(self.root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst)


@dataclass
class ChangeReport:
    files: int = 0  # caption files looked at
    changed: int = 0
    backup_dir: Path | None = None
    notes: list[str] = field(default_factory=list)


def apply_changes(
    root: Path,
    changes: Iterable[tuple[Path, str, str]],
    *,
    dry_run: bool,
    backup: bool,
    report: ChangeReport,
    out: TextIO | None = None,
) -> ChangeReport:
    """Write each (path, old text, new text) whose text differs: a unified diff when dry_run, else backup + atomic write."""
    from lorakit.tools.image_prep import CaptionWriter

    out = out or sys.stdout
    bk = Backup(root, enabled=backup)
    writer = CaptionWriter()
    try:
        _apply(root, changes, dry_run, bk, writer, report, out)
    finally:
        writer.close()
    report.backup_dir = bk.dir
    return report


def _apply(root, changes, dry_run, bk, writer, report, out) -> None:
    for path, old, new in changes:
        report.files += 1
        if old == new:
            continue
        report.changed += 1
        if dry_run:
            rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
            diff = difflib.unified_diff(
                old.splitlines(keepends=True), new.splitlines(keepends=True), f"a/{rel}", f"b/{rel}"
            )
            for line in diff:
                out.write(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
            continue
        bk.save(path)  # before the write is even queued
        writer.submit(path, new)


def edit_folder(
    root: str | os.PathLike,
    opts: TagEditOptions,
    *,
    caption_extension: str = ".txt",
    recursive: bool = False,
    separator: str = ", ",
    dry_run: bool = False,
    backup: bool = True,
    out: TextIO | None = None,
) -> tuple[ChangeReport, Counter]:
    """Edit every caption file under root (and its `N_name` subfolders, or a dataset TOML's image_dirs); returns the
    report and the tag frequencies after the edit."""
    files = find_captions(root, caption_extension, recursive)
    if not files:
        raise nothing_found(root, recursive, f"*{caption_extension} caption files",
                            " Caption the images first (`lorakit dataset tag`), or give --caption_extension.")
    root = dataset_root(root)
    freq: Counter = Counter()
    report = ChangeReport()

    def gen():
        for path in files:
            old = read_caption(path)
            cap = CaptionText.parse(old)
            tags = split_tags(cap.first)
            new_tags = tags if opts.is_noop() else edit_tags(tags, opts)
            freq.update(new_tags)
            # Leave a file whose tags did not change byte for byte (its own spacing may differ from `separator`).
            new = old if new_tags == tags else cap.render(join_tags(new_tags, separator))
            yield path, old, new

    apply_changes(root, gen(), dry_run=dry_run, backup=backup, report=report, out=out)
    return report, freq


def format_frequency(freq: Counter, top: int | None = None) -> str:
    items = sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))
    if top:
        items = items[:top]
    width = max((len(str(c)) for _, c in items), default=1)
    return "\n".join(f"{c:>{width}}  {t}" for t, c in items)
