import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
from PIL import Image

from lorakit.cli.main import main
from lorakit.data.check import build_report
from lorakit.data.config import build_dataset_configs
from lorakit.data.dataset import DatasetGroup


def img(path, w, h, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def tree(root):
    t = root / "train" / "5_usu bear"
    img(t / "a.png", 512, 512, 1)
    img(t / "b.png", 768, 512, 2)
    img(t / "small.png", 100, 100, 3)
    (t / "dup.png").write_bytes((t / "a.png").read_bytes())
    (t / "a.txt").write_text("usu bear, forest, smile", encoding="utf-8")
    (t / "b.txt").write_text("usu bear, river, smile, " + ", ".join(f"tag{i}" for i in range(80)), encoding="utf-8")
    (t / "dup.txt").write_text("usu bear, forest", encoding="utf-8")
    big = img(t / "trunc.png", 256, 256, 4).read_bytes()
    (t / "trunc.png").write_bytes(big[: len(big) * 2 // 3])  # header fine, pixel data cut
    (t / "empty.txt").write_bytes(b"")
    img(t / "empty.png", 64, 64, 5)
    img(root / "train" / "nonum" / "z.png", 64, 64)
    (root / "train" / "3_nothing").mkdir()
    for i in range(3):
        img(root / "reg" / "1_bear" / f"r{i}.png", 512, 512, 10 + i)
    return root


def test_report_contents(tmp_path):
    root = tree(tmp_path)
    notes = []
    cfgs = build_dataset_configs({"train_data_dir": str(root / "train"), "reg_data_dir": str(root / "reg"),
                                  "resolution": "512", "enable_bucket": True, "train_batch_size": 2,
                                  "caption_extension": ".txt"}, notes=notes)
    g = DatasetGroup.build(cfgs, seed=0, on_bad_image="skip", scan_cache=False)
    rep = build_report(g, decode=True, duplicates=True)
    probs = {Path(p["path"]).name: p["message"] for p in rep.problems}
    assert "trunc.png" in probs and "truncated" in probs["trunc.png"]
    assert "empty.txt is empty" in probs["empty.png"]
    assert "3_nothing" in probs and "has no images" in probs["3_nothing"]
    train = [f for f in rep.folders if "usu bear" in f["path"]][0]
    # a, b, small and dup are used; trunc.png (no IEND) and empty.png (empty caption) are out
    assert train["repeats"] == 5 and train["images"] == 4 and train["captions"] == 3 and train["missing_captions"] == 1
    assert [Path(p).name for p in rep.duplicates[0]] == ["a.png", "dup.png"]
    assert [Path(u["path"]).name for u in rep.upscaled] == ["small.png"]
    assert rep.upscaled[0]["scale"] == 512 / 100
    assert [Path(c["path"]).name for c in rep.long_captions] == ["b.png"] and not rep.token_count_exact
    # small.png has no caption file: the class tokens count as its caption (as sd-scripts)
    assert dict(rep.top_tags)["usu bear"] == 4 and dict(rep.top_tags)["smile"] == 2
    # steps: 20 train samples (4 images x 5) + 20 reg samples; per bucket ceil(n / 2)
    d = rep.datasets[0]
    assert rep.steps_per_epoch == sum(math.ceil(b["samples"] / 2) for b in d["buckets"])
    assert sum(b["samples"] for b in d["buckets"]) == 40
    text = rep.to_text()
    assert "4 images x 5 repeats" in text and "estimated from words" in text and "upscaled" in text
    assert "20 regularization samples per epoch" in text
    # counting with a real tokenizer callable
    rep2 = build_report(g, token_counter=lambda s: 3 * len(s.split(",")), max_token_length=150)
    assert rep2.token_count_exact and rep2.token_limit == 150 and len(rep2.long_captions) == 1


def test_cli_json_and_text(tmp_path, monkeypatch):
    root = tree(tmp_path)
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path / "cache"))
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["dataset", "check", str(root / "train"), "--reg_data_dir", str(root / "reg"), "--caption_extension",
                   ".txt", "--resolution", "512,512", "--enable_bucket", "--train_batch_size", "1", "--json"])
    assert rc == 1  # problems found
    rep = json.loads(buf.getvalue())
    assert rep["steps_per_epoch"] == 40
    assert any("nonum" in w for w in rep["warnings"])
    buf = io.StringIO()
    with redirect_stdout(buf):
        main(["dataset", "check", str(root / "train"), "--caption_extension", ".txt", "--quick"])
    assert "steps per epoch" in buf.getvalue() and "identical image files" not in buf.getvalue()
