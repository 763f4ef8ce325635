"""The Tools tab: LoRA info (with a per-block norm chart), resize, merge, extract, filter, ReLoRA, model info and
convert; each calls the library function behind the matching `lorakit lora ...` / `lorakit model ...` command."""

from __future__ import annotations

from lorakit.errors import UserError
from lorakit.gui.common import Captured, Context, handler

PRECISIONS = ["", "float", "fp32", "fp16", "bf16"]


def _opt(v):
    return v if v not in ("", None) else None


def _model(ctx: Context, text, what: str):
    """A model path inside the roots; for a diffusers folder every file in it too (links may lead outside)."""
    p = ctx.path(text, what)
    return ctx.roots.check_tree(p, what) if p.is_dir() else p


def _int(v):
    return int(v) if v not in (None, "", 0) else None


def build(gr, ctx: Context, train: dict | None = None) -> dict:
    with gr.Tab("LoRA info", id="tool-info"):
        with gr.Row():
            info_path = gr.Textbox(label="LoRA file", scale=4, elem_id="info-path")
            info_btn = gr.Button("Show info", variant="primary", scale=1, elem_id="info-btn")
        ctx.targets["Tools: LoRA file"] = info_path
        info_chart = gr.Image(label="Weight change per block", type="pil", interactive=False, height=310,
                              elem_id="info-chart")
        info_text = gr.Textbox(label="lorakit lora info", lines=20, interactive=False, elem_id="info-text")

        @handler
        def on_info(path):
            from lorakit.adapters.info import format_text, summarize
            from lorakit.gui.charts import block_norm_chart

            info = summarize(ctx.path(path, "LoRA file", kind="file"))
            return block_norm_chart(info), format_text(info)

        info_btn.click(on_info, info_path, [info_chart, info_text])

    with gr.Tab("Resize", id="tool-resize"):
        with gr.Row():
            rs_in = gr.Textbox(label="LoRA file", scale=3)
            rs_out = gr.Textbox(label="Save to (.safetensors)", scale=3)
        with gr.Row():
            rs_rank = gr.Number(label="new_rank", value=4, precision=0)
            rs_conv = gr.Number(label="new_conv_rank (0: = new_rank)", value=0, precision=0)
            rs_method = gr.Dropdown(["", "sv_ratio", "sv_fro", "sv_cumulative"], value="", label="dynamic_method")
            rs_param = gr.Number(label="dynamic_param", value=None)
            rs_prec = gr.Dropdown(PRECISIONS, value="", label="save_precision")
        rs_btn = gr.Button("Resize", variant="primary")
        rs_log = gr.Textbox(label="Log", lines=8, interactive=False)

        @handler
        def on_resize(src, dst, rank, conv, method, param, prec):
            from lorakit.tools.lora_resize import resize_lora

            cap = Captured()
            resize_lora(ctx.path(src, "LoRA file", kind="file"), ctx.path(dst, "output file", must_exist=False),
                        int(rank), _int(conv), _opt(method), param if method else None, save_precision=_opt(prec),
                        log=cap.log)
            return cap.text

        rs_btn.click(on_resize, [rs_in, rs_out, rs_rank, rs_conv, rs_method, rs_param, rs_prec], rs_log)

    with gr.Tab("Merge", id="tool-merge"):
        gr.Markdown("One LoRA per line, optionally `path:ratio`. With a model, the LoRAs go into its weights (a "
                    "checkpoint is saved); without, into one LoRA (svd to new_rank, or concat).")
        mg_loras = gr.Textbox(label="LoRA files", lines=3)
        with gr.Row():
            mg_model = gr.Textbox(label="Model to merge into (optional)", scale=3)
            mg_out = gr.Textbox(label="Save to", scale=3)
        with gr.Row():
            mg_mode = gr.Dropdown(["svd", "concat"], value="svd", label="mode (LoRA merge)")
            mg_rank = gr.Number(label="new_rank (svd)", value=8, precision=0)
            mg_prec = gr.Dropdown(PRECISIONS, value="", label="save_precision")
        mg_btn = gr.Button("Merge", variant="primary")
        mg_log = gr.Textbox(label="Log", lines=8, interactive=False)

        @handler
        def on_merge(lines, model, dst, mode, rank, prec):
            from lorakit.tools.lora_merge import merge_into_model, merge_lora_files, specs_from_lists

            paths, ratios = [], []
            for line in (lines or "").splitlines():
                line = line.strip()
                if not line:
                    continue
                path, ratio = line, 1.0
                head, sep, tail = line.rpartition(":")
                if sep and head:
                    try:
                        path, ratio = head, float(tail)
                    except ValueError:
                        path, ratio = line, 1.0
                paths.append(str(ctx.path(path, "LoRA file", kind="file")))
                ratios.append(ratio)
            if not paths:
                raise UserError("List the LoRA files to merge, one per line.")
            specs = specs_from_lists(paths, ratios, None)
            out = ctx.path(dst, "output", must_exist=False)
            cap = Captured()
            if model and model.strip():
                merge_into_model(_model(ctx, model, "model"), specs, out, _opt(prec), None, {}, log=cap.log)
            else:
                merge_lora_files(specs, out, mode, _int(rank), None, None, None, _opt(prec), None, None, None,
                                 False, log=cap.log)
            return cap.text

        mg_btn.click(on_merge, [mg_loras, mg_model, mg_out, mg_mode, mg_rank, mg_prec], mg_log)

    with gr.Tab("Extract", id="tool-extract"):
        with gr.Row():
            ex_org = gr.Textbox(label="Original model (model_org)")
            ex_tuned = gr.Textbox(label="Fine-tuned model (model_tuned)")
            ex_out = gr.Textbox(label="Save to (.safetensors)")
        with gr.Row():
            ex_dim = gr.Number(label="dim", value=4, precision=0)
            ex_conv = gr.Number(label="conv_dim (0: none)", value=0, precision=0)
            ex_q = gr.Number(label="clamp_quantile", value=0.99)
            ex_prec = gr.Dropdown(PRECISIONS, value="", label="save_precision")
        ex_btn = gr.Button("Extract", variant="primary")
        ex_log = gr.Textbox(label="Log", lines=8, interactive=False)

        @handler
        def on_extract(org, tuned, dst, dim, conv, q, prec):
            from lorakit.tools.lora_extract import extract_lora

            cap = Captured()
            extract_lora(_model(ctx, org, "original model"), _model(ctx, tuned, "fine-tuned model"),
                         ctx.path(dst, "output file", must_exist=False), int(dim), _int(conv), float(q), 0.01,
                         _opt(prec), None, None, {}, log=cap.log)
            return cap.text

        ex_btn.click(on_extract, [ex_org, ex_tuned, ex_out, ex_dim, ex_conv, ex_q, ex_prec], ex_log)

    with gr.Tab("Filter", id="tool-filter"):
        with gr.Row():
            fl_in = gr.Textbox(label="LoRA file")
            fl_out = gr.Textbox(label="Save to (.safetensors)")
        with gr.Row():
            fl_keep = gr.Textbox(label="keep (e.g. IN04-IN07,OUT03-OUT06)")
            fl_drop = gr.Textbox(label="drop (e.g. TE,MID)")
            fl_scale = gr.Textbox(label="scale (e.g. IN04-IN07:0.5,TE:0)")
            fl_noemb = gr.Checkbox(label="drop bundled embeddings", value=False)
        fl_btn = gr.Button("Filter", variant="primary")
        fl_log = gr.Textbox(label="Log", lines=8, interactive=False)

        @handler
        def on_filter(src, dst, keep, drop, scale, drop_embeddings=False):
            from lorakit.tools.lora_filter import filter_lora

            cap = Captured()
            filter_lora(ctx.path(src, "LoRA file", kind="file"), ctx.path(dst, "output file", must_exist=False),
                        _opt(keep), _opt(drop), _opt(scale), drop_embeddings=bool(drop_embeddings), log=cap.log)
            return cap.text

        fl_btn.click(on_filter, [fl_in, fl_out, fl_keep, fl_drop, fl_scale, fl_noemb], fl_log)

    with gr.Tab("ReLoRA", id="tool-relora"):
        gr.Markdown("Train, merge into the model, train again: the training options are those of the **Train** "
                    "tab's form; the rounds run as a job in the queue (follow it in the Train tab).")
        with gr.Row():
            rl_out = gr.Textbox(label="ReLoRA output folder", scale=3)
            rl_rounds = gr.Number(label="rounds", value=3, precision=0)
            rl_lrs = gr.Textbox(label="learning rates (space separated; empty: halve each round)")
            rl_ratio = gr.Number(label="merge ratio", value=1.0)
        rl_btn = gr.Button("Queue ReLoRA job", variant="primary")
        rl_msg = gr.Markdown("")

        if train is not None:
            from lorakit.gui import forms

            names = train["names"]

            @handler
            def on_relora(out, rounds, lrs, ratio, *values):
                given, ns, errors = forms.prepare(dict(zip(names, values)), ctx.roots)
                if errors:
                    raise UserError("The Train tab's options have errors: " +
                                    "; ".join(f"{k}: {v}" for k, v in errors.items()))
                out_p = ctx.path(out, "ReLoRA output folder", must_exist=False)
                try:
                    rates = [float(x) for x in (lrs or "").split()] or None
                except ValueError:
                    raise UserError(f"learning rates {lrs!r}: give numbers separated by spaces.") from None
                job = ctx.store.submit(given, name="relora", kind="relora",
                                       extra={"output_dir": str(out_p), "rounds": _int(rounds), "learning_rates": rates,
                                              "merge_ratio": float(ratio)})
                return f"Queued ReLoRA job `{job.id}`; follow it in the Train tab."

            rl_btn.click(on_relora, [rl_out, rl_rounds, rl_lrs, rl_ratio] + [train["fields"][n] for n in names],
                         rl_msg)

    with gr.Tab("Model", id="tool-model"):
        with gr.Row():
            md_path = gr.Textbox(label="Checkpoint file or diffusers folder", scale=4, elem_id="model-path")
            md_hash = gr.Checkbox(label="sha256 of the file (slow for big files)", value=False)
            md_btn = gr.Button("Model info", scale=1, elem_id="model-info-btn")
        md_text = gr.Textbox(label="lorakit model info", lines=14, interactive=False, elem_id="model-info-text")
        with gr.Row():
            cv_out = gr.Textbox(label="Convert to (.safetensors file or a folder for diffusers)", scale=4)
            cv_dtype = gr.Dropdown(["", "fp32", "fp16", "bf16"], value="", label="dtype")
            cv_btn = gr.Button("Convert", scale=1)
        cv_log = gr.Textbox(label="Log", lines=3, interactive=False)

        @handler
        def on_model_info(path, hashes):
            from lorakit.models.info import describe_file, format_info

            return format_info(describe_file(str(_model(ctx, path, "model")), hashes=bool(hashes)))

        @handler
        def on_convert(path, out, dtype):
            from lorakit.models.loading import load_bundle
            from lorakit.models.saving import save_diffusers_folder, save_single_file

            src = _model(ctx, path, "model")
            dst = ctx.path(out, "output", must_exist=False)
            if dst.is_dir():
                ctx.roots.check_tree(dst, "output folder")  # a diffusers folder is written into it
            bundle = load_bundle(str(src))
            if dst.suffix.lower() == ".safetensors":
                written = save_single_file(bundle, dst, dtype=_opt(dtype))
            else:
                written = save_diffusers_folder(bundle, dst, dtype=_opt(dtype))
            return f"wrote {bundle.family.name} model to {written}"

        md_btn.click(on_model_info, [md_path, md_hash], md_text)
        cv_btn.click(on_convert, [md_path, cv_out, cv_dtype], cv_log)
    return {}


__all__ = ["build"]
