"""The Eval tab: score every checkpoint of a run (the code behind `lorakit eval`), or show the results a run wrote
with --eval_every_n_epochs: the curves over steps, the contact sheet, the table, and the recommended file."""

from __future__ import annotations

from pathlib import Path

from lorakit.gui.common import Captured, Context, handler

HEADERS = ["checkpoint", "step", "concept recall", "adherence", "prior drift", "pixel drift", "copies", "diversity",
           "flags"]


def _num(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table_rows(result: dict) -> list[list]:
    rows = []
    for r in result["rows"]:
        name = r["name"]
        if name == result.get("recommended"):
            name = f"★ {name} (recommended)"
        elif name in result.get("pareto", []):
            name = f"{name} (Pareto)"
        rows.append([name, "-" if r.get("step") is None else r["step"], _num(r["concept_recall"]),
                     _num(r["adherence"]), _num(r["prior_drift"]), _num(r["pixel_drift"], 3), _num(r["copy_rate"]),
                     _num(r["diversity"]), ", ".join(r["flags"]) or "-"])
    return rows


def summary(result: dict) -> str:
    c = result["concept"]
    rec = result.get("recommended_path")
    head = f"### Recommended: `{rec}`" if rec else "### No checkpoint recommended"
    return (f"{head}\n{result['why']}.\n\nPareto set: {', '.join(result['pareto']) or '-'}\n\n"
            f"Trigger `{c['trigger']}`, class prompt `{c['class_prompt']}`, core tags: {', '.join(c['core_tags'])}; "
            f"{result['samples_per_model']} samples per model.")


def latest_result(folder: Path) -> Path | None:
    """The newest `*_eval.json` in a LoRA folder (a run writes `<output_name>_eval.json`)."""
    found = sorted(folder.glob("*_eval.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def shown(result: dict):
    from PIL import Image

    files = result.get("files", {})
    chart = Image.open(files["chart"]) if files.get("chart") and Path(files["chart"]).is_file() else None
    sheet = Image.open(files["sheet"]) if files.get("sheet") and Path(files["sheet"]).is_file() else None
    return summary(result), chart, sheet, table_rows(result)


def build(gr, ctx: Context) -> dict:
    gr.Markdown("Score every saved checkpoint of a run on its own training data (concept recall, prompt adherence, "
                "prior drift, memorisation) and pick one. Runs trained with `--eval_every_n_epochs` already wrote "
                "their results: **Show results** reads them.")
    with gr.Row():
        lora_dir = gr.Textbox(label="LoRA folder (the run's output_dir)", scale=3, elem_id="ev-lora-dir")
        pattern = gr.Textbox(label="Checkpoints (glob, e.g. usu_bear*)", value="", scale=2, elem_id="ev-pattern")
        show_btn = gr.Button("Show results", scale=1, elem_id="ev-show")
    with gr.Row():
        model = gr.Textbox(label="Base model", scale=3, elem_id="ev-model")
        train_dir = gr.Textbox(label="Training images (train_data_dir)", scale=3, elem_id="ev-train")
    with gr.Row():
        tagger_dir = gr.Textbox(label="WD14 tagger folder (model.onnx + selected_tags.csv)", scale=3,
                                elem_id="ev-tagger")
        toy = gr.Checkbox(label="toy world classifier instead", value=False, scale=1)
        core = gr.Textbox(label="Core tags (optional, comma-separated)", scale=2)
    with gr.Row():
        seeds = gr.Number(label="seeds per prompt", value=8, precision=0)
        steps = gr.Number(label="steps", value=20, precision=0)
        cfg = gr.Number(label="CFG scale", value=7.0)
        max_drift = gr.Number(label="max prior drift", value=0.8)
        max_copy = gr.Number(label="max copy rate", value=0.25)
    run_btn = gr.Button("Evaluate", variant="primary", elem_id="ev-run")
    ctx.targets["Eval: LoRA folder"] = lora_dir
    ctx.targets["Eval: base model"] = model
    ctx.targets["Eval: training images"] = train_dir
    ctx.targets["Eval: tagger folder"] = tagger_dir
    verdict = gr.Markdown("", elem_id="ev-verdict")
    with gr.Row():
        chart = gr.Image(label="Scores over steps", type="pil", interactive=False, elem_id="ev-chart")
    table = gr.Dataframe(headers=HEADERS, interactive=False, wrap=True, elem_id="ev-table")
    sheet = gr.Image(label="Contact sheet (rows: checkpoints; columns: prompts)", type="pil", interactive=False,
                     elem_id="ev-sheet")
    log = gr.Textbox(label="Log", lines=6, interactive=False, elem_id="ev-log")

    @handler
    def on_eval_show(folder):
        from lorakit.errors import UserError
        from lorakit.eval.report import read_result

        p = ctx.path(folder, "LoRA folder", kind="dir")
        found = latest_result(p)
        if found is None:
            raise UserError(f"{p} holds no *_eval.json yet: press Evaluate, or train with --eval_every_n_epochs.")
        return (*shown(read_result(found)), f"read {found}")

    @handler
    def on_eval_run(folder, pat, base, train, tagger, use_toy, core_tags, n_seeds, n_steps, cfg_scale, drift, copy):
        from lorakit.eval.api import EvalJob, run_eval
        from lorakit.eval.concept import split_list

        cap = Captured()
        job = EvalJob(model=str(ctx.path(base, "base model")),
                      lora_dir=str(ctx.path(folder, "LoRA folder", kind="dir")),
                      loras=pat or None, train_data_dir=str(ctx.path(train, "training images folder", kind="dir")),
                      tagger="toy" if use_toy else "wd14",
                      tagger_dir=None if use_toy else str(ctx.path(tagger, "tagger folder", kind="dir")),
                      core_tags=split_list(core_tags), seeds=int(n_seeds or 8), steps=int(n_steps or 20),
                      cfg_scale=float(cfg_scale or 7.0), max_drift=0.8 if drift is None else float(drift),
                      max_copy_rate=0.25 if copy is None else float(copy))
        result = run_eval(job, log=cap.log)
        return (*shown(result), cap.text)

    outputs = [verdict, chart, sheet, table, log]
    show_btn.click(on_eval_show, [lora_dir], outputs)
    run_btn.click(on_eval_run, [lora_dir, pattern, model, train_dir, tagger_dir, toy, core, seeds, steps, cfg,
                                max_drift, max_copy], outputs)
    return {}


__all__ = ["build", "table_rows", "summary", "latest_result"]
