"""Dataset layer benchmark: scan, buckets, decode+resize, latent caching; first vs second start; 1 vs 2 workers.

    .venv/bin/python benchmarks/bench_dataset.py              # 2,000 images (run at full size once: shared machine)
    .venv/bin/python benchmarks/bench_dataset.py --count 200  # quick

Images are generated (mixed sizes 256-2048 px, 80 % JPEG / 20 % PNG, with captions) into a temporary folder that is
removed afterwards unless --keep is given.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def generate(root: Path, count: int, seed: int = 0) -> float:
    from PIL import Image

    rs = np.random.default_rng(seed)
    folder = root / "train" / "2_bench subject"
    folder.mkdir(parents=True)
    tags = [f"tag{i}" for i in range(200)]
    t0 = time.perf_counter()
    for i in range(count):
        w, h = (int(v) for v in rs.integers(256, 2049, 2))
        # smooth gradients + light noise: realistic file sizes without 12 MB noise PNGs
        y = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
        x = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
        c = rs.random((1, 1, 3), dtype=np.float32)
        arr = (255 * (0.5 * c + 0.25 * x + 0.25 * y)).astype(np.uint8)
        arr = np.broadcast_to(arr, (h, w, 3)).copy()
        arr[::7, ::7] ^= 17
        im = Image.fromarray(arr, "RGB")
        ext = ".png" if i % 5 == 0 else ".jpg"
        im.save(folder / f"img{i:05d}{ext}", **({"quality": 90} if ext == ".jpg" else {"compress_level": 1}))
        cap = ", ".join(["bench subject"] + list(rs.choice(tags, 12, replace=False)))
        (folder / f"img{i:05d}.txt").write_text(cap, encoding="utf-8")
    return time.perf_counter() - t0


def tiny_vae():
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8,
                        latent_channels=4, sample_size=64).eval()
    return lambda px: vae.encode(px).latent_dist.mode() * 0.18215


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=2000, help="images to generate (default 2000)")
    ap.add_argument("--resolution", default="512")
    ap.add_argument("--decode-count", type=int, default=300, help="batches decoded per worker setting (batch 1)")
    ap.add_argument("--latent-count", type=int, default=100, help="images latent-cached per worker setting")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)

    import torch

    from lorakit.data import BucketAssigner, DatasetGroup, build_dataset_configs, cache_latents
    from lorakit.data.config import parse_resolution

    torch.set_num_threads(1)  # the VAE in one thread, so worker scaling shows the decode pool
    root = Path(a.dir or tempfile.mkdtemp(prefix="lorakit-bench-"))
    print(f"work folder {root}, {os.cpu_count()} CPUs")
    try:
        gen = generate(root, a.count)
        print(f"generated {a.count} images in {gen:.1f} s")
        args = {"train_data_dir": str(root / "train"), "resolution": a.resolution, "enable_bucket": True,
                "min_bucket_reso": 256, "max_bucket_reso": 2048, "caption_extension": ".txt", "shuffle_caption": True,
                "keep_tokens": 1, "train_batch_size": 1}
        cfgs = build_dataset_configs(args)

        def timed_build(workers, cache):
            t0 = time.perf_counter()
            g = DatasetGroup.build(build_dataset_configs(args), seed=1, scan_cache=cache, workers=workers)
            return g, time.perf_counter() - t0

        rows = []
        for w in (1, 2):
            _, t = timed_build(w, False)
            rows.append((f"scan (no cache), {w} worker{'s' * (w > 1)}", t, a.count))
        cache_dir = root / "scan-cache"
        g, t = timed_build(2, cache_dir)
        rows.append(("first start (scan + cache write), 2 workers", t, a.count))
        g, t = timed_build(2, cache_dir)
        rows.append(("second start (scan cache hit)", t, a.count))

        sizes = [e.image_size for e in g.datasets[0].entries]
        res = parse_resolution(a.resolution)
        t0 = time.perf_counter()
        ba = BucketAssigner(res, True, 256, 2048, 64)
        for s in sizes:
            ba.select(*s)
        rows.append(("bucket assignment", time.perf_counter() - t0, len(sizes)))
        print(f"buckets used: {len({ba.select(*s).reso for s in sizes})} of {len(ba.predefined)}; "
              f"{len(g)} steps per epoch")

        n = min(a.decode_count, len(g))
        for w in (1, 2):
            t0 = time.perf_counter()
            for k, _ in g.iter_batches(1, num_workers=w):
                if k + 1 >= n:
                    break
            rows.append((f"decode+resize+augment batches, {w} worker{'s' * (w > 1)}", time.perf_counter() - t0, n))

        encode = tiny_vae()
        m = min(a.latent_count, len(g.datasets[0].entries))
        for w in (1, 2):
            sub = DatasetGroup.build(cfgs, seed=1, scan_cache=cache_dir)
            sub.datasets[0].entries = sub.datasets[0].entries[:m]
            for e in sub.datasets[0].entries:  # memory cache: no files written
                e.latents = None
            t0 = time.perf_counter()
            cache_latents(sub, encode, suffix="sd", to_disk=False, batch_size=4, num_workers=w)
            rows.append((f"latent cache (tiny VAE, memory), {w} worker{'s' * (w > 1)}", time.perf_counter() - t0, m))
        sub = DatasetGroup.build(cfgs, seed=1, scan_cache=cache_dir)
        sub.datasets[0].entries = sub.datasets[0].entries[:m]
        t0 = time.perf_counter()
        cache_latents(sub, encode, suffix="sd", to_disk=True, batch_size=4, num_workers=2)
        rows.append(("latent cache to disk, first start, 2 workers", time.perf_counter() - t0, m))
        sub = DatasetGroup.build(cfgs, seed=1, scan_cache=cache_dir)
        sub.datasets[0].entries = sub.datasets[0].entries[:m]
        t0 = time.perf_counter()
        st = cache_latents(sub, encode, suffix="sd", to_disk=True, batch_size=4, num_workers=2)
        rows.append((f"latent cache to disk, second start ({st['reused']} reused)", time.perf_counter() - t0, m))

        print(f"\n{'step':<52} {'seconds':>9} {'images':>7} {'images/s':>10}")
        for name, t, cnt in rows:
            print(f"{name:<52} {t:>9.2f} {cnt:>7} {cnt / t if t > 0 else float('inf'):>10.1f}")
    finally:
        if not a.keep and not a.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
