"""Guard of the toy-world check (benchmarks/bench_eval.py --check runs the full one): on seed 001's dataset, eval reads
the character the toy world hides behind the trigger, and its recall separates the character from the class."""

from __future__ import annotations

import pytest
from PIL import Image

from lorakit.eval import scores as S
from lorakit.eval.concept import eval_prompts, find_concept, training_images
from lorakit.eval.taggers import ToyClassifierAdapter
from lorakit.toyworld.world import BACKGROUNDS, POSITIONS, SIZES
from test_train_common import one_thread  # noqa: F401  (autouse: tiny models run on one thread)




def test_toy_concept_and_recall(tmp_path):
    from lorakit.toyworld.datasets import write_dreambooth_folder
    from lorakit.toyworld.world import class_samples

    data = write_dreambooth_folder(tmp_path, n_train=15, n_reg=0)
    tagger = ToyClassifierAdapter()
    c = find_concept(training_images(data["train_dir"]), tagger)
    # captions say only "usu bear, <scene>": the identity comes from the classifier's reading of the images
    assert c.trigger == "usu bear" and c.class_prompt == "bear"
    assert set(c.core_tags) == {"bear", "black fur", "crescent marking", "red scarf"}
    assert c.unrelated_prompts == ["cat, sky", "rabbit, forest"]
    # the classifier reads size and position too ("small", "right": more frequent in these captions than any one
    # background), but its declared contexts are backgrounds and props, and those come first
    assert set(tagger.scene_labels) <= tagger.vocabulary and not set(tagger.scene_labels) & {*SIZES, *POSITIONS}
    assert len(c.scene_tags) == 3 and set(c.scene_tags) <= set(BACKGROUNDS), c.scene_reason
    assert "among its scene labels" in c.scene_reason
    assert [p.kind for p in eval_prompts(c)] == ["trigger"] * (1 + len(c.scene_tags)) + ["class", "class",
                                                                                          "unrelated", "unrelated"]
    # the training images show the whole character; the class's pretraining bears never do (brown, no crescent)
    own = tagger.tag([Image.open(i.path).convert("RGB") for i in c.images])
    bears = tagger.tag([im for im, _, _ in class_samples(15, seed=2)])
    assert S.recall(own, c.core_tags) == pytest.approx(1.0)
    assert S.full_match(bears, c.core_tags) == 0.0 and S.recall(bears, c.core_tags) < 0.5


def test_toy_copies_of_training_images_are_flagged_new_drawings_are_not():
    """The memorisation score on the toy world's own pictures: a training image with pixel noise (what an over-trained
    LoRA draws) is a copy; the same character drawn in new scenes is not, at the default thresholds."""
    import numpy as np

    from lorakit.tools.image_prep import phash_image
    from lorakit.toyworld.world import character_samples

    t = S.Thresholds()
    train = [im for im, _, _ in character_samples(15, seed=1)]  # the demo's training set
    train_h = np.array([phash_image(im) for im in train], np.uint64)
    rng = np.random.default_rng(0)
    noisy = [np.asarray(im, np.int16) + rng.integers(-8, 9, (64, 64, 3)) for im in train]
    copy_h = np.array([phash_image(Image.fromarray(a.clip(0, 255).astype(np.uint8))) for a in noisy], np.uint64)
    new_h = np.array([phash_image(im) for im, _, _ in character_samples(32, seed=7)], np.uint64)

    def rate(h):
        return S.copy_rate(S.nearest_training_distance(h, train_h), t.copy_distance)

    assert rate(copy_h) == 1.0 and rate(new_h) < t.max_copy_rate
    ok = {"prior_drift": 0.0, "diversity": 0.5}
    assert S.flags(dict(ok, copy_rate=rate(copy_h)), {"diversity": 0.5}, t) == ["copies"]
    assert S.flags(dict(ok, copy_rate=rate(new_h)), {"diversity": 0.5}, t) == []


def test_readme_eval_section_runs_on_the_demos_files():
    """The README's eval commands parse; the toy one points where `lorakit demo` writes and is the command whose
    chart and sheet (benchmarks/bench_eval.py --docs_images) the README shows, each image under 300 KB."""
    import re
    import shlex
    import sys
    from pathlib import Path

    from lorakit.cli.main import build_parser
    from lorakit.toyworld.pretrain import default_base_path

    root = Path(__file__).resolve().parent.parent
    text = (root / "README.md").read_text(encoding="utf-8")
    section = text.split("## Choosing a checkpoint: lorakit eval", 1)[1].split("\n## ", 1)[0]
    commands = [shlex.split(c)[1:] for c in re.findall(r"^lorakit eval .*$", section, re.M)]
    parser = build_parser()
    parsed = [parser.parse_args(argv) for argv in commands]
    assert len(parsed) == 2 and parsed[0].tagger_dir and parsed[1].tagger == "toy"
    toy, demo = parsed[1], parser.parse_args(["demo"])
    assert (root / toy.model).resolve() == default_base_path().resolve()
    assert Path(toy.lora_dir) == Path(demo.output_dir) / "output"
    assert Path(toy.train_data_dir) == Path(demo.output_dir) / "dataset" / "train"
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import bench_eval
    finally:
        sys.path.remove(str(root / "benchmarks"))
    bench = bench_eval.eval_argv(Path(demo.output_dir), toy.seeds)
    bench_args = parser.parse_args(bench)
    for name in ("loras", "tagger", "cfg_scale", "seeds", "steps", "sampler", "scene_tags", "max_drift"):
        assert getattr(bench_args, name) == getattr(toy, name), name
    for name in ("eval_demo_chart.png", "eval_demo_sheet.png"):
        assert f"docs/images/{name}" in section and (root / "docs" / "images" / name).stat().st_size < 300_000
