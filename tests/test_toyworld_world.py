"""Toy-world generator: determinism, the held-out guarantee, captions vs attributes, the dataset writers."""

import json

import numpy as np
import pytest
from PIL import Image

from lorakit.toyworld import (BACKGROUNDS, POSES, SPECIES, ToyWorld, character_samples, class_samples, render,
                              write_dreambooth_folder, write_pretraining_set)


def _expected_tags(a):
    # written independently of lorakit.toyworld.world.tags: the documented caption order
    noun = {"frog": "skin", "bird": "feathers"}.get(a["species"], "fur")
    out = [a["species"], f"{a['color']} {noun}"]
    if a["marking"]:
        out.append("crescent marking")
    if a["scarf"] != "none":
        out.append(a["scarf"] + " scarf")
    out += [t for t in ("hat", "glasses") if a[t]]
    out += [a["background"], a["position"], a["size"], a["pose"]]
    out += [t for t in ("blush", "surprised") if a[t]]
    return out


def test_same_seed_and_index_give_identical_bytes():
    a = ToyWorld(3).sample(17)
    b = ToyWorld(3).sample(17)
    assert a[0].tobytes() == b[0].tobytes() and a[1] == b[1] and a[2] == b[2]
    assert a[0].mode == "RGB" and a[0].size == (64, 64)
    # a different index or seed gives a different picture
    assert ToyWorld(3).sample(18)[0].tobytes() != a[0].tobytes()
    assert ToyWorld(4).sample(17)[0].tobytes() != a[0].tobytes()
    c1 = character_samples(3, seed=5)
    c2 = character_samples(3, seed=5)
    assert [x[0].tobytes() for x in c1] == [x[0].tobytes() for x in c2]


@pytest.mark.parametrize("size", [32, 64, 128])
def test_sizes_share_the_layout(size):
    img, cap, attrs = ToyWorld(0, size).sample(2)
    assert img.size == (size, size)
    assert cap == ToyWorld(0, 64).sample(2)[1]
    # box-downsampling the 128 px picture gives nearly the 64 px one: same layout, not a different scene
    if size == 128:
        small = np.asarray(img.resize((64, 64), Image.BOX), dtype=np.float32)
        ref = np.asarray(ToyWorld(0, 64).sample(2)[0], dtype=np.float32)
        assert np.abs(small - ref).mean() < 12


def test_pretraining_never_shows_held_out_concepts():
    w = ToyWorld(0)
    seen_species, seen_black = set(), False
    for i in range(1500):
        _img, cap, a = w.sample(i)
        assert not a["marking"] and a["character"] is None
        assert not (a["species"] == "bear" and a["color"] == "black")
        t = cap.split(", ")
        assert "usu" not in cap and "crescent marking" not in t and t[:2] != ["bear", "black fur"]
        seen_species.add(a["species"])
        seen_black |= a["color"] == "black"
    assert seen_species == set(SPECIES)
    assert seen_black  # black exists for other species; only black *bears* are held out
    for _img, cap, a in class_samples(200, seed=9):
        assert a["species"] == "bear" and a["color"] != "black" and not a["marking"]
        assert cap.startswith("bear, ")


def test_marking_is_drawn_on_the_chest():
    _img, _cap, a = ToyWorld(0).class_sample(0)
    a = dict(a, position="center", size="large", scarf="none", pose="standing")
    plain = np.asarray(render(a, 1), dtype=np.int32)
    marked = np.asarray(render(dict(a, marking=True), 1), dtype=np.int32)
    diff = np.abs(plain - marked).sum(axis=2) > 60
    ys, xs = np.nonzero(diff)
    assert len(ys) > 15  # a visible crescent, not a few stray pixels
    assert 20 < xs.mean() < 44 and ys.mean() > 40  # centred, on the lower half (the chest)


def test_captions_match_attributes():
    w = ToyWorld(1)
    for i in range(300):
        _img, cap, a = w.sample(i)
        assert cap.split(", ") == _expected_tags(a)
    for i in range(50):
        _img, cap, a = w.open_sample(i)
        assert cap.split(", ") == _expected_tags(a)


def test_character_samples():
    samples = character_samples(15, seed=1)
    assert len(samples) == 15
    for img, cap, a in samples:
        assert (a["species"], a["color"], a["marking"], a["scarf"]) == ("bear", "black", True, "red")
        assert cap.startswith("usu bear, ")
        # identity goes to the trigger: not spelled out in the caption
        for t in ("black fur", "crescent marking", "red scarf", "bear, "):
            assert t not in cap[len("usu bear, "):]
        rest = cap.split(", ")[1:]
        assert rest == _expected_tags(a)[4:]  # scene tags after species, colour, marking, scarf
    assert {a["background"] for _i, _c, a in samples} == set(BACKGROUNDS)
    assert {a["pose"] for _i, _c, a in samples} == set(POSES)
    assert len({a["position"] for _i, _c, a in samples}) >= 2


def test_dreambooth_folder_layout(tmp_path):
    res = write_dreambooth_folder(tmp_path / "ds", n_reg=10)
    train = tmp_path / "ds" / "train" / "20_usu bear"
    reg = tmp_path / "ds" / "reg" / "1_bear"
    assert res["train_subdir"] == train and res["reg_subdir"] == reg
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["reg", "train"]
    pngs = sorted(train.glob("*.png"))
    assert len(pngs) == 15 and len(list(train.glob("*.txt"))) == 15
    for p in pngs:
        assert Image.open(p).size == (64, 64)
        assert p.with_suffix(".txt").read_text().startswith("usu bear, ")
    assert len(list(reg.glob("*.png"))) == 10
    for t in reg.glob("*.txt"):
        assert t.read_text().startswith("bear, ")
    assert not list((tmp_path / "ds").rglob("*.tmp"))
    # the written picture is the generated one
    assert np.array_equal(np.asarray(Image.open(pngs[0])), np.asarray(character_samples(1, seed=1)[0][0]))
    # other repeats / trigger names change the folder names as in seed 001
    res2 = write_dreambooth_folder(tmp_path / "ds2", n_train=2, n_reg=0, train_repeats=10, instance="sks")
    assert res2["train_subdir"].name == "10_sks bear" and res2["reg_dir"] is None
    assert (res2["train_subdir"] / "0000.txt").read_text().startswith("sks bear, ")


def test_pretraining_set(tmp_path):
    out = write_pretraining_set(tmp_path / "pt", 5, seed=0, start=10)
    lines = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert [x["index"] for x in lines] == list(range(10, 15))
    for x in lines:
        _img, cap, a = ToyWorld(0).sample(x["index"])
        assert (out / x["file"]).exists() and (out / x["file"]).with_suffix(".txt").read_text().strip() == cap
        assert x["species"] == a["species"]


def test_parse_caption_reads_prompts():
    from lorakit.toyworld import parse_caption

    assert parse_caption("usu bear, forest") == {"species": "bear", "color": "black", "marking": True, "scarf": "red",
                                                  "hat": False, "glasses": False, "character": "usu",
                                                  "background": "forest"}
    assert parse_caption("cat, sky") == {"species": "cat", "background": "sky"}
    assert parse_caption("bird, blue feathers, green scarf, arms up, nonsense") == {
        "species": "bird", "color": "blue", "scarf": "green", "pose": "arms up"}
    for i in range(50):
        _img, cap, a = ToyWorld(2).sample(i)
        got = parse_caption(cap)
        for k, v in got.items():
            assert a[k] == v
        assert {k for k in ("species", "color", "background", "position", "size", "pose")} <= set(got)
