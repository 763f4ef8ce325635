"""`lorakit dataset tag | tags | quality | resize | dedupe`: the chores before a training run.

tag      caption images with a local WD14 tagger (ONNX), options as in sd-scripts' tag_images_by_wd14_tagger.py
tags     edit caption files: replace, remove (names, globs, categories), add a trigger, dedupe, sort, count
quality  add quality tags by booru score (default 6: high quality, 18: best quality, 60: masterpiece)
resize   downscale images above a target area, keeping aspect, on all cores
dedupe   find exact and near-duplicate images; report or move them
"""

from __future__ import annotations

import argparse
import sys


def _bar(args) -> bool:
    """A progress bar in a terminal only: in a log file tqdm's redraws would run together into one line."""
    from lorakit.utils.terminal import want_bar

    return want_bar(args.no_progress)


def register(subparsers) -> None:
    _register_tag(subparsers)
    _register_tags(subparsers)
    _register_quality(subparsers)
    _register_resize(subparsers)
    _register_dedupe(subparsers)


def _add_common(p: argparse.ArgumentParser, caption: bool = True) -> None:
    p.add_argument("dir", help="dataset folder: its images and those of its `N_name` subfolders (the layout "
                               "`lorakit train --train_data_dir` reads, e.g. train/ with train/20_usu bear/), or a "
                               "dataset TOML (its image_dir folders)")
    p.add_argument("--recursive", action="store_true",
                   help="walk every subfolder, not only `N_name` ones (hidden folders are skipped)")
    if caption:
        p.add_argument("--caption_extension", default=".txt",
                       help="caption file extension (default .txt, the trainer's default too)")


def _add_write_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--caption_separator", default=", ", help='separator used to join tags (default ", ")')
    p.add_argument("--dry_run", action="store_true", help="print a unified diff per file and change nothing")
    p.add_argument("--backup", dest="backup", action="store_true", default=True,
                   help="copy originals to DIR/.lorakit-backup/<timestamp>/ before writing (default)")
    p.add_argument("--no_backup", dest="backup", action="store_false", help="overwrite captions without a backup")


# ------------------------------------------------------------------------------------------------------------ tag


def _register_tag(sub) -> None:
    p = sub.add_parser(
        "tag", help="caption images with a local WD14 tagger (ONNX)",
        description="Write <stem>.txt captions with a WD14-family tagger from a local folder holding model.onnx and "
                    "selected_tags.csv (e.g. downloaded from SmilingWolf/wd-swinv2-tagger-v3 on Hugging Face). "
                    "Images that already have a caption are skipped unless --overwrite or --append_tags.",
    )
    _add_common(p)
    p.add_argument("--model_dir", required=True, help="folder with model.onnx and selected_tags.csv")
    p.add_argument("--thresh", type=float, default=0.35, help="confidence needed to add a tag (default 0.35)")
    p.add_argument("--general_threshold", type=float, default=None, help="for general tags (default: --thresh)")
    p.add_argument("--character_threshold", type=float, default=None, help="for character tags (default: --thresh)")
    p.add_argument("--undesired_tags", default="", help='tags never written, e.g. "solo,simple background"')
    p.add_argument("--remove_underscore", action="store_true",
                   help="write tags with spaces instead of underscores (tags of 3 characters or fewer, e.g. ^_^, kept)")
    p.add_argument("--character_tags_first", action="store_true", help="character tags before general tags")
    p.add_argument("--always_first_tags", default=None, help='tags put first when present, e.g. "1girl,1boy"')
    p.add_argument("--use_rating_tags", action="store_true", help="add the rating tag (general, sensitive, ...) first")
    p.add_argument("--use_rating_tags_as_last_tag", action="store_true", help="add the rating tag last")
    p.add_argument("--tag_replacement", default=None,
                   help='rename tags: "source1,target1;source2,target2" (escape , and ; in tags as \\, and \\;)')
    p.add_argument("--append_tags", action="store_true",
                   help="keep existing captions and append the new tags not already in them")
    p.add_argument("--overwrite", action="store_true", help="re-tag images that already have a caption")
    p.add_argument("--caption_separator", default=", ", help='separator between tags (default ", ")')
    p.add_argument("--batch_size", type=int, default=8, help="images per model call (default 8)")
    p.add_argument("--character_tag_expand", action="store_true",
                   help='write a character tag "name_(series)" as two tags "name, series"')
    p.add_argument("--workers", "--max_data_loader_n_workers", dest="workers", type=int, default=1,
                   help="processes that decode and prepare images (default 1)")
    p.add_argument("--onnx", action="store_true", help=argparse.SUPPRESS)  # sd-scripts flag; lorakit always uses ONNX
    p.add_argument("--providers", default="CPUExecutionProvider",
                   help="onnxruntime execution providers, comma-separated (default CPUExecutionProvider; "
                        "e.g. CUDAExecutionProvider,CPUExecutionProvider with onnxruntime-gpu)")
    p.add_argument("--frequency_tags", action="store_true", help="print how often each tag was written")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_tag)


def run_tag(args) -> int:
    from lorakit.errors import UserError
    from lorakit.tools.tag_edit import format_frequency
    from lorakit.tools.tagger import TaggerOptions, parse_tag_replacement, split_tag_list, tag_folder

    if args.use_rating_tags and args.use_rating_tags_as_last_tag:
        raise UserError("--use_rating_tags and --use_rating_tags_as_last_tag exclude each other: pick one.")
    if args.overwrite and args.append_tags:
        raise UserError("--overwrite replaces existing captions and --append_tags extends them: pick one.")
    sep = args.caption_separator
    opts = TaggerOptions(
        general_threshold=args.thresh if args.general_threshold is None else args.general_threshold,
        character_threshold=args.thresh if args.character_threshold is None else args.character_threshold,
        undesired_tags=split_tag_list(args.undesired_tags, sep),
        remove_underscore=args.remove_underscore,
        character_tags_first=args.character_tags_first,
        always_first_tags=split_tag_list(args.always_first_tags, sep),
        rating="first" if args.use_rating_tags else "last" if args.use_rating_tags_as_last_tag else "none",
        tag_replacements=parse_tag_replacement(args.tag_replacement),
        caption_separator=sep,
        character_tag_expand=args.character_tag_expand,
    )
    rep = tag_folder(
        args.dir, args.model_dir, opts,
        caption_extension=args.caption_extension, recursive=args.recursive, batch_size=args.batch_size,
        workers=args.workers, overwrite=args.overwrite, append=args.append_tags,
        providers=[s.strip() for s in args.providers.split(",") if s.strip()], progress=_bar(args),
    )
    if args.frequency_tags and rep.frequency:
        print("Tag frequencies:")
        print(format_frequency(rep.frequency))
    for err in rep.failed:
        print(f"lorakit: warning: skipped: {err}", file=sys.stderr)
    print(f"{rep.images} images: {rep.written} captions written, {rep.skipped_existing} already captioned "
          f"(skipped{'' if rep.skipped_existing == 0 else '; --overwrite or --append_tags to redo them'}), "
          f"{len(rep.failed)} unreadable.")
    return 1 if rep.failed and not rep.written else 0


# ----------------------------------------------------------------------------------------------------------- tags


def _register_tags(sub) -> None:
    p = sub.add_parser(
        "tags", help="edit caption files: replace, remove, add a trigger, dedupe, sort, count",
        description="Edit the tags of every caption file in DIR. Order: --replace, --remove, --remove_category, "
                    "--add_front, --dedupe, --sort. Tags compare with '_' and ' ' equal and case ignored. "
                    "Originals are backed up to DIR/.lorakit-backup/<timestamp>/ unless --no_backup; --dry_run "
                    "prints the diff and changes nothing.",
    )
    _add_common(p)
    p.add_argument("--replace", action="append", default=[], metavar="OLD=NEW",
                   help='replace a tag, e.g. "aiming at viewer=aav" (repeatable; "old=" removes; "\\=" is a literal =)')
    p.add_argument("--remove", nargs="+", action="extend", default=[], metavar="TAG",
                   help='tags or glob patterns to remove, e.g. --remove "solo" "*background"')
    p.add_argument("--remove_category", action="append", default=[], metavar="CATEGORY",
                   help="remove every tag of this category (artist, copyright, character, meta, general, rating "
                        "or a number); needs --tags_csv")
    p.add_argument("--tags_csv", default=None,
                   help="tag,category CSV: a WD14 selected_tags.csv or a danbooru-style tag list")
    p.add_argument("--add_front", action="append", default=[], metavar="TRIGGER",
                   help="put this trigger word first (moved there if present; repeatable, kept in order)")
    p.add_argument("--keep_tokens", type=int, default=0,
                   help="leading tags the trainer keeps fixed: never moved by --dedupe/--sort (the trigger counts)")
    p.add_argument("--dedupe", action="store_true", help="remove repeated tags (first copy kept)")
    p.add_argument("--sort", action="store_true", help="sort the tags after the fixed ones alphabetically")
    p.add_argument("--show_frequency", action="store_true", help="print tag counts (after the edits)")
    p.add_argument("--top", type=int, default=None, help="with --show_frequency, only the N most frequent")
    _add_write_opts(p)
    p.set_defaults(func=run_tags)


def run_tags(args) -> int:
    from lorakit.errors import UserError
    from lorakit.tools.tag_edit import (
        TagEditOptions, edit_folder, format_frequency, load_tag_categories, parse_category, parse_replacement,
    )

    cats = {parse_category(c) for c in args.remove_category}
    if cats and not args.tags_csv:
        raise UserError("--remove_category needs --tags_csv: a CSV mapping each tag to its category (a WD14 "
                        "selected_tags.csv, or a danbooru-style tag,category list such as tag-autocomplete's danbooru.csv).")
    if args.keep_tokens < 0:
        raise UserError("--keep_tokens must be 0 or more.")
    opts = TagEditOptions(
        replace=[parse_replacement(r) for r in args.replace],
        remove=args.remove,
        remove_categories=cats,
        categories=load_tag_categories(args.tags_csv) if args.tags_csv else None,
        add_front=[t for spec in args.add_front for t in spec.split(",") if t.strip()],
        keep_tokens=args.keep_tokens,
        dedupe=args.dedupe,
        sort=args.sort,
    )
    if opts.categories is not None and cats and not any(c in cats for c in opts.categories.values()):
        print(f"lorakit: warning: {args.tags_csv} has no tags of category {', '.join(map(str, sorted(cats)))} "
              "(a WD14 selected_tags.csv lists only general, character and rating tags; use a danbooru tag list "
              "to remove artists)", file=sys.stderr)
    if opts.is_noop() and not args.show_frequency:
        raise UserError("nothing to do: give --replace, --remove, --remove_category, --add_front, --dedupe, --sort "
                        "or --show_frequency.")
    rep, freq = edit_folder(
        args.dir, opts, caption_extension=args.caption_extension, recursive=args.recursive,
        separator=args.caption_separator, dry_run=args.dry_run, backup=args.backup,
    )
    if args.show_frequency:
        print(format_frequency(freq, args.top))
    for note in rep.notes:
        print(note)
    verb = "would change" if args.dry_run else "changed"
    print(f"{rep.files} caption files, {verb} {rep.changed}." +
          (f" Originals backed up in {rep.backup_dir}." if rep.backup_dir else ""))
    return 0


# --------------------------------------------------------------------------------------------------------- quality


def _register_quality(sub) -> None:
    from_doc = ("Add quality tags to captions by booru score. Default tiers: 6=high quality, 18=best quality, "
                "60=masterpiece (score >= tier). --mode highest (default) adds only the highest tier reached, one "
                "quality tag per image; --mode cumulative adds every tier reached, highest first. Scores come from "
                "--scores (JSON or CSV keyed by file name, stem or relative path) or from per-image sidecar JSON "
                "(gallery-dl's <image>.json or <stem>.json) field 'score'. Quality tags already in a caption are "
                "replaced, so re-running is safe.")
    p = sub.add_parser("quality", help="add quality tags (high quality / best quality / masterpiece) by score",
                       description=from_doc)
    _add_common(p)
    p.add_argument("--scores", default=None, help="JSON or CSV of scores; default: per-image sidecar JSON files")
    p.add_argument("--score_field", default="score", help="field holding the score (default score; dots go deeper)")
    p.add_argument("--thresholds", default="6=high quality,18=best quality,60=masterpiece",
                   help='score=tag tiers (default "6=high quality,18=best quality,60=masterpiece")')
    p.add_argument("--mode", choices=("highest", "cumulative"), default="highest",
                   help="highest: only the top tier reached (default); cumulative: every tier reached")
    p.add_argument("--keep_tokens", type=int, default=0,
                   help="insert the quality tags after this many leading tags (keep a trigger first)")
    _add_write_opts(p)
    p.set_defaults(func=run_quality)


def run_quality(args) -> int:
    from lorakit.tools.quality_tags import add_quality_tags

    rep = add_quality_tags(
        args.dir, scores=args.scores, thresholds=args.thresholds, mode=args.mode, keep_tokens=args.keep_tokens,
        score_field=args.score_field, caption_extension=args.caption_extension, recursive=args.recursive,
        separator=args.caption_separator, dry_run=args.dry_run, backup=args.backup,
    )
    tiers = ", ".join(f"{t}: {n}" for t, n in rep.tagged.items()) or "none"
    verb = "would change" if args.dry_run else "changed"
    print(f"{rep.files} captions with a score, {verb} {rep.changed}; quality tags: {tiers}.")
    if rep.no_score:
        print(f"{len(rep.no_score)} images have no score (left alone), e.g. {rep.no_score[0]}")
    if rep.no_caption:
        print(f"{len(rep.no_caption)} images have a score but no caption file (run `lorakit dataset tag` first), "
              f"e.g. {rep.no_caption[0]}")
    if rep.backup_dir:
        print(f"Originals backed up in {rep.backup_dir}.")
    return 0


# ---------------------------------------------------------------------------------------------------------- resize


def _register_resize(sub) -> None:
    p = sub.add_parser(
        "resize", help="downscale images above a target area (keeps aspect, never upscales)",
        description="Downscale every image whose area exceeds WxH of --max_resolution, keeping its aspect ratio. "
                    "Without --out the images are replaced in place (atomically); with --out the dataset is copied "
                    "there, captions included, and a re-run skips images already done.",
    )
    _add_common(p, caption=False)
    p.add_argument("--max_resolution", default="1024x1024", help="target area as WIDTHxHEIGHT (default 1024x1024)")
    p.add_argument("--out", default=None, help="write here instead of in place")
    p.add_argument("--bucket_reso_steps", type=int, default=None,
                   help="also centre-crop resized images to multiples of this (e.g. 64), losing < step pixels")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--jpeg_quality", type=int, default=95, help="quality of re-encoded JPEG/WebP/AVIF (default 95)")
    p.add_argument("--no_progress", action="store_true")
    p.set_defaults(func=run_resize)


def run_resize(args) -> int:
    from lorakit.tools.image_prep import resize_folder

    rep = resize_folder(
        args.dir, args.max_resolution, out=args.out, step=args.bucket_reso_steps, workers=args.workers,
        recursive=args.recursive, jpeg_quality=args.jpeg_quality, progress=_bar(args),
    )
    for err in rep.failed:
        print(f"lorakit: warning: {err}", file=sys.stderr)
    print(f"{rep.images} images: {rep.resized} resized, {rep.copied} copied unchanged, {rep.kept} already small "
          f"enough, {rep.skipped} done on an earlier run, {len(rep.failed)} failed; {rep.captions_copied} caption/"
          "metadata files copied.")
    return 1 if rep.failed else 0


# ---------------------------------------------------------------------------------------------------------- dedupe


def _register_dedupe(sub) -> None:
    p = sub.add_parser(
        "dedupe", help="find exact and near-duplicate images; report or move them",
        description="Exact duplicates by content hash, near duplicates by perceptual hash (Hamming distance <= "
                    "--threshold of 63 bits). Each group keeps its largest image; with --move_to the others (and "
                    "their caption files) are moved there, otherwise only reported.",
    )
    _add_common(p, caption=False)
    p.add_argument("--threshold", type=int, default=4,
                   help="max differing hash bits for a near duplicate (default 4; 0 = perceptually identical; "
                        "-1 = exact copies only)")
    p.add_argument("--move_to", default=None, help="move duplicates here (keeping relative paths)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--no_progress", action="store_true")
    p.set_defaults(func=run_dedupe)


def run_dedupe(args) -> int:
    from pathlib import Path

    from lorakit.tools.image_prep import dedupe_folder

    rep = dedupe_folder(args.dir, threshold=args.threshold, move_to=args.move_to, recursive=args.recursive,
                        workers=args.workers, progress=_bar(args))
    from lorakit.tools.tag_edit import dataset_root

    root = dataset_root(args.dir)

    def rel(p: Path) -> str:
        return p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)

    for g in rep.groups:
        print(f"keep {rel(g.keep)}")
        for d in g.duplicates:
            how = ("exact copy" + (f" of {rel(d.same_as)}" if d.same_as else "") if d.kind == "exact"
                   else f"near, distance {d.distance}")
            print(f"  {'moved' if args.move_to else 'dup'}  {rel(d.path)}  ({how})")
    for err in rep.failed:
        print(f"lorakit: warning: {err}", file=sys.stderr)
    print(f"{rep.images} images: {len(rep.groups)} duplicate groups, {rep.exact} exact and {rep.near} near "
          f"duplicates" + (f"; moved {rep.moved} to {args.move_to}." if args.move_to else " (report only; "
                           "--move_to DIR to move them)."))
    return 0
