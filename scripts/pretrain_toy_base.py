"""Pretrain the toy base model (issue 9); see lorakit/toyworld/pretrain.py.

  python scripts/pretrain_toy_base.py --work_dir runs/toy_base --stage vae --minutes 8 [--spec v2]
  python scripts/pretrain_toy_base.py --work_dir runs/toy_base --stage unet --minutes 45
  python scripts/pretrain_toy_base.py --work_dir runs/toy_base --stage vae_decoder --minutes 40  # may run beside unet
  python scripts/pretrain_toy_base.py --work_dir runs/toy_base --stage export   # -> lorakit/toyworld/data/toy_base.safetensors

Every stage resumes from --work_dir; --minutes is the wall-clock budget of this call (added to what was trained).
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", "--work-dir", required=True)
    p.add_argument("--stage", choices=["vae", "vae_decoder", "unet", "export"], required=True)
    p.add_argument("--spec", choices=["v1", "v2"], default=None,
                   help="the base's shape (lorakit/toyworld/pretrain.py SPECS); a new work dir only, default v1")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--max_steps", type=int, default=None, help="stop at this many steps in all (or at --minutes)")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--pool", type=int, default=20000, help="number of pretraining images rendered and cached")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--open_fraction", type=float, default=0.5,
                   help="vae_decoder: share of each batch drawn from the open world (held-out looks included)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--te_token_std", type=float, default=None,
                   help="unet: init std of the text encoder's token embeddings (fresh runs only; default CLIP's 0.02)")
    p.add_argument("--out", default=None, help="export: output file (default: the shipped lorakit/toyworld/data path)")
    p.add_argument("--no_ema", action="store_true", help="export the raw weights instead of the EMA")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lorakit.toyworld import pretrain

    def log(msg):
        print(msg, flush=True)

    kw = {k: v for k, v in (("batch_size", a.batch_size), ("lr", a.lr)) if v is not None}
    kw["max_steps"] = a.max_steps
    pretrain.work_spec(Path(a.work_dir), a.spec)  # a new work dir takes --spec; an existing one must match it
    if a.stage == "vae":
        pretrain.train_vae(a.work_dir, a.minutes, pool=a.pool, seed=a.seed, threads=a.threads, log=log, **kw)
    elif a.stage == "vae_decoder":
        pretrain.train_vae_decoder(a.work_dir, a.minutes, pool=a.pool, seed=a.seed, threads=a.threads, log=log,
                                   open_fraction=a.open_fraction, **kw)
    elif a.stage == "unet":
        pretrain.train_unet(a.work_dir, a.minutes, pool=a.pool, seed=a.seed, threads=a.threads, log=log,
                            te_token_std=a.te_token_std, **kw)
    else:
        out = a.out or pretrain.default_base_path()
        path = pretrain.export_base(a.work_dir, out, ema=not a.no_ema)
        print(f"wrote {path} ({Path(path).stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    from lorakit.errors import UserError

    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
