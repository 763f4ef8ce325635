"""The Train tab: the option form (generated from lorakit.options), presets, the command line, and the job panel
(live log, progress with it/s and ETA, loss and learning-rate charts, sample images, the LoRA files written)."""

from __future__ import annotations

import html
from pathlib import Path

from lorakit import options as O
from lorakit.errors import UserError
from lorakit.gui import forms
from lorakit.gui.common import Context, handler
from lorakit.gui.jobs import Job, progress_of

STATE_TEXT = {"queued": "queued (waiting for the running job)", "running": "running", "done": "finished",
              "stopped": "stopped (state saved)", "failed": "failed", "cancelled": "cancelled",
              "interrupted": "interrupted (the worker disappeared)"}


def _make_field(gr, f: forms.Field):
    common = dict(label=f.label, info=f.help, elem_id=f"opt-{f.name}")
    if f.kind == "checkbox":
        return gr.Checkbox(value=f.default, **common)
    if f.kind == "dropdown":
        return gr.Dropdown(choices=list(f.choices), value=f.default, allow_custom_value=f.custom, **common)
    return gr.Textbox(value=f.default, max_lines=1, **common)


def _grid(gr, fields, make, per_row: int = 3):
    comps = {}
    for i in range(0, len(fields), per_row):
        with gr.Row():
            for f in fields[i:i + per_row]:
                comps[f.name] = make(gr, f)
    return comps


def build(gr, ctx: Context) -> dict:
    fields = forms.form_fields()
    by_name = {f.name: f for f in fields}
    comps: dict = {}

    gr.Markdown("Fill the source model, the folders and the training parameters, then **Start training**. Every "
                "field is a `lorakit train` option with the same name as in kohya-ss/sd-scripts; empty fields use "
                "the default. Paths are typed, or picked in the **Files** tab.")
    with gr.Row():
        preset = gr.Textbox(label="Preset file (.toml, the `--config_file` format)", scale=4, elem_id="preset-path",
                            placeholder=str(ctx.roots.roots[0] / "presets" / "my_lora.toml"))
        load_btn = gr.Button("Load preset", scale=1, elem_id="preset-load")
        save_btn = gr.Button("Save preset", scale=1, elem_id="preset-save")
    ctx.targets["Train: preset file"] = preset
    advanced = gr.Checkbox(label="Show advanced options (every option, grouped)", value=False, elem_id="show-advanced")
    errors_box = gr.Markdown("", elem_id="train-errors")

    family_md = None
    flux_group = None
    for section, names in forms.BASIC_SECTIONS:
        with gr.Group(visible=section != forms.FLUX_SECTION[0]) as group:
            gr.Markdown(f"### {section}")
            comps.update(_grid(gr, [by_name[n] for n in names], _make_field))
            if section == forms.BASIC_SECTIONS[0][0]:
                family_md = gr.Markdown("", elem_id="train-family")
        if section == forms.FLUX_SECTION[0]:
            flux_group = group
    with gr.Column(visible=False) as adv_col:
        gr.Markdown("### Advanced options")
        for group in O.groups():
            rest = [f for f in fields if f.group == group and not f.basic]
            if not rest:
                continue
            with gr.Accordion(group, open=False):
                comps.update(_grid(gr, rest, _make_field))
    for label, name in (("Train: base model", "pretrained_model_name_or_path"),
                        ("Train: train_data_dir", "train_data_dir"), ("Train: reg_data_dir", "reg_data_dir"),
                        ("Train: output_dir", "output_dir"), ("Train: sample_prompts", "sample_prompts"),
                        ("Train: resume (state folder)", "resume"), ("Train: network_weights", "network_weights")):
        ctx.targets[label] = comps[name]
    names = [f.name for f in fields]
    inputs = [comps[n] for n in names]

    with gr.Row():
        check_btn = gr.Button("Check options and show the command", elem_id="check-btn")
        start_btn = gr.Button("Start training", variant="primary", elem_id="start-btn")
    memory_md = gr.Markdown("Memory: the predicted peak of a training step appears here once the model and the "
                            "data folders are filled.", elem_id="memory-prediction")
    command = gr.Code(label="Equivalent command line", language="shell", interactive=False, lines=2, wrap_lines=True,
                      show_line_numbers=False, elem_id="command-line")

    gr.Markdown("## Jobs\nJobs run one at a time in their own process; this panel follows the selected job and "
                "finds it again after a page reload.")
    with gr.Row():
        job_sel = gr.Dropdown(label="Job", choices=[], value=None, scale=4, elem_id="job-select")
        stop_btn = gr.Button("Stop (saves state)", variant="stop", scale=1, elem_id="stop-btn")
        reuse_btn = gr.Button("Load its options into the form", scale=1, elem_id="job-reuse")
    status_md = gr.Markdown("No job yet.", elem_id="job-status")
    progress_html = gr.HTML("", elem_id="job-progress")
    with gr.Row():
        loss_img = gr.Image(label="Loss", type="pil", interactive=False, height=290, elem_id="loss-chart")
        lr_img = gr.Image(label="Learning rate", type="pil", interactive=False, height=290, elem_id="lr-chart")
    samples = gr.Gallery(label="Sample images", columns=6, height=220, elem_id="job-samples")
    files_md = gr.Markdown("", elem_id="job-files")
    log_box = gr.Textbox(label="Log", lines=12, max_lines=12, autoscroll=True, interactive=False,
                         elem_id="job-log")
    seen = gr.State({})
    timer = gr.Timer(1.0)

    def values_of(args) -> dict:
        return dict(zip(names, args))

    def field_updates(errors: dict[str, str]):
        return [gr.update(info=(f"⚠ {errors[n]}" if n in errors else by_name[n].help),
                          elem_classes=["lk-invalid"] if n in errors else []) for n in names]

    def error_markdown(errors: dict[str, str]) -> str:
        if not errors:
            return ""
        lines = [f"- **{n}**: {html.escape(m)}" if n != "_form" else f"- {html.escape(m)}"
                 for n, m in errors.items()]
        return "**Please fix these fields:**\n" + "\n".join(lines)

    @handler
    def on_model(path, v2, v_param, sdxl):
        fam, line = forms.detected_family(path, ctx.roots, bool(v2), bool(v_param), bool(sdxl))
        return line, gr.update(visible=forms.flux_section_visible(fam))

    def on_check(*args):
        given, ns, errors = forms.prepare(values_of(args), ctx.roots)
        cmd = forms.command_line(given)
        ok = "" if errors else "Options are valid."
        return [error_markdown(errors) or ok, cmd] + field_updates(errors)

    @handler
    def on_start(*args):
        given, ns, errors = forms.prepare(values_of(args), ctx.roots)
        if errors:
            return [error_markdown(errors), forms.command_line(given), gr.update()] + field_updates(errors)
        job = ctx.store.submit(given, name=given.get("output_name"))
        choices = _job_choices(ctx)
        return ([f"Queued job `{job.id}`.", forms.command_line(given), gr.update(choices=choices, value=job.id)]
                + field_updates({}))

    @handler
    def on_save(path, *args):
        p = ctx.path(path, "preset file", must_exist=False)
        if p.suffix != ".toml":
            p = p.with_name(p.name + ".toml")
        written = forms.save_preset(values_of(args), p)
        return f"Saved preset {written}."

    @handler
    def on_load(path):
        p = ctx.path(path, "preset file", kind="file")
        values = forms.load_preset(p)
        return [f"Loaded preset {p}."] + [values[n] for n in names]

    @handler
    def on_reuse(job_id):
        if not job_id:
            raise UserError("Select a job first.")
        values = forms.given_to_values(ctx.store.get(job_id).options())
        return [f"Loaded the options of job {job_id}."] + [values[n] for n in names]

    @handler
    def on_stop(job_id):
        if not job_id:
            raise UserError("No job selected.")
        result = ctx.store.stop(ctx.store.get(job_id))
        gr.Info(f"Job {job_id}: {result}")

    def on_load_page():
        job = ctx.store.current()
        return gr.update(choices=_job_choices(ctx), value=job.id if job else None)

    def on_tick(job_id, seen_state):
        return render_job(gr, ctx, job_id, seen_state)

    def on_predict(*args):
        return memory_markdown(values_of(args), ctx.roots)

    panel = [status_md, progress_html, loss_img, lr_img, samples, files_md, log_box, seen, job_sel]
    check_btn.click(on_check, inputs, [errors_box, command] + inputs).then(on_predict, inputs, memory_md)
    for name in MEMORY_FIELDS:  # the prediction follows the fields that change it (a traced step: a few seconds)
        if name in comps:
            comps[name].change(on_predict, inputs, memory_md, trigger_mode="always_last", show_progress="minimal")
    start_btn.click(on_start, inputs, [errors_box, command, job_sel] + inputs)
    save_btn.click(on_save, [preset] + inputs, errors_box)
    load_btn.click(on_load, preset, [errors_box] + inputs)
    reuse_btn.click(on_reuse, job_sel, [errors_box] + inputs)
    stop_btn.click(on_stop, job_sel, None)
    advanced.change(lambda v: gr.update(visible=v), advanced, adv_col)
    model_inputs = [comps[n] for n in ("pretrained_model_name_or_path", "v2", "v_parameterization", "sdxl")]
    for c in model_inputs:
        c.change(on_model, model_inputs, [family_md, flux_group], show_progress="hidden")
    timer.tick(on_tick, [job_sel, seen], panel, show_progress="hidden")
    job_sel.input(lambda j: render_job(gr, ctx, j, {})[:-1], job_sel, panel[:-1], show_progress="hidden")
    return {"load": (on_load_page, [], [job_sel]), "fields": comps, "names": names}


MEMORY_FIELDS = ("pretrained_model_name_or_path", "train_data_dir", "dataset_config", "resolution", "train_batch_size",
                 "network_module", "network_dim", "network_args", "network_train_unet_only", "mixed_precision",
                 "gradient_checkpointing", "cache_latents", "cache_text_encoder_outputs", "fp8_base", "optimizer_type",
                 "max_token_length", "max_memory")


def memory_markdown(values: dict, roots) -> str:
    """The memory prediction of the form's options, as `lorakit train` prints it before loading the model."""
    from lorakit.train import memory as M

    _given, ns, errors = forms.prepare(values, roots)
    if errors or ns is None:
        return "Memory: fill the model and the data folders (and fix the fields above) to see the predicted peak."
    try:
        est, budget = M.predict_options(ns)
    except UserError as exc:
        return f"Memory: no prediction yet: {html.escape(str(exc))}"
    fits = ""
    if budget:
        fits = (f" — fits the budget of {M.gib(budget)} GiB" if est.peak <= budget else
                f" — **over the budget of {M.gib(budget)} GiB**: training would stop before loading; press Check "
                "after adding a memory option (gradient_checkpointing, cache_latents, mixed_precision bf16, ...) "
                "or set auto_fit")
    return f"**Predicted peak memory:** {M.gib(est.peak)} GiB on {est.device} ({est.line().split('(', 1)[1]}{fits}"


def _job_choices(ctx: Context) -> list[tuple[str, str]]:
    return [(f"{j.id} [{j.state}]", j.id) for j in ctx.store.jobs()]


def _files_markdown(job: Job, opts: dict, progress) -> str:
    out_dir = opts.get("output_dir")
    lines = []
    if out_dir and Path(out_dir).is_dir():
        loras = sorted(Path(out_dir).glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        states = sorted(p for p in Path(out_dir).iterdir() if p.is_dir() and p.name.endswith("-state"))
        if loras:
            lines.append("**LoRA files** in `" + out_dir + "`:")
            lines += [f"- `{p.name}` ({p.stat().st_size / 1e6:.1f} MB)" for p in loras]
        if states:
            lines.append("**Saved states** (continue with `resume`):")
            lines += [f"- `{p}`" for p in states]
    st = job.status
    if st.get("final_lora"):
        lines.append(f"\nFinal LoRA: `{st['final_lora']}`")
    if st.get("state_dir"):
        lines.append(f"\nState saved: `{st['state_dir']}`")
    if st.get("final_model"):
        lines.append(f"\nFinal model (ReLoRA): `{st['final_model']}`")
    return "\n".join(lines)


def _samples(opts: dict, progress) -> list[str]:
    paths = list(progress.samples)
    out_dir = opts.get("output_dir")
    if out_dir and (Path(out_dir) / "sample").is_dir():  # also previews of earlier runs into the same folder
        for p in sorted((Path(out_dir) / "sample").glob("*.png"), key=lambda p: p.stat().st_mtime):
            if str(p) not in paths:
                paths.append(str(p))
    return [p for p in paths if Path(p).exists()][-24:]


def loss_series(prog) -> dict:
    """The loss chart's lines: training loss and its average, plus the validation loss (and the EMA weights') when
    the run validates."""
    series = {"loss": (prog.steps, prog.loss), "average (100 steps)": (prog.steps, prog.loss_avg)}
    if prog.val_steps:
        series["validation"] = (prog.val_steps, prog.val_loss)
        if any(v == v for v in prog.val_loss_ema):  # not all NaN
            series["validation (EMA)"] = (prog.val_steps, prog.val_loss_ema)
    return series


def render_job(gr, ctx: Context, job_id, seen: dict):
    """The job panel's outputs; parts that did not change since the last tick are left alone."""
    from lorakit.gui.charts import line_chart
    from lorakit.gui.jobs import format_seconds

    seen = dict(seen or {})
    keep = gr.update()
    jobs_sig = tuple((j.id, j.state) for j in ctx.store.jobs())
    sel_update = keep
    if not job_id:  # nothing selected (a new page, or a tick racing the Start button): follow the current job
        current = ctx.store.current()
        if current is not None:
            job_id = current.id
            sel_update = gr.update(choices=_job_choices(ctx), value=job_id)
            seen["jobs"] = jobs_sig
    if seen.get("jobs") != jobs_sig:
        sel_update = gr.update(choices=_job_choices(ctx))  # the value stays: a tick must not undo a selection
        seen["jobs"] = jobs_sig
    if not job_id:
        if seen.get("job") is None and seen.get("empty"):
            return [keep] * 7 + [seen, sel_update]
        seen["empty"] = True
        return ["No job yet: fill the form and press **Start training**.", "", None, None, [], "", "", seen,
                sel_update]
    try:
        job = ctx.store.get(job_id)
    except UserError as exc:
        return [str(exc), "", None, None, [], "", "", seen, sel_update]
    st = job.status
    state = st.get("state", "unknown")
    prog = progress_of(job)
    try:
        opts = job.options()
    except UserError:
        opts = {}
    import time as _time

    head = f"**Job `{job.id}`: {STATE_TEXT.get(state, state)}**"
    if st.get("started"):
        end = st.get("finished") or _time.time()
        head += f" — elapsed {format_seconds(end - st['started'])}"
    if (job.dir / "stop").exists() and state == "running":
        head += " — stopping after this step (saving state)..."
    if st.get("error"):
        head += f"\n\n> {st['error']}"
    pct = 100 * prog.fraction if state not in ("done",) else 100.0
    bar = (f"<div class='lk-progress'><progress max='100' value='{pct:.1f}' style='width:100%'></progress>"
           f"<div id='job-progress-text'>{html.escape(prog.text())}</div></div>")
    try:
        log_size = job.log_path.stat().st_size
    except OSError:
        log_size = 0
    sig = (job.id, state, len(prog.steps), len(prog.samples), len(prog.saved), (job.dir / "stop").exists(), log_size,
           len(prog.val_steps))
    if seen.get("sig") == sig:
        return [head if state == "running" else keep] + [keep] * 6 + [seen, sel_update]
    seen.update(sig=sig, job=job.id)

    def changed(key, value) -> bool:  # only send what changed: images would flicker at every tick
        if seen.get(key) == value:
            return False
        seen[key] = value
        return True

    loss = lr = keep
    if changed("charts", (job.id, len(prog.steps), len(prog.val_steps))):
        loss = line_chart(loss_series(prog), "loss")
        lr = line_chart({k: (prog.steps[-len(v):], v) for k, v in prog.lr.items()}, prog.lr_label)
    sample_paths = _samples(opts, prog)
    gallery = sample_paths if changed("samples", (job.id, tuple(sample_paths))) else keep
    files = _files_markdown(job, opts, prog)
    files = files if changed("files", (job.id, files)) else keep
    return [head, bar, loss, lr, gallery, files, job.log_tail(), seen, sel_update]


__all__ = ["build", "render_job"]
