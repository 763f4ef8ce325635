"""The scores of one model's samples, as plain functions of tags, images and hashes (no model, no I/O).

Every model is sampled with the same prompts and seeds, sample i of a checkpoint pairs with sample i of the base.

- concept recall: the share of trigger samples that show the concept, i.e. at least `match_share` (75%) of its core
  tags. A person judging a grid asks "is the character there?", not "how many of its tags are": black fur on a cat
  is not the character. Requiring every core tag (`full_match`) is too strict, one small accessory the model or
  the tagger misses sinks it. `tag_recall` is the mean share of core tags per sample. On the toy world the 75% rule
  ranks checkpoints like the toy classifier's fidelity (a joint reading of the identity); the mean tag share and the
  all-tags rule rank them less alike (benchmarks/bench_eval.py --check);
- prompt adherence: over trigger samples that ask for scene tags, the mean share of those tags read;
- prior drift: over class and unrelated samples, the mean tag-set distance to the base model's sample of the same
  prompt and seed (`tag_drift`: 1 - Jaccard; two empty sets are equal), and the mean absolute pixel change
  (`pixel_drift`, 0-1 scale). `prior_drift` is the tag drift divided by the base model's own seed-to-seed tag
  distance on those prompts: 0 = the same tags as the base model draws, 1 = as different as another seed of the base
  model (the prior is lost at the level of single samples). The ratio makes one threshold work for taggers that
  write 5 tags or 40 and for prompts that pin the picture down or leave it open;
- class leak: concept recall on class samples (the class word absorbing the identity);
- memorisation: the share of trigger samples whose perceptual hash is within `copy_distance` bits of a training
  image's ("copies"), the mean distance to the nearest training image, and the sample diversity: the mean pairwise
  hash distance between the seeds of one trigger prompt (as a share of the 63 bits).

`recommend` picks the checkpoint with the best recall among those within the drift and copy thresholds, and
`pareto` lists the checkpoints no other beats on every score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

HASH_BITS = 63  # lorakit.tools.image_prep.phash_array


def recall(tags: Sequence[set[str]], core: Sequence[str]) -> float:
    """Mean over samples of |core ∩ tags| / |core|."""
    core = set(core)
    if not tags or not core:
        return math.nan
    return float(np.mean([len(core & t) / len(core) for t in tags]))


def concept_match(tags: Sequence[set[str]], core: Sequence[str], share: float = 0.75) -> float:
    """Share of samples showing at least ceil(share x |core|) of the core tags."""
    core = set(core)
    if not tags or not core:
        return math.nan
    need = max(1, math.ceil(share * len(core) - 1e-9))
    return float(np.mean([len(core & t) >= need for t in tags]))


def full_match(tags: Sequence[set[str]], core: Sequence[str]) -> float:
    core = set(core)
    if not tags or not core:
        return math.nan
    return float(np.mean([core <= t for t in tags]))


def per_tag_share(tags: Sequence[set[str]], wanted: Sequence[str]) -> dict[str, float]:
    return {w: float(np.mean([w in t for t in tags])) if tags else math.nan for w in wanted}


def adherence(tags: Sequence[set[str]], requested: Sequence[Sequence[str]]) -> float:
    """Mean over samples that request tags of the share of the requested tags read."""
    rows = [len(set(r) & t) / len(set(r)) for t, r in zip(tags, requested) if r]
    return float(np.mean(rows)) if rows else math.nan


def tag_distance(a: set[str], b: set[str]) -> float:
    """1 - Jaccard index; 0 for two empty sets."""
    union = a | b
    return 0.0 if not union else 1.0 - len(a & b) / len(union)


def tag_drift(tags: Sequence[set[str]], base_tags: Sequence[set[str]]) -> float:
    if not tags:
        return math.nan
    return float(np.mean([tag_distance(a, b) for a, b in zip(tags, base_tags)]))


def seed_distance(tags: Sequence[set[str]], groups: Sequence[object]) -> float:
    """Mean tag distance between samples of the same group (prompt) with different seeds."""
    by: dict[object, list[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(g, []).append(i)
    vals = [tag_distance(tags[a], tags[b]) for idx in by.values() for k, a in enumerate(idx) for b in idx[k + 1:]]
    return float(np.mean(vals)) if vals else math.nan


def pixel_drift(images: np.ndarray, base_images: np.ndarray) -> float:
    """Mean absolute pixel change on a 0-1 scale (uint8 images of one size)."""
    if len(images) == 0:
        return math.nan
    return float(np.abs(images.astype(np.float32) - base_images.astype(np.float32)).mean() / 255.0)


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distances between every hash of `a` and every hash of `b` (uint64)."""
    return np.bitwise_count(np.asarray(a, np.uint64)[:, None] ^ np.asarray(b, np.uint64)[None, :]).astype(np.int64)


def nearest_training_distance(sample_hashes: np.ndarray, train_hashes: np.ndarray) -> np.ndarray:
    return hamming_matrix(sample_hashes, train_hashes).min(axis=1)


def copy_rate(nearest: np.ndarray, copy_distance: int) -> float:
    return float(np.mean(nearest <= copy_distance)) if len(nearest) else math.nan


def diversity(hashes: np.ndarray, groups: Sequence[object]) -> float:
    """Mean pairwise hash distance (share of the bits) between samples of the same group (prompt), averaged over
    the groups with at least two samples."""
    by: dict[object, list[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(g, []).append(i)
    vals = []
    for idx in by.values():
        if len(idx) < 2:
            continue
        d = hamming_matrix(hashes[idx], hashes[idx])
        iu = np.triu_indices(len(idx), 1)
        vals.append(d[iu].mean() / HASH_BITS)
    return float(np.mean(vals)) if vals else math.nan


@dataclass(frozen=True)
class Thresholds:
    max_drift: float = 0.8  # prior drift above this: other prompts' samples nearly as changed as by a new seed
    max_copy_rate: float = 0.25  # share of trigger samples that copy a training image
    copy_distance: int = 8  # hash bits (of 63) within which a sample counts as a copy
    match_share: float = 0.75  # share of the core tags a sample must show to count as the concept
    min_diversity_ratio: float = 0.5  # diversity below this share of the base model's: samples collapsed

    def as_dict(self) -> dict:
        return {"max_drift": self.max_drift, "max_copy_rate": self.max_copy_rate,
                "copy_distance": self.copy_distance, "min_diversity_ratio": self.min_diversity_ratio,
                "match_share": self.match_share}


def score_model(tags: Sequence[set[str]], images: np.ndarray, hashes: np.ndarray, kinds: Sequence[str],
                requested: Sequence[Sequence[str]], prompts: Sequence[str], core: Sequence[str],
                base_tags: Sequence[set[str]], base_images: np.ndarray, train_hashes: np.ndarray,
                copy_distance: int, base_seed_distance: float, match_share: float = 0.75) -> dict:
    """Every score of one model from its samples (in the order of the evaluation's prompt x seed list).
    `base_seed_distance`: `seed_distance` of the base model's class and unrelated samples."""
    trig = [i for i, k in enumerate(kinds) if k == "trigger"]
    cls = [i for i, k in enumerate(kinds) if k == "class"]
    prior = [i for i, k in enumerate(kinds) if k in ("class", "unrelated")]
    ttags = [tags[i] for i in trig]
    nearest = nearest_training_distance(hashes[trig], train_hashes) if trig and len(train_hashes) else np.zeros(0)
    drift = tag_drift([tags[i] for i in prior], [base_tags[i] for i in prior])
    return {
        "concept_recall": concept_match(ttags, core, match_share),
        "tag_recall": recall(ttags, core),
        "full_match": full_match(ttags, core),
        "core_tag_recall": per_tag_share(ttags, core),
        "adherence": adherence(ttags, [requested[i] for i in trig]),
        "prior_drift": drift / base_seed_distance if base_seed_distance > 0 else math.nan,
        "tag_drift": drift,
        "pixel_drift": pixel_drift(images[prior], base_images[prior]),
        "class_leak": concept_match([tags[i] for i in cls], core, match_share),
        "copy_rate": copy_rate(nearest, copy_distance),
        "nearest_train_distance": float(nearest.mean() / HASH_BITS) if len(nearest) else math.nan,
        "diversity": diversity(hashes[trig], [prompts[i] for i in trig]),
    }


def flags(scores: dict, base_scores: dict, t: Thresholds) -> list[str]:
    """Why a checkpoint may not be recommended: "drift", "copies", "collapse" (diversity)."""
    out = []
    if scores["prior_drift"] > t.max_drift:
        out.append("drift")
    if scores["copy_rate"] > t.max_copy_rate:
        out.append("copies")
    base_div = base_scores.get("diversity", math.nan)
    if math.isfinite(base_div) and base_div > 0 and scores["diversity"] < t.min_diversity_ratio * base_div:
        out.append("collapse")
    return out


def memorised(flag_list: Sequence[str]) -> bool:
    return "copies" in flag_list or "collapse" in flag_list


_KEYS = (("concept_recall", 1), ("adherence", 1), ("prior_drift", -1), ("copy_rate", -1))


def _vec(s: dict) -> list[float]:
    # a missing score (nan) neither helps nor hurts
    return [sign * (s[k] if math.isfinite(s[k]) else 0.0) for k, sign in _KEYS]


def pareto(rows: Sequence[dict]) -> list[int]:
    """Indices of rows that no other row matches or beats on every score and beats on one (recall, adherence
    higher; drift, copies lower)."""
    vs = [_vec(r) for r in rows]
    out = []
    for i, v in enumerate(vs):
        dominated = any(all(a >= b for a, b in zip(w, v)) and any(a > b for a, b in zip(w, v))
                        for j, w in enumerate(vs) if j != i)
        if not dominated:
            out.append(i)
    return out


def recommend(rows: Sequence[dict], eligible: Sequence[bool]) -> int | None:
    """The eligible row with the best recall; ties go to better adherence, then lower drift, then the earlier one."""
    best, key = None, None
    for i, (r, ok) in enumerate(zip(rows, eligible)):
        if not ok or not math.isfinite(r["concept_recall"]):
            continue
        k = (r["concept_recall"], _finite(r["adherence"]), -_finite(r["prior_drift"]), -i)
        if key is None or k > key:
            best, key = i, k
    return best


def _finite(v: float) -> float:
    return v if math.isfinite(v) else 0.0


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank)."""
    ra, rb = _ranks(a), _ranks(b)
    if np.std(ra) == 0 or np.std(rb) == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: Sequence[float]) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for v in np.unique(x):  # ties: the mean of their ranks
        m = x == v
        ranks[m] = ranks[m].mean()
    return ranks
