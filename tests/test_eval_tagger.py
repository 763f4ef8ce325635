"""Eval's scores through a tiny ONNX WD14 tagger built here: known images -> known tags -> scores worked out by hand.

The tagger: NHWC float input [N, 8, 8, 3] (BGR, 0-255) -> channel means in [0, 1] -> logit_k = c_k + wB*B + wG*G + wR*R
-> sigmoid. Every tag below is at least 0.98 or at most 0.02 on the colours used (noise of +-12 levels moves a logit
by less than 0.4), so the tags of each image are known by hand:

    red (R) -> red theme, 1girl, zq chan     blue (B) -> blue theme, 1girl     green (G) -> green theme, outdoors, 1girl
    magenta (R+B) -> red theme, blue theme, 1girl, zq chan      black -> 1girl      white -> all six
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from lorakit.eval import scores as S  # noqa: E402
from lorakit.eval.concept import eval_prompts, find_concept, training_images  # noqa: E402
from lorakit.eval.taggers import WD14Adapter  # noqa: E402
from lorakit.errors import UserError  # noqa: E402

# name, category (0 general, 4 character, 9 rating), constant, wB, wG, wR
TAGS = [
    ("general", 9, 0, 0, 0, 0),
    ("1girl", 0, 6, 0, 0, 0),
    ("red_theme", 0, -6, 0, 0, 12),
    ("blue_theme", 0, -6, 12, 0, 0),
    ("green_theme", 0, -6, 0, 12, 0),
    ("outdoors", 0, -6, 0, 12, 0),
    ("zq_chan", 4, -6, 0, 0, 12),
]
RED, BLUE, GREEN, MAGENTA, BLACK, WHITE = ((255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 0, 255), (0, 0, 0),
                                          (255, 255, 255))
TAGS_OF = {RED: {"red theme", "1girl", "zq chan"}, BLUE: {"blue theme", "1girl"},
           GREEN: {"green theme", "outdoors", "1girl"}, MAGENTA: {"red theme", "blue theme", "1girl", "zq chan"},
           BLACK: {"1girl"}, WHITE: {"red theme", "blue theme", "green theme", "outdoors", "1girl", "zq chan"}}


def write_tagger(d: Path, size: int = 8) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    k = len(TAGS)
    W = np.array([[t[3] for t in TAGS], [t[4] for t in TAGS], [t[5] for t in TAGS]], dtype=np.float32)
    nodes = [helper.make_node("ReduceMean", ["input"], ["m"], axes=[1, 2], keepdims=0),
             helper.make_node("Mul", ["m", "inv255"], ["m01"]),
             helper.make_node("MatMul", ["m01", "W"], ["z"]),
             helper.make_node("Add", ["z", "c"], ["logit"]),
             helper.make_node("Sigmoid", ["logit"], ["output"])]
    graph = helper.make_graph(
        nodes, "tiny_tagger", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", k])],
        initializer=[helper.make_tensor("inv255", TensorProto.FLOAT, [1], [1 / 255]),
                     helper.make_tensor("W", TensorProto.FLOAT, [3, k], W.reshape(-1).tolist()),
                     helper.make_tensor("c", TensorProto.FLOAT, [k], [float(t[2]) for t in TAGS])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(d / "model.onnx"))
    lines = ["tag_id,name,category,count"] + [f"{i},{n},{c},100" for i, (n, c, *_) in enumerate(TAGS)]
    (d / "selected_tags.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def image(color, seed: int | None = None, size: int = 64) -> np.ndarray:
    """A solid colour; with a seed, plus +-12 levels of noise (a distinct perceptual hash, the same tags)."""
    a = np.zeros((size, size, 3), np.int16) + np.array(color, np.int16)
    if seed is not None:
        a += np.random.default_rng(seed).integers(-12, 13, a.shape).astype(np.int16)
    return a.clip(0, 255).astype(np.uint8)


def write_training_set(root: Path) -> Path:
    sub = root / "train" / "3_zqx girl"
    sub.mkdir(parents=True)
    for name, color, seed, cap in (("a", RED, 1, "zqx girl, outdoors"), ("b", RED, 2, "zqx girl"),
                                   ("c", MAGENTA, 3, "zqx girl, outdoors, smile"), ("d", BLUE, 4, "zqx girl")):
        Image.fromarray(image(color, seed)).save(sub / f"{name}.png")
        (sub / f"{name}.txt").write_text(cap + "\n", encoding="utf-8")
    return root / "train"


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    return WD14Adapter(write_tagger(tmp_path_factory.mktemp("tagger")))


def test_tagger_reads_the_known_tags(tagger):
    imgs = np.stack([image(c, seed=i) for i, c in enumerate(TAGS_OF)])
    assert tagger.tag(imgs) == list(TAGS_OF.values())
    assert tagger.vocabulary == {"1girl", "red theme", "blue theme", "green theme", "outdoors", "zq chan"}


def test_concept_from_captions_and_tagger(tagger, tmp_path):
    images = training_images(write_training_set(tmp_path))
    c = find_concept(images, tagger, unrelated_prompts=["landscape"])
    assert c.trigger == "zqx girl" and c.class_prompt == "girl"
    # caption or tagger, per image (trigger left out): 1girl 4/4, red theme 3/4, zq chan 3/4, blue theme 2/4,
    # outdoors 2/4 (captions only), smile 1/4 (not a tag the tagger knows)
    assert c.tag_share == pytest.approx({"1girl": 1.0, "red theme": 0.75, "zq chan": 0.75, "blue theme": 0.5,
                                         "outdoors": 0.5, "smile": 0.25})
    assert c.core_tags == ["1girl", "red theme", "zq chan"]
    assert c.scene_tags == ["outdoors"]
    assert [(p.text, p.kind, p.requested) for p in eval_prompts(c)] == [
        ("zqx girl", "trigger", ()), ("zqx girl, outdoors", "trigger", ("outdoors",)), ("girl", "class", ()),
        ("girl, outdoors", "class", ("outdoors",)), ("landscape", "unrelated", ())]
    given = find_concept(images, tagger, core_tags=["Zq_Chan"], trigger="zqx", class_prompt="a girl",
                         image_tags=[TAGS_OF[RED]] * 4)
    assert given.core_tags == ["zq chan"] and given.trigger == "zqx" and given.class_prompt == "a girl"


def test_scores_of_known_samples(tagger, tmp_path):
    images = training_images(write_training_set(tmp_path))
    concept = find_concept(images, tagger, unrelated_prompts=["landscape"])
    prompts = eval_prompts(concept)
    n = 2  # seeds per prompt
    kinds = [p.kind for p in prompts for _ in range(n)]
    requested = [p.requested for p in prompts for _ in range(n)]
    texts = [p.text for p in prompts for _ in range(n)]
    train_a = np.asarray(Image.open(images[0].path).convert("RGB"))
    # trigger samples: an exact copy of training image a (red), then blue, green, black with their own noise
    ckpt = [train_a, image(BLUE, 11), image(GREEN, 12), image(BLACK, 13),
            image(BLACK), image(RED), image(BLACK), image(GREEN), image(BLACK), image(WHITE)]
    base = [image(BLACK) if i % 2 == 0 else image(GREEN) for i in range(10)]  # seed 0 black, seed 1 green
    ckpt_tags, base_tags = tagger.tag(np.stack(ckpt)), tagger.tag(np.stack(base))
    from lorakit.tools.image_prep import phash_image

    hashes = np.array([phash_image(Image.fromarray(a)) for a in ckpt], np.uint64)
    nearest = S.nearest_training_distance(hashes[:4], concept.hashes)
    assert nearest[0] == 0 and (nearest[1:] > 8).all()  # noise images share no structure with the training set
    prior = [i for i, k in enumerate(kinds) if k != "trigger"]
    seed_dist = S.seed_distance([base_tags[i] for i in prior], [texts[i] for i in prior])
    assert seed_dist == pytest.approx(1 - 1 / 3)  # {1girl} vs {green theme, outdoors, 1girl} for every prompt
    s = S.score_model(ckpt_tags, np.stack(ckpt), hashes, kinds, requested, texts, concept.core_tags, base_tags,
                      np.stack(base), concept.hashes, copy_distance=8, base_seed_distance=seed_dist)
    # core = 1girl, red theme, zq chan: trigger samples hold 3/3, 1/3, 1/3, 1/3; the concept needs 3 of 3
    assert s["concept_recall"] == pytest.approx(1 / 4)
    assert s["tag_recall"] == pytest.approx((1 + 1 / 3 * 3) / 4)
    assert s["full_match"] == pytest.approx(1 / 4)
    assert s["core_tag_recall"] == pytest.approx({"1girl": 1.0, "red theme": 0.25, "zq chan": 0.25})
    assert s["adherence"] == pytest.approx((1 + 0) / 2)  # "outdoors" asked twice: green yes, black no
    # class/unrelated vs base on the same seed: black=black 0, red vs green 1-1/5, black 0, green=green 0, black 0,
    # white vs green 1-3/6
    drift = (0.8 + 0.5) / 6
    assert s["tag_drift"] == pytest.approx(drift)
    assert s["prior_drift"] == pytest.approx(drift / (2 / 3))
    assert s["class_leak"] == pytest.approx(1 / 4)  # class samples with all three core tags: the red one
    # pixels: red vs green and white vs green each change 2 of 3 channels fully; 4 of 6 samples unchanged
    assert s["pixel_drift"] == pytest.approx((2 / 3 + 2 / 3) / 6)
    assert s["copy_rate"] == pytest.approx(1 / 4)
    # hash arithmetic by Python's own bit count: nearest training image per trigger sample, and the distance between
    # the two seeds of each trigger prompt, as shares of the hash's 63 bits
    def bits(a, b) -> int:
        return bin(int(a) ^ int(b)).count("1")

    near = [min(bits(h, t) for t in concept.hashes) for h in hashes[:4]]
    assert s["nearest_train_distance"] == pytest.approx(sum(near) / 4 / 63)
    assert s["diversity"] == pytest.approx((bits(hashes[0], hashes[1]) + bits(hashes[2], hashes[3])) / 2 / 63)
    assert 0 < s["diversity"] < 1


# ---- default scene tags: caption tags the tagger reads, its scene labels first ---------------------------------------
def test_wd14_scene_labels_are_the_candidates_in_its_csv(tagger):
    # of the documented setting tags only "outdoors" is in the tiny tagger's selected_tags.csv
    assert tagger.scene_labels == ("outdoors",)
    assert set(WD14Adapter.SCENE_CANDIDATES) - {"outdoors"} and not (set(WD14Adapter.SCENE_CANDIDATES) - {
        "outdoors"}) & tagger.vocabulary


@pytest.mark.parametrize("counts, n, scene, why", [
    # "smile" and "looking at viewer" are the most frequent but the tagger never outputs them; "outdoors" is a scene
    # label, so it comes before the more frequent readable "blue theme"
    ({"smile": 5, "looking at viewer": 5, "blue theme": 3, "green theme": 2, "outdoors": 1, "1girl": 5}, 3,
     ["outdoors", "blue theme", "green theme"], "scene labels first"),
    ({"smile": 5, "blue theme": 3, "outdoors": 1}, 1, ["outdoors"], "among its scene labels"),
    ({"smile": 5, "green theme": 2, "blue theme": 2}, 3, ["blue theme", "green theme"],
     "none of its scene labels is in the captions"),
    # no caption tag readable: the tagger's own scene labels
    ({"smile": 5, "solo": 4, "zqx girl": 5}, 3, ["outdoors"], "own scene labels: no caption tag"),
    ({"zqx girl": 5}, 3, ["outdoors"], "the captions hold only the trigger"),
    # readable, but only the core tag: one context in the data, the trigger alone
    ({"smile": 5, "1girl": 5, "zqx girl": 5}, 3, [], "reads is a core tag"),
    ({"smile": 5}, 0, [], "--scene_tags 0"),
])
def test_default_scene_tags(tagger, counts, n, scene, why):
    from collections import Counter

    from lorakit.eval.concept import choose_scene_tags

    got, reason = choose_scene_tags(Counter(counts), tagger, n, ["1girl"], "zqx girl")
    assert got == scene and why in reason
    assert (tagger.name in reason) == (n > 0)  # the reason names the tagger whose reading chose the tags


def test_default_scene_tags_without_scene_labels(tagger):
    """An adapter that declares no scene labels (or whose only one is a core tag) gets the readable caption tags, or
    none with the reason."""
    from collections import Counter
    from types import SimpleNamespace

    from lorakit.eval.concept import choose_scene_tags

    bare = SimpleNamespace(name="bare", vocabulary=tagger.vocabulary)
    assert choose_scene_tags(Counter({"smile": 3, "outdoors": 1, "blue theme": 2}), bare, 3, [], "zq")[0] == [
        "blue theme", "outdoors"]
    scene, why = choose_scene_tags(Counter({"smile": 3}), bare, 3, [], "zq")
    assert scene == [] and "declares no scene labels" in why
    scene, why = choose_scene_tags(Counter({"smile": 3}), tagger, 3, ["outdoors"], "zq")
    assert scene == [] and "no scene label besides the core tags" in why
    with pytest.raises(UserError, match="--scene_tags -1"):
        choose_scene_tags(Counter({"smile": 3}), tagger, -1, [], "zq")


def test_concept_falls_back_to_scene_labels_when_no_caption_tag_is_readable(tagger, tmp_path):
    sub = tmp_path / "train" / "3_zqx girl"
    sub.mkdir(parents=True)
    for name, color, seed in (("a", RED, 1), ("b", RED, 2), ("c", MAGENTA, 3)):
        Image.fromarray(image(color, seed)).save(sub / f"{name}.png")
        (sub / f"{name}.txt").write_text("zqx girl, smile, looking at viewer\n", encoding="utf-8")
    c = find_concept(training_images(tmp_path / "train"), tagger)
    assert c.core_tags == ["1girl", "red theme", "zq chan"] and c.scene_tags == ["outdoors"]
    assert c.as_dict()["scene_reason"] == c.scene_reason and "own scene labels" in c.scene_reason
    given = find_concept(training_images(tmp_path / "train"), tagger, scene_tags=["Blue_Theme"])
    assert given.scene_tags == ["blue theme"] and given.scene_reason == "given with --scene_tags"
