"""`lorakit lora info FILE [--json]`: what a LoRA file is for and what it holds."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="show a LoRA file's family, algorithm, blocks, ranks, norms and metadata",
                              description="Show a LoRA file's model family, algorithm, rank/alpha per block, blocks "
                                          "present, per-block weight norms (NaN and all-zero modules flagged) and a "
                                          "summary of its training metadata.")
    p.add_argument("file", help="LoRA file (.safetensors; .pt/.ckpt also read)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--top-tags", type=int, default=20, help="how many of the most frequent training tags to show")
    p.set_defaults(func=_info)


def _info(args) -> int:
    import json

    from lorakit.adapters.info import format_text, summarize

    info = summarize(args.file, top_tags=args.top_tags)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False, default=str))
    else:
        print(format_text(info))
    return 1 if info["flagged"] else 0
