"""Dataset-preparation throughput: tag and resize N generated images, with 1 and 2 worker processes.

    python benchmarks/bench_prep.py                 # 2,000 images of 1024x1536 (JPEG)
    python benchmarks/bench_prep.py --count 50 --width 768 --height 1024

The tagger is a tiny ONNX model (mean colour -> 10,000 sigmoid outputs, 448x448 NHWC input like the real WD14 models),
so the numbers measure lorakit's part: decoding, padding, resizing to 448, batching, tag selection and caption
writing. A real tagger adds its own inference time (on CPU, roughly 5-30 images/s for SwinV2/ConvNeXt/ViT; on a GPU
provider far more), which does not depend on lorakit's workers. Resize downscales every image to --max_resolution.
Needs the `onnx` package (a dev dependency) to build the model.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorakit.tools.image_prep import dedupe_folder, resize_folder  # noqa: E402
from lorakit.tools.tagger import TaggerOptions, tag_folder  # noqa: E402


def make_tagger(d: Path, n_tags: int = 10000, size: int = 448) -> Path:
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    W = rng.normal(0, 2, (3, n_tags)).astype(np.float32)
    c = rng.normal(-7, 1.5, n_tags).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["m"], axes=[1, 2], keepdims=0),
        helper.make_node("Mul", ["m", "inv255"], ["m01"]),
        helper.make_node("MatMul", ["m01", "W"], ["z"]),
        helper.make_node("Add", ["z", "c"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "bench_tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", n_tags])],
        initializer=[
            helper.make_tensor("inv255", TensorProto.FLOAT, [1], [1 / 255]),
            helper.make_tensor("W", TensorProto.FLOAT, [3, n_tags], W.reshape(-1).tolist()),
            helper.make_tensor("c", TensorProto.FLOAT, [n_tags], c.tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(d / "model.onnx"))
    cats = [9] * 4 + [0] * (n_tags - 1004) + [4] * 1000
    rows = ["tag_id,name,category,count"] + [f"{i},tag_{i},{cat},{n_tags - i}" for i, cat in enumerate(cats)]
    (d / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return d


def make_images(d: Path, count: int, w: int, h: int) -> None:
    rng = np.random.default_rng(1)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        # smooth random colour fields: a 6x8 random grid enlarged, so JPEG sizes resemble illustrations
        small = Image.fromarray(rng.integers(0, 256, (8, 6, 3), dtype=np.uint8))
        small.resize((w, h), Image.BICUBIC).save(d / f"img_{i:05d}.jpg", quality=92)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=1536)
    ap.add_argument("--max_resolution", default="768x768")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--workers", default="1,2", help="worker counts to try")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="lorakit-bench-prep-"))
    try:
        model = make_tagger(tmp / "tagger")
        data = tmp / "data"
        t = timed(lambda: make_images(data, args.count, args.width, args.height))
        print(f"generated {args.count} JPEGs of {args.width}x{args.height} in {t:.1f}s")
        results = []
        for w in workers:
            t = timed(lambda: tag_folder(data, model, TaggerOptions(), batch_size=args.batch_size, workers=w,
                                         overwrite=True, progress=False))
            results.append(("tag", w, t))
        for w in workers:
            out = tmp / f"resized_{w}"
            t = timed(lambda: resize_folder(data, args.max_resolution, out=out, workers=w, progress=False))
            results.append((f"resize to {args.max_resolution}", w, t))
        for w in workers:
            t = timed(lambda: dedupe_folder(data, workers=w, progress=False))
            results.append(("dedupe (hash + compare)", w, t))
        print(f"{'task':<28}{'workers':>8}{'seconds':>10}{'images/s':>11}")
        for name, w, t in results:
            print(f"{name:<28}{w:>8}{t:>10.2f}{args.count / t:>11.1f}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
