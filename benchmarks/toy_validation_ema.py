"""The toy world's "usu bear" recipe with a validation split and an EMA of the weights: the validation-loss chart
and the EMA-vs-raw comparison of docs/validation-and-ema.md.

    python benchmarks/toy_validation_ema.py [--out DIR] [--eval_seeds 8]

Trains `lorakit.toyworld.recipe.usu_bear_argv` (the demo's command line) plus
    --validation_split 0.2 --validate_every_n_steps 20 --ema_decay 0.99 --ema_warmup
on the shipped toy base (CPU, one thread), draws the training loss (100-step average), the validation loss of the raw
weights and of the EMA weights to docs/images/toy_validation_loss.png, then reads samples of the final raw LoRA and
of its EMA twin with the toy world's classifier (lorakit.toyworld.quality) and writes every number to
docs/images/toy_validation_ema.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTRA = ["--validation_split", "0.2", "--validate_every_n_steps", "20", "--ema_decay", "0.99", "--ema_warmup"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/lorakit-toy-validation-ema")
    ap.add_argument("--eval_seeds", type=int, default=8)
    ap.add_argument("--images", default=str(ROOT / "docs" / "images"))
    args = ap.parse_args()

    import torch

    from lorakit import options as O
    from lorakit.gui.charts import line_chart
    from lorakit.models.loading import load_bundle
    from lorakit.toyworld.pretrain import default_base_path
    from lorakit.toyworld.quality import QualityEvaluator, QualitySettings
    from lorakit.toyworld.recipe import usu_bear_argv, write_dataset
    from lorakit.train.trainer import train

    torch.set_num_threads(1)
    out = Path(args.out)
    base = default_base_path()
    data = write_dataset(out / "dataset")
    argv = usu_bear_argv(base, data, out / "output") + EXTRA + ["--num_threads", "1"]
    t0 = time.time()
    result = train(O.resolve(argv), progress=False, log=lambda *a, **k: None)
    seconds = time.time() - t0
    steps = list(range(1, len(result.losses) + 1))
    avg, window = [], []
    for loss in result.losses:
        window = (window + [loss])[-100:]
        avg.append(sum(window) / len(window))
    val = [r for r in result.validation if r["kind"] == "step"]
    images = Path(args.images)
    images.mkdir(parents=True, exist_ok=True)
    first = 20  # the first steps' loss (0.2 and more) would flatten the rest of the chart
    chart = line_chart({"training (100-step average)": (steps[first - 1:], avg[first - 1:]),
                        "validation": ([r["step"] for r in val], [r["loss"] for r in val]),
                        "validation, EMA weights": ([r["step"] for r in val], [r["loss_ema"] for r in val])},
                       "loss", width=760, height=320)
    chart_path = images / "toy_validation_loss.png"
    chart.save(chart_path)

    bundle = load_bundle(base, family="sd1", dtype="fp32")
    evaluator = QualityEvaluator(settings=QualitySettings(seeds=args.eval_seeds), bundle=bundle)
    reports = {"raw": evaluator.evaluate(Path(result.final_lora)), "ema": evaluator.evaluate(result.saved_ema[-1])}
    best = min(val, key=lambda r: r["loss"])
    summary = {
        "command": "lorakit train " + " ".join(argv),
        "train_seconds": round(seconds, 1),
        "steps": result.global_step,
        "validation": val,
        "train_loss_average": [round(a, 5) for a in avg[9::10]],  # steps 10, 20, ...
        "final_validation": {"raw": val[-1]["loss"], "ema": val[-1]["loss_ema"]},
        "best_raw_validation": {"step": best["step"], "loss": best["loss"]},
        "quality": {k: {f: round(getattr(r, f), 4) for f in ("fidelity", "composability", "prior_agreement",
                                                             "prior_leak", "bleed_agreement", "bleed_pixel_change")}
                    for k, r in reports.items()},
        "quality_samples": reports["raw"].n_images,
        "base_fidelity": round(reports["raw"].base_fidelity, 4),
    }
    (images / "toy_validation_ema.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in summary.items() if k != "validation"}, indent=1))
    print(f"chart: {chart_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
