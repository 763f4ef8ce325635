"""Documentation generated from the option schema: the `--network_args` keys of `lorakit train --help` and
docs/training-options.md.

    python -m lorakit.option_docs            # rewrite docs/training-options.md
    python -m lorakit.option_docs --check    # exit 1 when the file is out of date

The `--network_args` keys come from their schema, lorakit.network_args (the parser's list too).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lorakit.network_args import NETWORK_ARGS

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "training-options.md"


def network_args_help() -> str:
    """The keys of --network_args, one per line with an example (the `lorakit train --help` section)."""
    lines = ["Give them as --network_args KEY=VALUE ... (values as in sd-scripts and LyCORIS), e.g.",
             "  --network_args \"conv_dim=8\" \"conv_alpha=4\" \"dora_wd=True\" \"blocks=IN04-IN07,OUT03-OUT06\"",
             "Unknown keys and block lists of the wrong length are refused before the model loads."]
    for a in NETWORK_ARGS:
        module = "" if a.module == "networks.lora" else f" [--network_module {a.module}]"
        lines.append(f"  {a.key}: {a.note}{module}")
        lines.append(f"      e.g. {a.example}")
    return "\n".join(lines)


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def training_options_markdown() -> str:
    """docs/training-options.md: every option of `lorakit train` by group (from lorakit.options), then every
    --network_args key with an example."""
    from lorakit import options as O

    out = ["# Training options", "",
           "Generated from the option schema (`lorakit/options.py`) by `python -m lorakit.option_docs`; do not edit by "
           "hand. The same schema builds `lorakit train --help`, `--config_file` and `--dataset_config` checking, the "
           "GUI's training form and the `ss_*` metadata.", "",
           "Scope: **train** = command line and `--config_file`; **dataset** = a `[[datasets]]` (or `[general]`) key "
           "of `--dataset_config`, the command line gives its fallback; **subset** = a `[[datasets.subsets]]` key "
           "(inherited from `[[datasets]]` and `[general]` unless marked subset-only); **general** = read from the "
           "command line by the dataset layer. Options marked *no effect* are accepted so sd-scripts command lines "
           "run as written.", ""]
    for group in O.groups():
        out += [f"## {group}", "", "| option | type | default | scope | ss_* key | help |", "|---|---|---|---|---|---|"]
        for o in O.options_in_group(group):
            name = f"`--{o.name}`" if o.cli else f"`{o.name}` (dataset config only)"
            if o.aliases:
                name += " (also " + ", ".join(f"`--{a}`" for a in o.aliases) + ")"
            t = o.type + ("[]" if o.is_list else "")
            if o.choices:
                t += ": " + ", ".join(f"`{c}`" for c in o.choices if c is not None)
            scope = o.scope + (", subset-only" if o.distinct else "")
            default = "" if o.default in (None, "") else f"`{o.default!r}`"
            help_text = o.help if o.effect else f"*no effect* — {o.help.replace(O.NO_EFFECT, '').strip()}"
            out.append(f"| {name} | {_md_escape(t)} | {_md_escape(default)} | {scope} | "
                       f"{f'`{o.metadata_key}`' if o.metadata_key else ''} | {_md_escape(help_text)} |")
        out.append("")
    out += ["## --network_args keys", "",
            "Given as `--network_args KEY=VALUE ...` (in a `--config_file`: `network_args = [\"KEY=VALUE\", ...]`). "
            "Unknown keys, and block lists of the wrong length for the model, are refused before the model loads.",
            "", "| key | example | with | what it does |", "|---|---|---|---|"]
    for a in NETWORK_ARGS:
        with_ = [f"`--network_module {a.module}`"] if a.module != "networks.lora" else []
        with_ += [f"`{n}`" for n in a.needs]
        out.append(f"| `{a.key}` | `{a.example}` | {', '.join(with_)} | {_md_escape(a.note)} |")
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = training_options_markdown()
    if "--check" in argv:
        current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.exists() else ""
        if current != text:
            print(f"{DOC_PATH} is out of date: run python -m lorakit.option_docs", file=sys.stderr)
            return 1
        return 0
    from lorakit.utils.atomic import write_text_atomic

    write_text_atomic(DOC_PATH, text)
    print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
