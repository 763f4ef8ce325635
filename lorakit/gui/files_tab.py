"""The Files tab: browse the allowed roots on the server and send a path to a field of another tab."""

from __future__ import annotations

from pathlib import Path

from lorakit.gui.common import Context, handler

HEADERS = ["name", "type", "size", "modified"]


def build(gr, ctx: Context) -> dict:
    """Call after the other tabs registered their targets in ctx.targets."""
    first = str(ctx.roots.roots[0])
    gr.Markdown(f"Files on the server, limited to: `{ctx.roots.describe()}`. Pick an entry, then send its path to a "
                "field of another tab.")
    with gr.Row():
        root = gr.Dropdown([str(r) for r in ctx.roots], value=first, label="Root", scale=2, elem_id="fb-root")
        folder = gr.Textbox(value=first, label="Folder", scale=4, elem_id="fb-folder")
        suffix = gr.Textbox(value="", label="Only files ending with (e.g. .safetensors,.toml)", scale=2)
    with gr.Row():
        list_btn = gr.Button("List", elem_id="fb-list")
        up_btn = gr.Button("Up one folder", elem_id="fb-up")
    listing = gr.Dataframe(headers=HEADERS, interactive=False, elem_id="fb-listing", wrap=True)
    with gr.Row():
        entry = gr.Dropdown([], label="Entry", scale=3, elem_id="fb-entry")
        open_btn = gr.Button("Open folder / select file", scale=1, elem_id="fb-open")
    with gr.Row():
        selected = gr.Textbox(label="Selected path", scale=4, elem_id="fb-selected")
        target = gr.Dropdown(list(ctx.targets), label="Use for", scale=2, elem_id="fb-target")
        use_btn = gr.Button("Use", variant="primary", scale=1, elem_id="fb-use")
    message = gr.Markdown("", elem_id="fb-message")
    targets = list(ctx.targets.values())
    labels = list(ctx.targets)

    def listing_of(path, pattern):
        entries = ctx.roots.listdir(path, pattern)
        rows = [e.row() for e in entries] or [["(empty)", "", "", ""]]
        return rows, gr.update(choices=[e.name for e in entries], value=None)

    @handler
    def on_list(path, pattern):
        p = ctx.roots.check(path, "folder")
        rows, choices = listing_of(p, pattern)
        return str(p), rows, choices, str(p)

    @handler
    def on_up(path, pattern):
        p = ctx.roots.parent(path)
        rows, choices = listing_of(p, pattern)
        return str(p), rows, choices, str(p)

    @handler
    def on_open(path, name, pattern):
        if not name:
            return gr.update(), gr.update(), gr.update(), gr.update()
        p = ctx.roots.check(Path(path) / name, "path")
        if p.is_dir():
            rows, choices = listing_of(p, pattern)
            return str(p), rows, choices, str(p)
        return gr.update(), gr.update(), gr.update(), str(p)

    @handler
    def on_use(path, label):
        p = ctx.roots.check(path, "selected path")
        if label not in ctx.targets:
            return ["Choose a field under **Use for**."] + [gr.update() for _ in targets]
        return [f"`{p}` -> {label}"] + [str(p) if lab == label else gr.update() for lab in labels]

    list_btn.click(on_list, [folder, suffix], [folder, listing, entry, selected])
    root.change(on_list, [root, suffix], [folder, listing, entry, selected])
    up_btn.click(on_up, [folder, suffix], [folder, listing, entry, selected])
    open_btn.click(on_open, [folder, entry, suffix], [folder, listing, entry, selected])
    use_btn.click(on_use, [selected, target], [message] + targets)
    return {"load": (lambda: on_list(first, "")[1], [], [listing])}


__all__ = ["build"]
