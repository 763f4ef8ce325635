"""Guard of the toy-world check (benchmarks/bench_eval.py --check runs the full one): on seed 001's dataset, eval reads
the character the toy world hides behind the trigger, and its recall separates the character from the class."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lorakit.eval import scores as S
from lorakit.eval.concept import eval_prompts, find_concept, training_images
from lorakit.eval.taggers import ToyClassifierAdapter


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


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
    assert [p.kind for p in eval_prompts(c)] == ["trigger"] * (1 + len(c.scene_tags)) + ["class", "class",
                                                                                          "unrelated", "unrelated"]
    # the training images show the whole character; the class's pretraining bears never do (brown, no crescent)
    own = tagger.tag([Image.open(i.path).convert("RGB") for i in c.images])
    bears = tagger.tag([im for im, _, _ in class_samples(15, seed=2)])
    assert S.recall(own, c.core_tags) == pytest.approx(1.0)
    assert S.full_match(bears, c.core_tags) == 0.0 and S.recall(bears, c.core_tags) < 0.5
