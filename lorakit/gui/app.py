"""The lorakit web GUI: a Gradio app with Train, Dataset, Generate, Tools and Files tabs.

    demo, ctx = build_app(roots=["/data"], jobs_dir="~/.lorakit/jobs")
    launch(roots=["/data"])            # what `lorakit gui` runs

The GUI is thin: forms come from lorakit.options, and every button calls the library function the matching CLI
command calls. Training runs in worker processes (lorakit.gui.jobs); the page polls the job folders.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorakit.gui.common import Context
from lorakit.gui.files import Roots
from lorakit.gui.jobs import JobStore

CSS = """
#job-progress progress { height: 18px; }
#command-line { font-size: 12px; }
.lk-invalid { box-shadow: inset 0 0 0 2px #d33 !important; }
.lk-invalid [data-testid="block-info"], .lk-invalid .info { color: #c22 !important; }
#info-text textarea, #ds-report textarea, #job-log textarea, #model-info-text textarea, #te-out textarea {
  font-family: ui-monospace, Consolas, monospace; font-size: 12px; }
"""


def build_app(roots=None, jobs_dir=None, outputs=None, store: JobStore | None = None):
    """The gr.Blocks and its Context (roots, job store). The job queue thread is not started here."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gradio as gr

    from lorakit.gui import dataset_tab, files_tab, generate_tab, tools_tab, train_tab

    roots_ = Roots(roots)
    ctx = Context(roots=roots_, store=store or JobStore(jobs_dir),
                  outputs=Path(outputs) if outputs else roots_.roots[0] / "outputs")
    loads = []
    with gr.Blocks(title="lorakit", analytics_enabled=False) as demo:
        gr.Markdown("# lorakit\nTrain, watch, compare and manage Stable Diffusion LoRAs.")
        with gr.Tabs(elem_id="main-tabs"):
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = train_tab.build(gr, ctx)
            with gr.Tab("Dataset", id="dataset", elem_id="tab-dataset"):
                dataset_tab.build(gr, ctx)
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                gen = generate_tab.build(gr, ctx)
            with gr.Tab("Tools", id="tools", elem_id="tab-tools"):
                with gr.Tabs():
                    tools_tab.build(gr, ctx, train)
            with gr.Tab("Eval", id="eval", elem_id="tab-eval"):
                from lorakit.gui import eval_tab  # checkpoint scores (issue 17)

                eval_tab.build(gr, ctx)
            with gr.Tab("Files", id="files", elem_id="tab-files"):
                files = files_tab.build(gr, ctx)
        loads += [train["load"], files["load"]]
        for fn, inputs, outputs_ in loads:
            demo.load(fn, inputs, outputs_)
    demo.lorakit_generators = gen["cache"]
    return demo, ctx


def launch(roots=None, jobs_dir=None, listen: str | None = None, port: int | None = None,
           auth: tuple[str, str] | None = None, outputs=None, block: bool = True, quiet: bool = False,
           store: JobStore | None = None):
    """Start the queue and the server (127.0.0.1 unless `listen`). Returns (demo, ctx, url); with block=False the
    server runs in a background thread (tests), stop it with demo.close() and ctx.store.shutdown()."""
    demo, ctx = build_app(roots, jobs_dir, outputs, store=store)
    ctx.store.start()
    allowed = [str(r) for r in ctx.roots] + [str(ctx.store.root)]
    _, url, _ = demo.launch(server_name=listen or "127.0.0.1", server_port=port, auth=auth, share=False,
                            inbrowser=False, prevent_thread_lock=not block, allowed_paths=allowed, quiet=quiet,
                            ssr_mode=False, footer_links=[], css=CSS, show_error=True)
    return demo, ctx, url


__all__ = ["build_app", "launch"]
