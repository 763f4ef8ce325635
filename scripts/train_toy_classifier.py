"""Train the toy-world attribute classifier and write lorakit/toyworld/data/classifier.safetensors (fp16).

    python scripts/train_toy_classifier.py                # the shipped settings, about 10 minutes on one CPU thread
    python scripts/train_toy_classifier.py --steps 200 --out /tmp/clf.safetensors   # a quick try

Interrupt and rerun to resume from --work-dir. Held-out accuracies (fresh world seeds) are printed and stored in the
file's metadata ("eval_accuracy").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorakit.toyworld.classifier import DEFAULT_WEIGHTS  # noqa: E402
from lorakit.toyworld.classifier_training import train  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_WEIGHTS), help="output .safetensors (default: the shipped file)")
    ap.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "lorakit_toy_classifier"),
                    help="checkpoint folder for resuming")
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the shipped run used 1)")
    args = ap.parse_args(argv)
    train(args.out, args.work_dir, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
          threads=args.threads, log=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
