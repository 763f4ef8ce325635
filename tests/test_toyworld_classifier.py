"""The shipped toy-world attribute classifier reads fresh samples, and its trainer resumes."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lorakit.errors import UserError
from lorakit.toyworld import ToyWorld, character_samples
from lorakit.toyworld.classifier import DEFAULT_WEIGHTS, HEADS, load_classifier

# world seeds used by nobody else: training uses 101-103, the stored evaluation 90001-90003
FRESH = 4242


@pytest.fixture(scope="module")
def clf():
    torch.set_num_threads(1)
    return load_classifier()


def test_shipped_file_is_small_fp16_with_config():
    assert DEFAULT_WEIGHTS.stat().st_size < 1_000_000
    with safe_open(str(DEFAULT_WEIGHTS), framework="pt") as fh:
        meta = fh.metadata()
        dtypes = {fh.get_tensor(k).dtype for k in fh.keys()}
    assert torch.float16 in dtypes and torch.float32 not in dtypes
    cfg = json.loads(meta["config"])
    assert set(cfg["heads"]) == set(HEADS)
    assert "species" in json.loads(meta["eval_accuracy"])["pretrain"]


def test_reads_fresh_pretraining_samples(clf):
    w = ToyWorld(FRESH)
    samples = [w.sample(i) for i in range(200)]
    pred = clf.predict([s[0] for s in samples])
    attrs = [s[2] for s in samples]

    def acc(head):
        return np.mean([p == a[head] for p, a in zip(pred[head]["labels"], attrs)])

    # chance: species 1/5, colour 1/7, background 1/5
    assert acc("species") > 0.9
    assert acc("color") > 0.9
    assert acc("background") > 0.95
    assert acc("scarf") > 0.8 and acc("position") > 0.8
    # nothing in pretraining is the new character
    assert np.mean(pred["character"]["labels"]) < 0.05
    assert pred["species"]["probs"].shape == (200, 5)
    assert torch.allclose(pred["species"]["probs"].sum(1), torch.ones(200), atol=1e-4)


def test_recognises_the_new_character_but_not_plain_black_bears(clf):
    chars = character_samples(40, seed=FRESH)
    p_char = clf.predict([s[0] for s in chars])["character"]["labels"]
    assert np.mean(p_char) > 0.85
    # black bears without the crescent (open world only) are not the character
    w = ToyWorld(FRESH)
    plain = []
    i = 0
    while len(plain) < 30:
        img, _cap, a = w.open_sample(i)
        i += 1
        if a["species"] == "bear" and a["color"] == "black" and not a["marking"]:
            plain.append(img)
    assert np.mean(clf.predict(plain)["character"]["labels"]) < 0.2


def test_predict_accepts_tensors_and_other_sizes(clf):
    imgs = [ToyWorld(FRESH, 128).sample(i)[0] for i in range(16)]
    ref = clf.predict([im.resize((64, 64)) for im in imgs])
    x = torch.from_numpy(np.stack([np.asarray(im) for im in imgs])).permute(0, 3, 1, 2).float() / 127.5 - 1
    got = clf.predict(x, value_range=(-1, 1))
    assert np.mean([a == b for a, b in zip(got["species"]["labels"], ref["species"]["labels"])]) >= 0.9
    got_pil = clf.predict(imgs)
    assert got_pil["background"]["labels"] == ref["background"]["labels"]


def test_missing_weights_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="train_toy_classifier"):
        load_classifier(tmp_path / "nope.safetensors")


def test_training_resumes_and_batches_depend_only_on_step(tmp_path):
    from lorakit.toyworld.classifier_training import make_batch, train

    x1, y1 = make_batch(7, 4, seed=0)
    x2, y2 = make_batch(7, 4, seed=0)
    assert torch.equal(x1, x2) and all(torch.equal(y1[h], y2[h]) for h in HEADS)
    logs = []
    out = tmp_path / "c.safetensors"
    train(out, tmp_path / "work", steps=2, batch_size=4, checkpoint_every=1, eval_sizes=(4, 4, 2), log=logs.append)
    assert out.exists() and (tmp_path / "work" / "classifier_ckpt.pt").exists()
    logs.clear()
    train(out, tmp_path / "work", steps=2, batch_size=4, eval_sizes=(4, 4, 2), log=logs.append)
    assert any("resumed" in m and "step 2" in m for m in logs)
    assert load_classifier(out).predict([ToyWorld(0).sample(0)[0]])["species"]["labels"][0] in HEADS["species"]
