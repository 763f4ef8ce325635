"""The Dataset tab: the `lorakit dataset check` report, WD14 auto-tagging and caption tag editing."""

from __future__ import annotations

import io

from lorakit.errors import UserError
from lorakit.gui.common import Context, handler


def check_dataset(ctx: Context, train_dir: str, reg_dir: str | None, resolution: str, caption_extension: str,
                  enable_bucket: bool, batch_size: int, quick: bool):
    """`lorakit dataset check` through the same function (lorakit.data.check.check_source)."""
    from lorakit.data.check import check_source

    src = ctx.path(train_dir, "train folder")
    reg = ctx.path(reg_dir, "reg folder", kind="dir") if reg_dir and reg_dir.strip() else None
    errors = ctx.roots.check_dataset(train_data_dir=str(src) if src.is_dir() else None,
                                     reg_data_dir=str(reg) if reg else None,
                                     dataset_config=str(src) if src.is_file() else None)
    if errors:
        raise UserError(next(iter(errors.values())))
    opts = {"reg_data_dir": str(reg) if reg else None,
            "in_json": None, "caption_extension": caption_extension or ".txt", "resolution": resolution or None,
            "enable_bucket": bool(enable_bucket), "min_bucket_reso": None, "max_bucket_reso": None,
            "bucket_reso_steps": None, "bucket_no_upscale": False,
            "train_batch_size": int(batch_size) if batch_size else None, "max_token_length": None, "seed": 0}
    return check_source(src, opts, seed=0, quick=quick)


def build(gr, ctx: Context) -> dict:
    gr.Markdown("Check a training folder the way the trainer will read it (`lorakit dataset check`), caption it "
                "with a local WD14 tagger, and edit its tags.")
    with gr.Row():
        train_dir = gr.Textbox(label="Train folder (N_name subfolders) or dataset TOML", scale=3, elem_id="ds-train")
        reg_dir = gr.Textbox(label="Regularization folder (optional)", scale=2, elem_id="ds-reg")
    with gr.Row():
        resolution = gr.Textbox(label="resolution", value="512", elem_id="ds-resolution")
        caption_ext = gr.Textbox(label="caption_extension", value=".txt")
        bucket = gr.Checkbox(label="enable_bucket", value=False)
        batch = gr.Number(label="train_batch_size", value=1, precision=0)
        quick = gr.Checkbox(label="quick (headers only: no decoding, no duplicate search)", value=False)
    ctx.targets["Dataset: train folder"] = train_dir
    check_btn = gr.Button("Check dataset", variant="primary", elem_id="ds-check")
    report_box = gr.Textbox(label="Report", lines=16, interactive=False, elem_id="ds-report")
    with gr.Row():
        problems = gr.Dataframe(headers=["kind", "path", "message"], label="Problems", interactive=False,
                                elem_id="ds-problems")
        tags = gr.Dataframe(headers=["tag", "count"], label="Tag frequencies", interactive=False, elem_id="ds-tags")

    @handler
    def on_check_dataset(td, rd, res, ext, bk, bs, q):
        rep = check_dataset(ctx, td, rd, res, ext, bk, bs, q)
        rows = [[p.get("kind", ""), p.get("path", ""), p.get("message", "")] for p in rep.problems]
        return rep.to_text(), rows or [["", "", "no problems"]], [[t, n] for t, n in rep.top_tags] or [["", 0]]

    check_btn.click(on_check_dataset, [train_dir, reg_dir, resolution, caption_ext, bucket, batch, quick],
                    [report_box, problems, tags])

    with gr.Accordion("Auto-tagging (WD14 tagger, ONNX)", open=False):
        gr.Markdown("Needs a local tagger folder with `model.onnx` and `selected_tags.csv` (e.g. a download of "
                    "SmilingWolf/wd-swinv2-tagger-v3). Nothing is downloaded.")
        with gr.Row():
            tag_dir = gr.Textbox(label="Image folder", scale=3)
            model_dir = gr.Textbox(label="Tagger folder", scale=3)
        with gr.Row():
            thresh = gr.Slider(0.05, 0.95, value=0.35, step=0.01, label="threshold")
            undesired = gr.Textbox(label="undesired tags (comma separated)")
            recursive = gr.Checkbox(label="recursive", value=True)
            mode = gr.Radio(["skip captioned", "overwrite", "append"], value="skip captioned", label="existing captions")
        tag_btn = gr.Button("Tag images")
        tag_out = gr.Textbox(label="Result", lines=6, interactive=False)

    @handler
    def on_tag(folder, mdir, th, und, rec, md):
        from lorakit.tools.tag_edit import format_frequency
        from lorakit.tools.tagger import TaggerOptions, split_tag_list, tag_folder

        folder_p = ctx.path(folder, "image folder", kind="dir")
        ctx.roots.check_tree(folder_p, "image folder")  # captions are written beside every image found
        model_p = ctx.path(mdir, "tagger folder", kind="dir")
        ctx.roots.check_tree(model_p, "tagger folder")
        opts = TaggerOptions(general_threshold=th, character_threshold=th, undesired_tags=split_tag_list(und, ", "))
        rep = tag_folder(folder_p, model_p, opts, recursive=rec, overwrite=md == "overwrite", append=md == "append",
                         progress=False)
        text = (f"{rep.images} images: {rep.written} captions written, {rep.skipped_existing} already captioned, "
                f"{len(rep.failed)} unreadable.")
        if rep.frequency:
            text += "\n\n" + format_frequency(rep.frequency, 50)
        return text

    tag_btn.click(on_tag, [tag_dir, model_dir, thresh, undesired, recursive, mode], tag_out)

    with gr.Accordion("Tag editing", open=False):
        with gr.Row():
            edit_dir = gr.Textbox(label="Caption folder", scale=3, elem_id="te-dir")
            edit_rec = gr.Checkbox(label="recursive", value=True)
        with gr.Row():
            replace = gr.Textbox(label="replace (one OLD=NEW per line)", lines=3)
            remove = gr.Textbox(label="remove (tags or globs, comma separated)")
            add_front = gr.Textbox(label="add trigger first (comma separated)")
        with gr.Row():
            keep = gr.Number(label="keep_tokens", value=0, precision=0)
            dedupe = gr.Checkbox(label="dedupe", value=False)
            sort = gr.Checkbox(label="sort", value=False)
            dry = gr.Checkbox(label="dry run (show the diff only)", value=True)
            backup = gr.Checkbox(label="back up originals", value=True)
        edit_btn = gr.Button("Apply tag edits", elem_id="te-apply")
        edit_out = gr.Textbox(label="Result (diff and tag counts)", lines=12, interactive=False, elem_id="te-out")

    @handler
    def on_edit(folder, rec, rep_text, rem, front, kt, dd, srt, dry_run, bk):
        from lorakit.tools.tag_edit import TagEditOptions, edit_folder, format_frequency, parse_replacement

        folder_p = ctx.path(folder, "caption folder", kind="dir")
        ctx.roots.check_tree(folder_p, "caption folder")  # every caption found is rewritten
        opts = TagEditOptions(
            replace=[parse_replacement(line) for line in (rep_text or "").splitlines() if line.strip()],
            remove=[t.strip() for t in (rem or "").split(",") if t.strip()],
            add_front=[t.strip() for t in (front or "").split(",") if t.strip()],
            keep_tokens=int(kt or 0), dedupe=bool(dd), sort=bool(srt))
        out = io.StringIO()
        rep, freq = edit_folder(folder_p, opts, recursive=rec, dry_run=dry_run, backup=bk, out=out)
        verb = "would change" if dry_run else "changed"
        head = f"{rep.files} caption files, {verb} {rep.changed}."
        if rep.backup_dir:
            head += f" Originals backed up in {rep.backup_dir}."
        return "\n".join([head, *rep.notes, out.getvalue(), "tag counts:", format_frequency(freq, 100)])

    edit_btn.click(on_edit, [edit_dir, edit_rec, replace, remove, add_front, keep, dedupe, sort, dry, backup],
                   edit_out)
    return {}


__all__ = ["build", "check_dataset"]
