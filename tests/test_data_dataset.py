import contextlib
import json
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.data import rng as R
from lorakit.data.buckets import get_crop_ltrb
from lorakit.data.config import build_dataset_configs, load_dataset_toml
from lorakit.data.dataset import DatasetGroup, balance_reg_repeats
from lorakit.errors import UserError


def img(path, w, h, color=(120, 60, 30), mode="RGB"):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rs = np.random.default_rng(abs(hash((w, h, path.name))) % 2**32)
    arr = rs.integers(0, 255, (h, w, 3), dtype=np.uint8)
    arr[..., 0] = color[0]
    im = Image.fromarray(arr, "RGB")
    if mode == "RGBA":
        a = np.full((h, w), 255, np.uint8)
        a[:, : w // 2] = 0
        im = im.convert("RGBA")
        im.putalpha(Image.fromarray(a, "L"))
    im.save(path)
    return path


def make_tree(root):
    t = root / "train" / "3_usu bear"
    img(t / "a.png", 200, 200)
    img(t / "b.png", 360, 120)  # aspect 3 -> bucket 192x64
    img(t / "c.png", 120, 360)
    img(t / "d.jpg", 256, 256)
    (t / "a.txt").write_text("usu bear, forest, sitting, smile", encoding="utf-8")
    (t / "b.txt").write_text("usu bear, river", encoding="utf-8")
    img(root / "train" / "nonum" / "x.png", 64, 64)
    (root / "train" / "2_empty").mkdir(parents=True)
    for i in range(5):
        img(root / "reg" / "1_bear" / f"r{i}.png", 128, 128)
    return root


def args(root, **kw):
    a = {"train_data_dir": str(root / "train"), "reg_data_dir": str(root / "reg"), "resolution": "128",
         "caption_extension": ".txt", "enable_bucket": True, "min_bucket_reso": 64, "max_bucket_reso": 256,
         "bucket_reso_steps": 64, "train_batch_size": 2, "shuffle_caption": True, "keep_tokens": 1,
         "prior_loss_weight": 0.5}
    a.update(kw)
    return a


def build(root, seed=42, on_bad_image="error", **kw):
    notes = []
    cfgs = build_dataset_configs(args(root, **kw), notes=notes)
    g = DatasetGroup.build(cfgs, seed=seed, on_bad_image=on_bad_image, scan_cache=root / "scan")
    return g, notes


def test_reg_balancing_sd_scripts_rule():
    # train 12 samples, 5 reg images x1: 5 in the first pass, +1 each (10), +1 for the first two (12)
    assert balance_reg_repeats(12, [1, 1, 1, 1, 1]) == [3, 3, 2, 2, 2]
    # more reg than train: the first ones by file order, the rest dropped
    assert balance_reg_repeats(2, [1, 1, 1, 1, 1]) == [1, 1, 0, 0, 0]
    # folder repeats 2: 2+2+2 = 6, then 3,3,3 (9), then 4 (10)
    assert balance_reg_repeats(10, [2, 2, 2]) == [4, 3, 3]
    assert balance_reg_repeats(0, [1, 1]) == [0, 0]


def test_dreambooth_folders_scan(tmp_path):
    g, notes = build(make_tree(tmp_path))
    ds = g.datasets[0]
    assert any("nonum" in n and "no leading repeat count" in n for n in notes)
    assert any(p.kind == "folder" and "2_empty" in p.path and "has no images" in p.message for p in ds.problems)
    train = {e.path.name: e for e in ds.entries if not e.is_reg}
    assert set(train) == {"a.png", "b.png", "c.png", "d.jpg"}
    assert train["a.png"].caption == "usu bear, forest, sitting, smile"
    assert train["c.png"].caption == "usu bear" and train["c.png"].caption_source == "class_tokens"
    assert all(e.num_repeats == 3 for e in train.values())
    reg = [e for e in ds.entries if e.is_reg]
    assert [e.num_repeats for e in reg] == [3, 3, 2, 2, 2]  # 12 train samples
    assert reg[0].caption == "bear"
    assert "12 regularization samples" in ds.reg_summary() and "2 used 3 times" in ds.reg_summary()
    # buckets at 128 px, 64..256 step 64: (64,256) (64,192) (128,128) (192,64) (256,64)
    assert train["b.png"].bucket.reso == (192, 64) and train["c.png"].bucket.reso == (64, 192)
    # steps: per bucket ceil(samples / batch 2)
    counts = {}
    for e in ds.entries:
        counts[e.bucket.reso] = counts.get(e.bucket.reso, 0) + e.num_repeats
    assert counts == {(128, 128): 6 + 12, (192, 64): 3, (64, 192): 3}
    assert len(g) == sum(math.ceil(n / 2) for n in counts.values()) == 9 + 2 + 2


def test_batches_deterministic_and_resumable(tmp_path):
    root = make_tree(tmp_path)
    g1, _ = build(root, flip_aug=True)
    g2, _ = build(root, flip_aug=True)
    full = list(g1.iter_batches(epoch=2, num_workers=2))
    assert [k for k, _ in full] == list(range(len(g1)))
    resumed = list(g2.iter_batches(epoch=2, start_batch=5, num_workers=1))
    assert [k for k, _ in resumed] == list(range(5, len(g1)))
    for (k1, b1), (k2, b2) in zip(full[5:], resumed):
        assert b1["captions"] == b2["captions"] and b1["paths"] == b2["paths"] and b1["flipped"] == b2["flipped"]
        assert torch.equal(b1["images"], b2["images"])
    assert g1.plan(1) != g1.plan(2)  # bucket order reshuffled per epoch
    g3, _ = build(root, seed=7, flip_aug=True)
    assert g3.plan(2) != g1.plan(2)
    for _, b in full:
        # one bucket per batch, shapes from the bucket
        w, h = b["bucket"]
        assert b["images"].shape[1:] == (3, h, w)
        assert b["images"].min() >= -1 and b["images"].max() <= 1
        for cap, reg, wgt in zip(b["captions"], b["is_reg"], b["loss_weights"].tolist()):
            assert wgt == (0.5 if reg else 1.0)
            if not reg and "forest" in cap:
                assert cap.startswith("usu bear, ")  # keep_tokens=1


def test_epoch_plan_is_a_shuffle_of_bucket_batches(tmp_path):
    g, _ = build(make_tree(tmp_path))
    ds = g.datasets[0]
    plan = g.plan(3)
    # every sample of the epoch appears exactly once
    seen = sorted(i for _, _, idxs in plan for i in idxs)
    assert seen == sorted(i for e in ds.entries for i in [e.index] * e.num_repeats)
    for _, reso, idxs in plan:
        assert all(ds.entries[i].bucket.reso == reso for i in idxs) and 1 <= len(idxs) <= 2
    # independent recomputation of the order: batches listed bucket by bucket, then permuted by the epoch stream
    batches = [(0, reso, idxs) for reso, idxs in ds.epoch_batches(3, 42)]
    order = R.rng_for(42, R.EPOCH_ORDER, 3).permutation(len(batches))
    assert plan == [batches[i] for i in order]


def test_random_reg_sampling(tmp_path):
    root = make_tree(tmp_path)
    cfgs = build_dataset_configs(args(root), notes=[])
    cfgs[0].reg_sampling = "random"
    g = DatasetGroup.build(cfgs, seed=1, scan_cache=False)
    ds = g.datasets[0]
    e1, e2 = ds.epoch_samples(1, 1), ds.epoch_samples(2, 1)
    reg1 = [i for i in e1 if ds.entries[i].is_reg]
    reg2 = [i for i in e2 if ds.entries[i].is_reg]
    assert len(reg1) == len(reg2) == 12  # weighted train count
    counts = np.bincount(reg1)
    assert set(counts[counts > 0].tolist()) <= {2, 3}  # 12 over 5 images: every image 2-3 times
    assert ds.epoch_samples(1, 1) == e1 and sorted(reg1) != sorted(reg2) or reg1 != reg2
    assert "drawn at random each epoch" in ds.reg_summary()


def test_sdxl_conditioning_and_alpha_mask(tmp_path):
    t = tmp_path / "train" / "1_thing"
    img(t / "wide.png", 300, 200, mode="RGBA")
    g = DatasetGroup.build(build_dataset_configs({"train_data_dir": str(tmp_path / "train"), "resolution": "256",
                                                  "enable_bucket": True, "min_bucket_reso": 128, "max_bucket_reso": 512,
                                                  "alpha_mask": True, "flip_aug": True}), seed=3, scan_cache=False)
    e = g.datasets[0].entries[0]
    assert e.bucket.reso == (320, 192)  # aspect 1.667 is the nearest to 1.5 among the 256 px buckets
    assert e.bucket.resized_size == (320, 213)
    for epoch in range(1, 5):
        b = g.get_batch(epoch, 0)
        flipped = b["flipped"][0]
        assert flipped == (R.rng_for(3, R.FLIP, epoch, 0, 0).random() < 0.5)
        ltrb = get_crop_ltrb((320, 192), (300, 200))
        left = 320 - ltrb[2] if flipped else ltrb[0]
        assert b["original_sizes_hw"].tolist() == [[200, 300]]
        assert b["crop_top_lefts"].tolist() == [[int(ltrb[1]), int(left)]]
        assert b["target_sizes_hw"].tolist() == [[192, 320]]
        m = b["alpha_masks"][0]
        assert m.shape == (192, 320)
        # left half (x < 150 of 300) transparent in the file: after a flip the transparent half is on the right
        lo, hi = (m[:, 200:].mean(), m[:, :120].mean()) if flipped else (m[:, :120].mean(), m[:, 200:].mean())
        assert lo < 0.05 and hi > 0.95


def test_bad_inputs_error_and_skip(tmp_path):
    root = make_tree(tmp_path)
    t = root / "train" / "3_usu bear"
    (t / "corrupt.png").write_bytes(b"this is not a png at all")
    good = (t / "a.png").read_bytes()
    (t / "trunc.png").write_bytes(good[:60])
    (t / "zero.png").write_bytes(b"")
    img(t / "e.png", 100, 100)
    (t / "e.txt").write_bytes(b"")
    img(t / "f.png", 100, 100)
    (t / "f.txt").write_bytes("ねこ".encode("cp932"))
    with pytest.raises(UserError) as exc:
        build(root, on_bad_image="error")
    msg = str(exc.value)
    for name in ("corrupt.png", "trunc.png", "zero.png", "e.txt is empty", "f.txt is not UTF-8"):
        assert name in msg
    g, _ = build(root, on_bad_image="skip")
    names = {e.path.name for e in g.datasets[0].entries}
    assert not names & {"corrupt.png", "trunc.png", "zero.png", "e.png", "f.png"}
    assert {"a.png", "b.png"} <= names


def test_image_broken_after_scan_is_skipped_or_stops(tmp_path):
    root = make_tree(tmp_path)
    g, _ = build(root, on_bad_image="skip", scan_cache=False)
    p = root / "train" / "3_usu bear" / "d.jpg"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])  # truncated JPEG after the scan
    os.utime(p, (1, 1))
    batches = [b for _, b in g.iter_batches(1, num_workers=1)]
    assert len(batches) == len(g)
    assert str(p) in g.skipped and all(str(p) not in b["paths"] for b in batches)
    g2, _ = build(root.parent / root.name, on_bad_image="skip", scan_cache=False)
    g2.on_bad_image = "error"
    assert any(e.path == p for e in g2.datasets[0].entries)  # its header still reads
    with pytest.raises(UserError, match="d.jpg"):
        for _ in g2.iter_batches(1, num_workers=1):
            pass


def test_toml_inheritance_and_unknown_keys(tmp_path):
    root = make_tree(tmp_path)
    toml = tmp_path / "ds.toml"
    toml.write_text(f"""
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".txt"

[[datasets]]
resolution = [128, 192]
batch_size = 3
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 256

  [[datasets.subsets]]
  image_dir = '{root / "train" / "3_usu bear"}'
  num_repeats = 4
  keep_tokens = 2
  class_tokens = "usu bear"

  [[datasets.subsets]]
  image_dir = '{root / "reg" / "1_bear"}'
  is_reg = true
  class_tokens = "bear"

[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = '{root / "reg" / "1_bear"}'
""", encoding="utf-8")
    cfgs = build_dataset_configs({"dataset_config": str(toml), "flip_aug": True, "caption_extension": ".caption",
                                  "train_batch_size": 1, "keep_tokens": 0})
    a, b = cfgs
    assert a.resolution == (128, 192) and a.batch_size == 3 and a.enable_bucket
    s0, s1 = a.subsets
    assert s0.keep_tokens == 2 and s1.keep_tokens == 1  # subset > general > command line
    assert s0.caption_extension == ".txt"  # general beats the command line
    assert s0.flip_aug and s0.num_repeats == 4 and s1.num_repeats == 1 and s1.is_reg
    assert b.resolution == (64, 64) and b.batch_size == 1 and not b.enable_bucket
    assert b.subsets[0].keep_tokens == 1 and b.subsets[0].shuffle_caption
    g = DatasetGroup.build(cfgs, seed=0, scan_cache=False)
    assert len(g.datasets) == 2
    ks = {b["dataset_index"] for _, b in g.iter_batches(1, num_workers=1)}
    assert ks == {0, 1}
    bad = tmp_path / "bad.toml"
    bad.write_text("[general]\nshufle_caption = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir='x'\n")
    with pytest.raises(UserError, match="unknown key `shufle_caption`"):
        load_dataset_toml(bad)
    bad.write_text("[[datasets]]\nbatch_size = 'two'\n[[datasets.subsets]]\nimage_dir='x'\n")
    with pytest.raises(UserError, match="batch_size"):
        build_dataset_configs({"dataset_config": str(bad), "resolution": "64"})


def test_finetune_metadata_json_and_jsonl(tmp_path):
    d = tmp_path / "imgs"
    img(d / "one.png", 128, 128)
    img(d / "two.jpg", 192, 128)
    meta = {"one": {"caption": "a cat", "tags": "cat, sitting"}, "two.jpg": {"tags": "dog"}}
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    cfgs = build_dataset_configs({"train_data_dir": str(d), "in_json": str(tmp_path / "meta.json"), "resolution": "128",
                                  "dataset_repeats": 2})
    g = DatasetGroup.build(cfgs, scan_cache=False)
    caps = {e.path.name: (e.caption, e.num_repeats) for e in g.datasets[0].entries}
    assert caps == {"one.png": ("a cat,cat, sitting", 2), "two.jpg": ("dog", 2)}
    lines = [{"image_path": str(d / "one.png"), "caption": "x", "image_size": [128, 128]}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines), encoding="utf-8")
    g = DatasetGroup.build(build_dataset_configs({"in_json": str(tmp_path / "m.jsonl"), "train_data_dir": str(d),
                                                  "resolution": 128}), scan_cache=False)
    assert [(e.path.name, e.caption) for e in g.datasets[0].entries] == [("one.png", "x")]


def test_scan_cache_second_start_reads_no_headers(tmp_path, monkeypatch):
    root = make_tree(tmp_path)
    g1, _ = build(root)
    import lorakit.data.scan as scan

    def boom(path):
        raise AssertionError(f"header read for {path}")

    monkeypatch.setattr(scan, "image_size", boom)
    g2, _ = build(root)
    assert [e.image_size for e in g2.datasets[0].entries] == [e.image_size for e in g1.datasets[0].entries]
    # a changed file is read again
    p = root / "train" / "3_usu bear" / "a.png"
    img(p, 210, 200)
    monkeypatch.undo()
    g3, _ = build(root)
    assert [e.image_size for e in g3.datasets[0].entries if e.path == p] == [(210, 200)]


def test_missing_train_dir_messages(tmp_path):
    (tmp_path / "t" / "nonum").mkdir(parents=True)
    with pytest.raises(UserError, match="no usable `N_class` subfolder"):
        build_dataset_configs({"train_data_dir": str(tmp_path / "t"), "resolution": "64"})
    with pytest.raises(UserError, match="is not a folder"):
        build_dataset_configs({"train_data_dir": str(tmp_path / "nope"), "resolution": "64"})
    (tmp_path / "t" / "1_a").mkdir()
    with pytest.raises(UserError, match="no usable training images"):
        DatasetGroup.build(build_dataset_configs({"train_data_dir": str(tmp_path / "t"), "resolution": "64"}),
                           scan_cache=False)


def test_torch_dataloader_view(tmp_path):
    g, _ = build(make_tree(tmp_path))
    view = g.torch_dataset(epoch=1, start_batch=3)
    loader = torch.utils.data.DataLoader(view, batch_size=None, num_workers=0)
    got = [b["paths"] for b in loader]
    assert got == [g.get_batch(1, k)["paths"] for k in range(3, len(g))]


def test_fast_header_size_honours_png_exif_anywhere(tmp_path):
    import zlib

    from lorakit.data.scan import image_size

    im = Image.new("RGB", (30, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: width and height swap
    im.save(tmp_path / "before.png", exif=exif.tobytes())
    im.save(tmp_path / "plain.png")
    data = (tmp_path / "plain.png").read_bytes()
    payload = exif.tobytes()
    if payload.startswith(b"Exif\x00\x00"):
        payload = payload[6:]
    chunk = len(payload).to_bytes(4, "big") + b"eXIf" + payload + zlib.crc32(b"eXIf" + payload).to_bytes(4, "big")
    iend = data.rindex(b"IEND") - 4
    (tmp_path / "after.png").write_bytes(data[:iend] + chunk + data[iend:])
    assert image_size(tmp_path / "plain.png") == (30, 20)
    assert image_size(tmp_path / "before.png") == (20, 30)
    assert image_size(tmp_path / "after.png") == (20, 30)
    assert Image.open(tmp_path / "after.png").getexif().get(0x0112) == 6  # Pillow agrees


def test_face_crop_without_buckets(tmp_path):
    # pixel values encode position: R = x // 2, G = y // 2
    yy, xx = np.mgrid[0:400, 0:400]
    arr = np.stack([xx // 2, yy // 2, np.zeros_like(xx)], -1).astype(np.uint8)
    p = tmp_path / "train" / "1_face" / "f_300_100_40_40.png"
    p.parent.mkdir(parents=True)
    Image.fromarray(arr).save(p)
    cfgs = build_dataset_configs({"train_data_dir": str(tmp_path / "train"), "resolution": "128",
                                  "face_crop_aug_range": "2.0,2.0"})
    g = DatasetGroup.build(cfgs, scan_cache=False)
    b = g.get_batch(1, 0)
    px = ((b["images"][0] + 1) * 127.5).round().to(torch.int64)
    # face 40 px, range 2.0 -> scale min(1, 128 / 80) = 1 (no resize); crop centred on the face, clamped:
    # top = 100 - 64 = 36, left = min(300 - 64, 400 - 128) = 236
    assert b["images"].shape[-2:] == (128, 128)
    assert px[0, 0, 0].item() == 236 // 2 and px[1, 0, 0].item() == 36 // 2
    assert px[0, 0, 127].item() == (236 + 127) // 2 and px[1, 127, 0].item() == (36 + 127) // 2


@contextlib.contextmanager
def torch_calls_in_other_threads():
    """Collects every call into torch (Python functions in its package and its C functions, tensor methods
    included) made by threads started inside the block, other than the main thread."""
    seen: list[str] = []
    torch_dir = os.sep + "torch" + os.sep

    def profile(frame, event, arg):
        if threading.current_thread() is threading.main_thread():
            return
        if event == "call" and torch_dir in frame.f_code.co_filename:
            seen.append(frame.f_code.co_name)
        elif event == "c_call":
            owner = getattr(arg, "__self__", None)
            module = getattr(arg, "__module__", None) or type(owner).__module__
            if (module or "").split(".")[0] == "torch":
                seen.append(getattr(arg, "__qualname__", repr(arg)))

    threading.setprofile(profile)
    try:
        yield seen
    finally:
        threading.setprofile(None)


def test_loader_threads_make_no_tensor(tmp_path):
    # a torch operation in a loader thread starts a second OpenMP team, which slows every training step (the
    # docstring of DatasetGroup.iter_batches): the threads decode, the consumer makes the tensors
    root = make_tree(tmp_path)
    g, _ = build(root, flip_aug=True, color_aug=True)
    with torch_calls_in_other_threads() as seen:
        threaded = [b for _, b in g.iter_batches(epoch=1, num_workers=2)]
    assert threaded and not seen
    inline = [g.get_batch(1, k) for k in range(len(g))]
    for a, b in zip(threaded, inline):
        assert a["images"].dtype == torch.float32 and torch.equal(a["images"], b["images"])
    # the check itself sees a thread's torch call
    with torch_calls_in_other_threads() as seen:
        t = threading.Thread(target=lambda: torch.from_numpy(np.zeros(3)).float())
        t.start()
        t.join()
    assert seen
