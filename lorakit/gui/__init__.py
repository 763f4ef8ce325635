"""The web GUI (`lorakit gui`): Train, Dataset, Generate, Tools and Files tabs over the same library code as the CLI.

Modules: app (the gr.Blocks and launch), forms (fields from lorakit.options), jobs + worker (the training queue and
its worker process), files (the root-limited file browser), charts (PIL charts), and one module per tab.
Gradio is imported only by app and the tab builders.
"""
