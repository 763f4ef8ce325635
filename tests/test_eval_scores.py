"""The eval scores' arithmetic (lorakit.eval.scores) against numbers worked out by hand in this file."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorakit.eval import scores as S


def test_recall_full_match_per_tag_and_adherence():
    core = ["black hair", "red eyes"]
    tags = [{"black hair", "red eyes", "smile"}, {"black hair"}, set(), {"red eyes", "outdoors"}]
    # per sample: 2/2, 1/2, 0/2, 1/2 -> mean 0.5; all core tags in 1 of 4
    assert S.recall(tags, core) == pytest.approx(0.5)
    assert S.full_match(tags, core) == pytest.approx(0.25)
    # the concept is there when at least 75% of its core tags are: 2 of 2 here, 1 of 2 at a share of 0.5
    assert S.concept_match(tags, core) == pytest.approx(0.25)
    assert S.concept_match(tags, core, share=0.5) == pytest.approx(0.75)
    four = ["a", "b", "c", "d"]
    assert S.concept_match([{"a", "b", "c"}, {"a", "b"}, {"a", "b", "c", "d"}], four) == pytest.approx(2 / 3)
    assert S.per_tag_share(tags, core) == {"black hair": 0.5, "red eyes": 0.5}
    requested = [(), ("smile",), ("outdoors", "smile"), ("outdoors",)]
    # samples that ask: 0/1, 0/2, 1/1 -> (0 + 0 + 1) / 3
    assert S.adherence(tags, requested) == pytest.approx(1 / 3)
    assert math.isnan(S.adherence(tags, [()] * 4)) and math.isnan(S.recall([], core))


def test_tag_distance_drift_and_seed_distance():
    a, b = {"x", "y", "z"}, {"y", "z", "w"}
    assert S.tag_distance(a, b) == pytest.approx(1 - 2 / 4)
    assert S.tag_distance(set(), set()) == 0.0 and S.tag_distance({"x"}, set()) == 1.0
    assert S.tag_drift([a, {"q"}], [b, {"q"}]) == pytest.approx((0.5 + 0.0) / 2)
    # prompt p: three seeds -> pairs (0,1) 1-1/3, (0,2) 1-0/2, (1,2) 1-1/3; prompt q: one pair, equal sets
    tags = [{"a", "b"}, {"b", "c"}, {"c"}, {"k"}, {"k"}]
    groups = ["p", "p", "p", "q", "q"]
    want = np.mean([2 / 3, 1.0, 1 - 1 / 2, 0.0])
    assert S.seed_distance(tags, groups) == pytest.approx(want)


def test_pixel_drift():
    base = np.zeros((2, 2, 2, 3), np.uint8)
    imgs = base.copy()
    imgs[0, 0, 0, 0] = 255  # one channel of one pixel fully changed out of 24 values
    imgs[1, :, :, :] = 51  # every value of the second image changed by 0.2
    assert S.pixel_drift(imgs, base) == pytest.approx((1.0 + 12 * 0.2) / 24)


def test_hashes_copies_and_diversity():
    train = np.array([0b0, 0b1111], dtype=np.uint64)
    samples = np.array([0b1, 0b1110, 0b11110000], dtype=np.uint64)
    d = S.hamming_matrix(samples, train)
    assert d.tolist() == [[1, 3], [3, 1], [4, 8]]
    nearest = S.nearest_training_distance(samples, train)
    assert nearest.tolist() == [1, 1, 4]
    assert S.copy_rate(nearest, 1) == pytest.approx(2 / 3) and S.copy_rate(nearest, 0) == 0.0
    # group a: distances 1 (0b0 vs 0b1); group b: 0b11 vs 0b1100 -> 4 bits
    h = np.array([0b0, 0b1, 0b11, 0b1100], dtype=np.uint64)
    assert S.diversity(h, ["a", "a", "b", "b"]) == pytest.approx(np.mean([1, 4]) / 63)


def test_score_model_assembles_the_sets():
    kinds = ["trigger", "trigger", "class", "unrelated"]
    requested = [(), ("forest",), (), ()]
    prompts = ["t", "t, forest", "c", "u"]
    core = ["bear", "black fur"]
    tags = [{"bear", "black fur"}, {"bear", "forest"}, {"bear", "black fur"}, {"cat"}]
    base_tags = [set(), set(), {"bear"}, {"cat", "sky"}]
    imgs = np.zeros((4, 1, 1, 3), np.uint8)
    base = imgs.copy()
    base[2] = 255  # the class sample changed completely, the unrelated one not at all
    hashes = np.array([0, 0b111, 5, 5], dtype=np.uint64)
    train = np.array([0b1], dtype=np.uint64)
    s = S.score_model(tags, imgs, hashes, kinds, requested, prompts, core, base_tags, base, train,
                      copy_distance=1, base_seed_distance=0.5)
    assert s["concept_recall"] == pytest.approx(0.5)  # 2 of 2 core tags, then 1 of 2 (under 75%)
    assert s["tag_recall"] == pytest.approx((1 + 0.5) / 2)
    assert s["full_match"] == pytest.approx(0.5)
    assert s["adherence"] == pytest.approx(1.0)
    drift = ((1 - 1 / 2) + (1 - 1 / 2)) / 2  # {bear, black fur} vs {bear}; {cat} vs {cat, sky}
    assert s["tag_drift"] == pytest.approx(drift) and s["prior_drift"] == pytest.approx(drift / 0.5)
    assert s["pixel_drift"] == pytest.approx(0.5)
    assert s["class_leak"] == pytest.approx(1.0)
    # trigger hashes 0 and 0b111 vs training 0b1: distances 1 and 2; within 1 bit: one of two
    assert s["copy_rate"] == pytest.approx(0.5)
    assert s["nearest_train_distance"] == pytest.approx(1.5 / 63)
    assert math.isnan(s["diversity"])  # one seed per prompt: no pairs


def test_flags_pareto_recommend_spearman():
    t = S.Thresholds(max_drift=0.8, max_copy_rate=0.25, min_diversity_ratio=0.5)
    base = {"diversity": 0.4}
    ok = {"prior_drift": 0.5, "copy_rate": 0.0, "diversity": 0.3}
    assert S.flags(ok, base, t) == []
    assert S.flags(dict(ok, prior_drift=0.9, copy_rate=0.3, diversity=0.1), base, t) == ["drift", "copies", "collapse"]
    assert S.memorised(["collapse"]) and not S.memorised(["drift"])
    rows = [dict(concept_recall=0.2, adherence=0.5, prior_drift=0.3, copy_rate=0.0),  # Pareto: least drift
            dict(concept_recall=0.6, adherence=0.5, prior_drift=0.6, copy_rate=0.0),  # recommended
            dict(concept_recall=0.5, adherence=0.4, prior_drift=0.7, copy_rate=0.1),  # dominated by row 1
            dict(concept_recall=0.9, adherence=0.5, prior_drift=0.95, copy_rate=0.0)]  # over the drift threshold
    assert S.pareto(rows) == [0, 1, 3]
    assert S.recommend(rows, [True, True, True, False]) == 1
    assert S.recommend(rows, [False] * 4) is None
    tie = [dict(concept_recall=0.6, adherence=0.5, prior_drift=0.6, copy_rate=0.0)] * 2
    assert S.recommend(tie, [True, True]) == 0  # the earlier checkpoint wins a tie
    # Spearman: ranks (1,2,3,4) vs (1,3,2,4): 1 - 6*2/(4*15) = 0.8; ties share their mean rank
    assert S.spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert S.spearman([1, 2, 3], [5, 5, 6]) == pytest.approx(np.corrcoef([0, 1, 2], [0.5, 0.5, 2])[0, 1])
