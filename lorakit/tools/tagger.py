"""Captioning images with a WD14-family tagger (SmilingWolf's wd-v1-4-* and wd-*-tagger-v3) through onnxruntime.

The model folder is one the user downloaded: `model.onnx` + `selected_tags.csv` (tag_id,name,category,count; category
9 rating, 0 general, 4 character; row i names output i). lorakit never downloads it.

Preprocessing is what these models were trained with: alpha composited on white, padded to a centred square with
white, resized to the model's input size (read from the ONNX input shape, NHWC), channels in BGR order, float32 0-255.

Tag selection follows sd-scripts' finetune/tag_images_by_wd14_tagger.py:
- a general tag is kept when its probability >= general_threshold, a character tag when >= character_threshold
  (both default to --thresh, 0.35); tags of other categories are ignored; kept tags come in the CSV's order;
- the rating is the arg-max over the rating rows, added first (`rating="first"`) or last (`rating="last"`) when asked;
- `remove_underscore` turns "_" into " " in tags longer than 3 characters (so kaomoji like "^_^" survive);
- `tag_replacement` "a,b;c,d" renames tag a to b (after underscore removal), "\\," and "\\;" are literal;
- undesired tags are dropped (matched before or after renaming, "_" and " " equal);
- `character_tag_expand` writes a character tag "name_(series)" as "name, series";
- `character_tags_first` puts the character tags before the general ones, `always_first_tags` moves those tags, when
  present, to the very front.
Two deliberate differences: character tags and always-first tags keep the order given (sd-scripts inserts each at
position 0, which reverses them), and images that already have a caption are skipped unless `overwrite` or `append`.
"""

from __future__ import annotations

import csv
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from lorakit.errors import UserError
from lorakit.tools.image_prep import CaptionWriter, bounded_map
from lorakit.tools.tag_edit import (
    IMAGE_KINDS,
    CaptionText,
    caption_path,
    find_images,
    nothing_found,
    join_tags,
    normalize_tag,
    read_caption,
    split_tags,
)
from lorakit.utils.images import ImageReadError, load_rgb, split_alpha

RATING, GENERAL, CHARACTER = 9, 0, 4
DEFAULT_INPUT_SIZE = 448  # all published WD14 taggers; used only when the model's input size is dynamic

WHERE_TO_GET = (
    "WD14 tagger models are published on Hugging Face by SmilingWolf (e.g. SmilingWolf/wd-v1-4-moat-tagger-v2, "
    "SmilingWolf/wd-swinv2-tagger-v3, SmilingWolf/wd-eva02-large-tagger-v3): download model.onnx and selected_tags.csv "
    "from one of those repositories into a folder and pass it as --model_dir (lorakit never downloads models)."
)


# ------------------------------------------------------------------------------------------------------- options


@dataclass
class TaggerOptions:
    general_threshold: float = 0.35
    character_threshold: float = 0.35
    undesired_tags: Sequence[str] = ()
    remove_underscore: bool = False
    character_tags_first: bool = False
    always_first_tags: Sequence[str] = ()
    rating: str = "none"  # "none" | "first" | "last"
    tag_replacements: Sequence[tuple[str, str]] = ()
    caption_separator: str = ", "
    character_tag_expand: bool = False  # "name_(series)" -> "name, series" (sd-scripts' --character_tag_expand)


def parse_tag_replacement(spec: str | None) -> list[tuple[str, str]]:
    """sd-scripts' format: "source1,target1;source2,target2", with "\\," and "\\;" standing for literal , and ;."""
    if not spec:
        return []
    out = []
    for item in _split_esc(spec, ";"):
        if not item.strip():
            continue
        pair = _split_esc(item, ",")
        if len(pair) != 2 or not pair[0].strip():
            raise UserError(
                f'--tag_replacement item "{item}" is not "source,target". Write pairs as "a,b;c,d"; escape a comma or '
                'semicolon inside a tag as "\\," or "\\;".'
            )
        out.append((_unesc(pair[0].strip()), _unesc(pair[1].strip())))
    return out


def _split_esc(text: str, sep: str) -> list[str]:
    parts, cur, i = [], "", 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            cur += text[i : i + 2]  # keep escapes for the next level; _unesc removes them
            i += 2
            continue
        if text[i] == sep:
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    parts.append(cur)
    return parts


def _unesc(text: str) -> str:
    return text.replace("\\,", ",").replace("\\;", ";")


def split_tag_list(spec: str | None, separator: str = ", ") -> list[str]:
    """A user's tag list ("1girl,1boy"), split like sd-scripts on the stripped caption separator."""
    if not spec:
        return []
    sep = separator.strip() or ","
    return [t.strip() for t in spec.split(sep) if t.strip()]


# -------------------------------------------------------------------------------------------------------- labels


@dataclass
class Labels:
    names: list[str]  # output index -> tag as written (after underscore removal and replacement)
    original: list[str]  # output index -> tag as in the CSV
    categories: list[int]
    undesired: frozenset = frozenset()  # normalised undesired tags this label set was built with

    def __post_init__(self):
        self.cat_array = np.asarray(self.categories, dtype=np.int64)
        # Matched before or after renaming, so the user may name either spelling.
        self.blocked = np.zeros(len(self.names), dtype=bool)
        if self.undesired:
            self.blocked[:] = [normalize_tag(n) in self.undesired or normalize_tag(o) in self.undesired
                               for n, o in zip(self.names, self.original)]


def read_selected_tags(path: str | os.PathLike) -> tuple[list[str], list[int]]:
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if r]
    except FileNotFoundError:
        raise UserError(f"{path} is missing. {WHERE_TO_GET}") from None
    head = [c.strip().lower() for c in rows[0]] if rows else []
    if head[:3] != ["tag_id", "name", "category"]:
        raise UserError(
            f"{path} does not start with the header tag_id,name,category,count (found {','.join(head[:4]) or 'nothing'}); "
            f"it is not a WD14 tagger's selected_tags.csv. {WHERE_TO_GET}"
        )
    names, cats = [], []
    for n, r in enumerate(rows[1:], start=2):
        try:
            names.append(r[1])
            cats.append(int(r[2]))
        except (IndexError, ValueError):
            raise UserError(f"{path} line {n} is not tag_id,name,category,count: {','.join(r)!r}.") from None
    return names, cats


def build_labels(names: list[str], categories: list[int], opts: TaggerOptions) -> Labels:
    final = list(names)
    if opts.character_tag_expand:
        for i, (n, c) in enumerate(zip(names, categories)):
            if c == CHARACTER and n.endswith(")") and "(" in n:
                head, _, series = n[:-1].rpartition("(")
                final[i] = head.rstrip("_") + opts.caption_separator + series
    final = [n.replace("_", " ") if opts.remove_underscore and len(n) > 3 else n for n in final]
    for src, dst in opts.tag_replacements:
        hit = [i for i, n in enumerate(final) if n == src] or [
            i for i, n in enumerate(final) if normalize_tag(n) == normalize_tag(src)
        ]
        if not hit:
            print(f"lorakit: warning: --tag_replacement source {src!r} is not a tag of this model", file=sys.stderr)
        for i in hit[:1]:
            final[i] = dst
    return Labels(final, list(names), list(categories), frozenset(normalize_tag(t) for t in opts.undesired_tags))


def select_tags(probs: np.ndarray, labels: Labels, opts: TaggerOptions) -> list[str]:
    """The caption tags for one image's output vector, in order."""
    if labels.undesired != frozenset(normalize_tag(t) for t in opts.undesired_tags):
        labels = Labels(labels.names, labels.original, labels.categories,
                        frozenset(normalize_tag(t) for t in opts.undesired_tags))
    cat = labels.cat_array
    probs = np.asarray(probs)
    # Vectorised thresholding: real taggers have ~10,000 outputs and keep a few dozen.
    is_general = (cat == GENERAL) & (probs >= opts.general_threshold)
    is_character = (cat == CHARACTER) & (probs >= opts.character_threshold)
    kept = np.flatnonzero((is_general | is_character) & ~labels.blocked).tolist()
    if opts.character_tags_first:
        kept = [i for i in kept if is_character[i]] + [i for i in kept if not is_character[i]]
    # else CSV order: the published CSVs list every general tag before the character tags.
    tags = [labels.names[i] for i in kept]
    if opts.rating in ("first", "last"):
        ridx = np.flatnonzero(cat == RATING)
        if len(ridx):
            best = int(ridx[int(np.argmax(probs[ridx]))])
            if not labels.blocked[best]:
                if opts.rating == "first":
                    tags.insert(0, labels.names[best])
                else:
                    tags.append(labels.names[best])
    if opts.always_first_tags:
        by_norm = {normalize_tag(t): t for t in reversed(tags)}
        front = [by_norm[normalize_tag(t)] for t in opts.always_first_tags if normalize_tag(t) in by_norm]
        tags = front + [t for t in tags if t not in front]
    # A replacement may map two tags onto one name: keep the first.
    out, seen = [], set()
    for t in tags:
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


# --------------------------------------------------------------------------------------------------------- model


def load_tagger_image(path: str | os.PathLike, size: int) -> Image.Image:
    """RGB image (alpha on white); JPEGs are decoded at a reduced scale that is still >= size, which is much faster."""
    path = Path(path)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        try:
            with Image.open(path) as im:
                im.draft("RGB", (size, size))
                im.load()
                img = ImageOps.exif_transpose(im) or im
                rgb, _ = split_alpha(img)
                return rgb
        except Exception:  # noqa: BLE001 - fall back to the full reader, which names the file in its error
            pass
    return load_rgb(path)


def preprocess(img: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image -> uint8 [size, size, 3] in BGR order, padded to a centred white square first."""
    w, h = img.size
    side = max(w, h)
    if (w, h) != (side, side):
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas
    if side != size:
        # Area averaging when shrinking (as cv2.INTER_AREA in the reference tagger), Lanczos when enlarging.
        img = img.resize((size, size), Image.BOX if side > size else Image.LANCZOS)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8)[:, :, ::-1])


def _prep_one(args: tuple[str, int]) -> tuple[str, np.ndarray | None, str | None]:
    path, size = args
    try:
        return path, preprocess(load_tagger_image(path, size), size), None
    except ImageReadError as exc:
        return path, None, str(exc)


class WD14Tagger:
    """A WD14 tagger loaded from a local folder; `predict` maps uint8/float BGR NHWC batches to probabilities."""

    def __init__(self, model_dir: str | os.PathLike, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None):
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise UserError(f"tagger folder {model_dir} does not exist. {WHERE_TO_GET}")
        onnx_path, csv_path = model_dir / "model.onnx", model_dir / "selected_tags.csv"
        if not onnx_path.is_file():
            extra = ""
            if (model_dir / "saved_model.pb").exists():
                extra = " This folder holds the Keras/TensorFlow version; lorakit runs the ONNX one (model.onnx)."
            raise UserError(f"{onnx_path} is missing.{extra} {WHERE_TO_GET}")
        if not csv_path.is_file():
            raise UserError(f"{csv_path} is missing. {WHERE_TO_GET}")
        self.tag_names, self.tag_categories = read_selected_tags(csv_path)
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(
                "onnxruntime is not installed; tagging needs it: pip install onnxruntime (or onnxruntime-gpu), "
                "or pip install 'lorakit[tag]'."
            ) from None
        available = ort.get_available_providers()
        providers = list(providers) or ["CPUExecutionProvider"]
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise UserError(
                f"--providers {','.join(unknown)} is not available in this onnxruntime (available: {', '.join(available)}). "
                "Install onnxruntime-gpu for CUDAExecutionProvider, or use CPUExecutionProvider."
            )
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(onnx_path), sess_options=so, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise UserError(f"{onnx_path} cannot be loaded by onnxruntime ({exc}). Re-download it. {WHERE_TO_GET}") from None
        inp = self.session.get_inputs()[0]
        shape = list(inp.shape)
        if len(shape) != 4 or shape[3] != 3 or inp.type != "tensor(float)":
            raise UserError(
                f"{onnx_path} takes input {inp.name} of shape {shape} ({inp.type}); a WD14 tagger takes float images "
                f"[batch, size, size, 3] (NHWC). This is not a WD14-family tagger. {WHERE_TO_GET}"
            )
        self.input_name = inp.name
        hw = [d for d in shape[1:3] if isinstance(d, int) and d > 0]
        self.size = hw[0] if hw else DEFAULT_INPUT_SIZE
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        out_shape = self.session.get_outputs()[0].shape
        n_out = out_shape[-1] if out_shape and isinstance(out_shape[-1], int) else None
        if n_out is not None and n_out != len(self.tag_names):
            raise UserError(
                f"{csv_path} lists {len(self.tag_names)} tags but {onnx_path} outputs {n_out}: the two files come from "
                f"different models. Download both from the same repository. {WHERE_TO_GET}"
            )

    def predict(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        n = len(x)
        if self.fixed_batch and n != self.fixed_batch:  # models exported with a fixed batch: pad, then cut
            chunks = []
            for s in range(0, n, self.fixed_batch):
                part = x[s : s + self.fixed_batch]
                pad = self.fixed_batch - len(part)
                if pad:
                    part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), np.float32)])
                chunks.append(self.session.run(None, {self.input_name: part})[0][: self.fixed_batch - pad])
            probs = np.concatenate(chunks)
        else:
            probs = self.session.run(None, {self.input_name: x})[0]
        if probs.shape[-1] != len(self.tag_names):
            raise UserError(
                f"the tagger outputs {probs.shape[-1]} values per image but selected_tags.csv lists "
                f"{len(self.tag_names)} tags: the files come from different models. {WHERE_TO_GET}"
            )
        return probs

    def labels(self, opts: TaggerOptions) -> Labels:
        return build_labels(self.tag_names, self.tag_categories, opts)


# ------------------------------------------------------------------------------------------------ folder tagging


@dataclass
class TagReport:
    images: int = 0
    written: int = 0
    skipped_existing: int = 0
    failed: list[str] = field(default_factory=list)
    frequency: Counter = field(default_factory=Counter)


def tag_folder(
    root: str | os.PathLike,
    model_dir: str | os.PathLike,
    opts: TaggerOptions | None = None,
    *,
    caption_extension: str = ".txt",
    recursive: bool = False,
    batch_size: int = 8,
    workers: int = 1,
    overwrite: bool = False,
    append: bool = False,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    progress: bool = True,
    tagger: WD14Tagger | None = None,
) -> TagReport:
    """Write `<stem><caption_extension>` for each image under root. Existing non-empty captions are skipped unless
    overwrite (replace them) or append (add the new tags not already there, after the existing ones)."""
    from tqdm import tqdm

    opts = opts or TaggerOptions()
    if not caption_extension.startswith("."):
        raise UserError(f"--caption_extension {caption_extension!r} must start with a dot, e.g. .txt")
    images = find_images(root, recursive)
    if not images:
        raise nothing_found(root, recursive, IMAGE_KINDS)
    if tagger is None and not Path(model_dir).is_dir():  # also when all are captioned: a typo is no success
        raise UserError(f"--model_dir {model_dir}: tagger folder does not exist. {WHERE_TO_GET}")
    report = TagReport(images=len(images))
    todo = []
    for img in images:
        cap = caption_path(img, caption_extension)
        if not (overwrite or append) and cap.exists() and read_caption(cap).strip():
            report.skipped_existing += 1
        else:
            todo.append(img)
    if not todo:
        return report
    tagger = tagger or WD14Tagger(model_dir, providers)
    labels = tagger.labels(opts)
    size = tagger.size
    batch_size = max(1, batch_size)

    def flush(batch: list[tuple[str, np.ndarray]]):
        probs = tagger.predict(np.stack([a for _, a in batch]))
        for (path, _), p in zip(batch, probs):
            tags = select_tags(p, labels, opts)
            cap = caption_path(Path(path), caption_extension)
            text = None
            if append and cap.exists():
                old = CaptionText.parse(read_caption(cap))
                existing = split_tags(old.first)
                have = {normalize_tag(t) for t in existing}
                tags = existing + [t for t in tags if normalize_tag(t) not in have]
                if old.eol:  # keep any further lines (wildcard captions) as they were
                    text = old.render(join_tags(tags, opts.caption_separator))
            report.frequency.update(tags)
            writer.submit(cap, text if text is not None else join_tags(tags, opts.caption_separator) + "\n")
            report.written += 1

    batch: list[tuple[str, np.ndarray]] = []
    bar = tqdm(total=len(todo), unit="img", desc="tagging", disable=not progress, smoothing=0.0)
    writer = CaptionWriter()
    try:
        for path, arr, err in bounded_map(_prep_one, ((str(p), size) for p in todo), workers):
            bar.update(1)
            if arr is None:
                report.failed.append(err or path)
                continue
            batch.append((path, arr))
            if len(batch) >= batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    finally:
        bar.close()
        writer.close()
    return report
