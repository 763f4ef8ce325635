"""Quality tags from booru scores: add "high quality" / "best quality" / "masterpiece" to captions by score.

Seed 000 (its ReLoRA dataset) adds "high quality" to images scoring >= 6, "best quality" to >= 18 and "masterpiece" to
>= 60 on Danbooru. Those read as tiers, so the default `mode="highest"` adds only the tag of the highest tier reached:
one quality word per image, as in the NovelAI/Animagine quality-tag convention, which keeps the tags distinct (with
`mode="cumulative"` every good image also carries "high quality", so that tag would mean little more than "scored").
`mode="cumulative"` adds every tag reached, highest first ("masterpiece, best quality, high quality").

Scores come from one file (`--scores`: JSON or CSV, keyed by file name, stem or path relative to the folder) or, without
it, from per-image sidecar JSON files as booru downloaders write them (gallery-dl's `<image>.json` with
--write-metadata, or `<stem>.json`), reading the field `score` (a number, or e621's {"total": ...}).

Re-running is safe: the configured quality tags already in a caption are removed before the right one is added, so
changing thresholds updates captions instead of piling tags up. The tags go in front, after the first `keep_tokens`
tags (so a trigger kept fixed by the trainer stays first). Images without a score or without a caption file are left
alone and counted.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from lorakit.errors import UserError
from lorakit.tools.tag_edit import (
    IMAGE_KINDS,
    CaptionText,
    ChangeReport,
    apply_changes,
    caption_path,
    dataset_root,
    find_images,
    nothing_found,
    join_tags,
    normalize_tag,
    read_caption,
    split_tags,
)

DEFAULT_THRESHOLDS = "6=high quality,18=best quality,60=masterpiece"
KEY_COLUMNS = ("file", "filename", "file_name", "image", "image_key", "path", "name", "key", "id", "md5")


def parse_thresholds(spec: str) -> list[tuple[float, str]]:
    """"6=high quality,18=best quality" -> [(6.0, "high quality"), (18.0, "best quality")], ascending."""
    out = []
    for item in spec.split(","):
        if not item.strip():
            continue
        num, eq, tag = item.partition("=")
        try:
            value = float(num.strip())
        except ValueError:
            value = None
        if not eq or value is None or not tag.strip():
            raise UserError(
                f'--thresholds item "{item.strip()}" is not "score=tag". Example: --thresholds "{DEFAULT_THRESHOLDS}".'
            )
        out.append((value, tag.strip()))
    if not out:
        raise UserError(f'--thresholds is empty. Example: --thresholds "{DEFAULT_THRESHOLDS}".')
    return sorted(out, key=lambda x: x[0])


def quality_tags_for(score: float, thresholds: list[tuple[float, str]], mode: str = "highest") -> list[str]:
    """Tags for a score (score >= threshold reaches it): the highest one, or all reached (highest first)."""
    reached = [tag for value, tag in thresholds if score >= value]
    if not reached:
        return []
    if mode == "highest":
        return [reached[-1]]
    if mode == "cumulative":
        return reached[::-1]
    raise UserError(f"--mode {mode!r} must be highest or cumulative.")


# ----------------------------------------------------------------------------------------------------- scores in


def _score_value(v: Any, field_path: str) -> float | None:
    for part in filter(None, field_path.split(".")):
        if isinstance(v, dict):
            if part not in v:
                return None
            v = v[part]
    if isinstance(v, dict):  # e621: "score": {"up": .., "down": .., "total": ..}
        v = v.get("total")
    if isinstance(v, bool) or v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def load_scores(path: str | os.PathLike, field_name: str = "score") -> dict[str, float]:
    """key -> score from a JSON ({key: score}, {key: {"score": ..}}, [{"file": .., "score": ..}]) or CSV file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"score file {path} does not exist.")
    out: dict[str, float] = {}
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"score file {path} is not valid JSON ({exc}).") from None
        if isinstance(data, dict):
            for k, v in data.items():
                s = _score_value(v, field_name) if isinstance(v, dict) else _score_value(v, "")
                if s is not None:
                    out[str(k)] = s
        elif isinstance(data, list):
            for entry in data:
                if not isinstance(entry, dict):
                    continue
                key = next((entry[c] for c in KEY_COLUMNS if c in entry and entry[c] not in (None, "")), None)
                s = _score_value(entry, field_name)
                if key is not None and s is not None:
                    out[str(key)] = s
    else:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if r]
        if rows:
            head = [c.strip().lower() for c in rows[0]]
            if field_name.lower() in head:
                si = head.index(field_name.lower())
                ki = next((head.index(c) for c in KEY_COLUMNS if c in head), 0)
                body = rows[1:]
            else:
                ki, si, body = 0, 1, rows
            for r in body:
                if len(r) > max(ki, si):
                    s = _score_value(r[si].strip(), "")
                    if s is not None:
                        out[r[ki].strip()] = s
    if not out:
        raise UserError(
            f"score file {path} has no scores. Expected JSON {{\"image.png\": 12, ...}}, {{\"image.png\": {{\"{field_name}\": "
            f"12}}}} or [{{\"file\": \"image.png\", \"{field_name}\": 12}}], or a CSV with columns file,{field_name}."
        )
    return out


def sidecar_score(image: Path, field_name: str = "score") -> float | None:
    for side in (image.with_name(image.name + ".json"), image.with_suffix(".json")):
        if side.is_file():
            try:
                data = json.loads(side.read_text(encoding="utf-8-sig"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise UserError(f"metadata file {side} is not valid JSON ({exc}).") from None
            if isinstance(data, dict):
                return _score_value(data, field_name)
    return None


def score_of(image: Path, root: Path, table: dict[str, float] | None, field_name: str) -> float | None:
    if table is None:
        return sidecar_score(image, field_name)
    rel = image.relative_to(root).as_posix()
    for key in (rel, image.name, image.stem, str(image)):
        if key in table:
            return table[key]
    return None


# --------------------------------------------------------------------------------------------------- captions out


def apply_quality(tags: list[str], add: list[str], vocabulary: list[str], keep_tokens: int = 0) -> list[str]:
    """Remove every vocabulary tag, then insert `add` after the first keep_tokens tags."""
    vocab = {normalize_tag(t) for t in vocabulary}
    rest = [t for t in tags if normalize_tag(t) not in vocab]
    k = max(0, min(keep_tokens, len(rest)))
    return rest[:k] + list(add) + rest[k:]


@dataclass
class QualityReport(ChangeReport):
    no_score: list[str] = field(default_factory=list)
    no_caption: list[str] = field(default_factory=list)
    tagged: dict[str, int] = field(default_factory=dict)  # quality tag -> images


def add_quality_tags(
    root: str | os.PathLike,
    *,
    scores: str | os.PathLike | None = None,
    thresholds: str | list[tuple[float, str]] = DEFAULT_THRESHOLDS,
    mode: str = "highest",
    keep_tokens: int = 0,
    score_field: str = "score",
    caption_extension: str = ".txt",
    recursive: bool = False,
    separator: str = ", ",
    dry_run: bool = False,
    backup: bool = True,
    out: TextIO | None = None,
) -> QualityReport:
    images = find_images(root, recursive)
    if not images:
        raise nothing_found(root, recursive, IMAGE_KINDS)
    root = dataset_root(root)
    th = parse_thresholds(thresholds) if isinstance(thresholds, str) else sorted(thresholds)
    if mode not in ("highest", "cumulative"):
        raise UserError(f"--mode {mode!r} must be highest or cumulative.")
    vocabulary = [t for _, t in th]
    table = load_scores(scores, score_field) if scores else None
    report = QualityReport()

    def gen():
        for image in images:
            rel = image.relative_to(root).as_posix()
            s = score_of(image, root, table, score_field)
            if s is None:
                report.no_score.append(rel)
                continue
            cap = caption_path(image, caption_extension)
            if not cap.is_file():
                report.no_caption.append(rel)
                continue
            add = quality_tags_for(s, th, mode)
            for t in add:
                report.tagged[t] = report.tagged.get(t, 0) + 1
            old = read_caption(cap)
            ct = CaptionText.parse(old)
            tags = split_tags(ct.first)
            new_tags = apply_quality(tags, add, vocabulary, keep_tokens)
            yield cap, old, old if new_tags == tags else ct.render(join_tags(new_tags, separator))

    apply_changes(root, gen(), dry_run=dry_run, backup=backup, report=report, out=out)
    return report
