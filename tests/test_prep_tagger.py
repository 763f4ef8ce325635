"""`lorakit dataset tag` with a tiny ONNX tagger built here.

The model: NHWC float input [N, 8, 8, 3] -> mean per channel / 255 -> (B, G, R) in [0, 1] (the input is BGR) ->
logit_k = c_k + wb_k*B + wg_k*G + wr_k*R -> sigmoid. With solid-colour images the probabilities are known by hand, and
every one is either sigmoid(0) = 0.5 or at least 0.73 away from 0 and 1 ... far from the thresholds used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from lorakit.cli.main import main  # noqa: E402
from lorakit.errors import UserError  # noqa: E402
from lorakit.tools.tagger import TaggerOptions, WD14Tagger, parse_tag_replacement, tag_folder  # noqa: E402

# name, category, constant, wB, wG, wR   (categories: 9 rating, 0 general, 4 character, 1 artist)
TAGS = [
    ("general", 9, 3, 0, 0, -8),
    ("sensitive", 9, -6, 0, 0, 8),
    ("questionable", 9, -6, 0, 0, 0),
    ("explicit", 9, -6, 0, 0, 0),
    ("1girl", 0, 6, 0, 0, 0),
    ("solo", 0, -4, 0, 8, 0),
    ("red_theme", 0, -4, 0, 0, 8),
    ("blue_theme", 0, -4, 8, 0, 0),
    ("aiming_at_viewer", 0, 0, 0, 0, 0),  # p = 0.5 always
    ("^_^", 0, 6, 0, 0, 0),
    ("simple_background", 0, -1, 0, 0, 0),  # p = 0.269 always
    ("hatsune_miku", 4, -4, 8, 0, 0),
    ("kagamine_rin_(vocaloid)", 4, 0, 0, 0, 0),  # p = 0.5 always
    ("some_artist", 1, 6, 0, 0, 0),  # a category the tagger ignores
]
S = 8


def write_model(d: Path, *, batch=None, nchw=False, tags=TAGS, size=S) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    k = len(TAGS)
    W = np.array([[t[3] for t in TAGS], [t[4] for t in TAGS], [t[5] for t in TAGS]], dtype=np.float32)
    c = np.array([t[2] for t in TAGS], dtype=np.float32)
    bdim = batch if batch else "batch"
    shape = [bdim, 3, size, size] if nchw else [bdim, size, size, 3]
    axes = [2, 3] if nchw else [1, 2]
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["m"], axes=axes, keepdims=0),
        helper.make_node("Mul", ["m", "inv255"], ["m01"]),
        helper.make_node("MatMul", ["m01", "W"], ["z"]),
        helper.make_node("Add", ["z", "c"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [bdim, k])],
        initializer=[
            helper.make_tensor("inv255", TensorProto.FLOAT, [1], [1 / 255]),
            helper.make_tensor("W", TensorProto.FLOAT, [3, k], W.reshape(-1).tolist()),
            helper.make_tensor("c", TensorProto.FLOAT, [k], c.tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(d / "model.onnx"))
    lines = ["tag_id,name,category,count"] + [f'{i},"{n}",{cat},{1000 - i}' for i, (n, cat, *_) in enumerate(tags)]
    (d / "selected_tags.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


@pytest.fixture
def model_dir(tmp_path):
    return write_model(tmp_path / "tagger")


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    Image.new("RGB", (S, S), (255, 0, 0)).save(d / "red.png")
    Image.new("RGB", (S, S), (0, 0, 255)).save(d / "blue.png")
    Image.new("RGB", (S, S // 2), (0, 0, 255)).save(d / "wide.png")  # padded with white rows: G = R = 0.5
    Image.new("RGBA", (S, S), (0, 0, 0, 0)).save(d / "clear.png")  # transparent -> white
    Image.new("RGB", (2 * S, 2 * S), (255, 0, 0)).save(d / "red16.png")  # shrunk to 8x8
    Image.new("RGB", (2 * S, 2 * S), (255, 0, 0)).save(d / "redjpg.jpg", quality=100)
    return d


def caption(d: Path, stem: str, ext: str = ".txt") -> str:
    return (d / f"{stem}{ext}").read_text(encoding="utf-8")


RED = "1girl, red_theme, aiming_at_viewer, ^_^, kagamine_rin_(vocaloid)\n"
BLUE = "1girl, blue_theme, aiming_at_viewer, ^_^, hatsune_miku, kagamine_rin_(vocaloid)\n"
WHITE = "1girl, solo, red_theme, blue_theme, aiming_at_viewer, ^_^, hatsune_miku, kagamine_rin_(vocaloid)\n"


def test_default_options(images, model_dir):
    rep = tag_folder(images, model_dir, TaggerOptions(), progress=False)
    assert rep.written == 6 and not rep.failed
    assert caption(images, "red") == RED
    assert caption(images, "blue") == BLUE
    # wide: B = 1, G = R = 0.5 after white padding -> solo and red_theme at p = 0.5 pass 0.35
    assert caption(images, "wide") == WHITE
    assert caption(images, "clear") == WHITE
    assert caption(images, "red16") == RED
    assert caption(images, "redjpg") == RED
    assert rep.frequency["1girl"] == 6 and rep.frequency["hatsune_miku"] == 3


def test_thresholds_order_replacement_undesired(images, model_dir):
    opts = TaggerOptions(
        general_threshold=0.6, character_threshold=0.3, remove_underscore=True, character_tags_first=True,
        rating="first", undesired_tags=["red theme"],
        tag_replacements=parse_tag_replacement("aiming at viewer,aav;^_^,smile"),
    )
    tag_folder(images, model_dir, opts, progress=False, overwrite=True)
    # aiming at viewer (0.5) fails 0.6; kagamine rin (0.5) passes 0.3; "^_^" (3 chars) keeps its underscore and
    # is then renamed; rating first, then characters (in CSV order), then general tags.
    assert caption(images, "red") == "sensitive, kagamine rin (vocaloid), 1girl, smile\n"
    assert caption(images, "blue") == "general, hatsune miku, kagamine rin (vocaloid), 1girl, blue theme, smile\n"
    assert caption(images, "wide") == "general, hatsune miku, kagamine rin (vocaloid), 1girl, blue theme, smile\n"


def test_replacement_applies_to_output_and_is_matched_by_undesired(images, model_dir):
    opts = TaggerOptions(tag_replacements=parse_tag_replacement("aiming_at_viewer,aav"), undesired_tags=["^_^"])
    tag_folder(images, model_dir, opts, progress=False)
    assert caption(images, "red") == "1girl, red_theme, aav, kagamine_rin_(vocaloid)\n"


def test_rating_last_always_first_and_extension(images, model_dir):
    rc = main([
        "dataset", "tag", str(images), "--model_dir", str(model_dir), "--use_rating_tags_as_last_tag",
        "--always_first_tags", "^_^,1girl", "--caption_extension", ".caption", "--no_progress",
        "--caption_separator", ",",
    ])
    assert rc == 0
    assert caption(images, "red", ".caption") == "^_^,1girl,red_theme,aiming_at_viewer,kagamine_rin_(vocaloid),sensitive\n"
    assert caption(images, "blue", ".caption") == (
        "^_^,1girl,blue_theme,aiming_at_viewer,hatsune_miku,kagamine_rin_(vocaloid),general\n"
    )
    assert not (images / "red.txt").exists()


def test_character_tag_expand_and_sd_scripts_flags(images, model_dir):
    rc = main(["dataset", "tag", str(images), "--model_dir", str(model_dir), "--onnx", "--character_tag_expand",
               "--remove_underscore", "--max_data_loader_n_workers", "1", "--no_progress"])
    assert rc == 0
    assert caption(images, "red") == "1girl, red theme, aiming at viewer, ^_^, kagamine rin, vocaloid\n"


def test_escaped_replacement():
    assert parse_tag_replacement(r"a\,b,c;d,e\;f") == [("a,b", "c"), ("d", "e;f")]
    with pytest.raises(UserError):
        parse_tag_replacement("only_one_part")


def test_skip_existing_overwrite_append(images, model_dir):
    (images / "red.txt").write_text("my caption\n", encoding="utf-8")
    (images / "blue.txt").write_text("1girl, custom\nsecond line\n", encoding="utf-8")
    (images / "wide.txt").write_text("  \n", encoding="utf-8")  # blank counts as no caption
    rep = tag_folder(images, model_dir, progress=False)
    assert rep.skipped_existing == 2 and rep.written == 4
    assert caption(images, "red") == "my caption\n"
    assert caption(images, "wide") == WHITE
    tag_folder(images, model_dir, progress=False, append=True)
    assert caption(images, "red") == "my caption, " + RED
    assert caption(images, "blue") == (
        "1girl, custom, blue_theme, aiming_at_viewer, ^_^, hatsune_miku, kagamine_rin_(vocaloid)\nsecond line\n")
    tag_folder(images, model_dir, progress=False, overwrite=True)
    assert caption(images, "red") == RED


def test_batches_and_workers_match(images, model_dir, tmp_path):
    tag_folder(images, model_dir, progress=False, batch_size=4, workers=2)
    got = {p.name: p.read_text() for p in images.glob("*.txt")}
    assert got["red.txt"] == RED and got["blue.txt"] == BLUE and got["clear.txt"] == WHITE and len(got) == 6
    fixed = write_model(tmp_path / "fixed", batch=1)  # a model exported with batch 1
    tag_folder(images, fixed, progress=False, batch_size=4, overwrite=True)
    assert {p.name: p.read_text() for p in images.glob("*.txt")} == got


def test_recursive_and_unreadable(images, model_dir):
    sub = images / "sub"  # not an `N_name` folder: only --recursive enters it
    sub.mkdir()
    Image.new("RGB", (S, S), (0, 0, 255)).save(sub / "b.png")
    (images / "broken.png").write_bytes(b"not an image")
    rep = tag_folder(images, model_dir, progress=False)
    assert not (sub / "b.txt").exists() and len(rep.failed) == 1 and "broken.png" in rep.failed[0]
    tag_folder(images, model_dir, progress=False, recursive=True)
    assert caption(sub, "b") == BLUE


def test_frequency_output(images, model_dir, capsys):
    assert main(["dataset", "tag", str(images), "--model_dir", str(model_dir), "--frequency_tags", "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "Tag frequencies:" in out and "6  1girl" in out and "3  hatsune_miku" in out


def test_missing_files_name_the_file_and_the_source(images, tmp_path, model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"model\.onnx is missing.*SmilingWolf"):
        WD14Tagger(empty)
    (empty / "model.onnx").write_bytes((model_dir / "model.onnx").read_bytes())
    with pytest.raises(UserError, match=r"selected_tags\.csv is missing.*SmilingWolf"):
        WD14Tagger(empty)
    with pytest.raises(UserError, match="does not exist"):
        WD14Tagger(tmp_path / "nowhere")
    # CLI: error message, exit code 2, no traceback
    assert main(["dataset", "tag", str(images), "--model_dir", str(tmp_path / "nowhere"), "--no_progress"]) == 2


def test_mismatched_model_folder(tmp_path):
    bad = write_model(tmp_path / "bad", tags=TAGS[:-1])  # CSV one row short
    with pytest.raises(UserError, match="different models"):
        WD14Tagger(bad)
    nchw = write_model(tmp_path / "nchw", nchw=True)
    with pytest.raises(UserError, match="NHWC"):
        WD14Tagger(nchw)
    hdr = write_model(tmp_path / "hdr")
    (hdr / "selected_tags.csv").write_text("name,category\n1girl,0\n", encoding="utf-8")
    with pytest.raises(UserError, match="tag_id,name,category"):
        WD14Tagger(hdr)


def test_input_size_from_model(tmp_path):
    d = write_model(tmp_path / "m", size=12)
    assert WD14Tagger(d).size == 12


def test_preprocess_layout():
    from lorakit.tools.tagger import preprocess

    img = Image.new("RGB", (4, 2), (10, 20, 30))
    a = preprocess(img, 4)
    assert a.shape == (4, 4, 3) and a.dtype == np.uint8
    # centred vertically: one white row above and below; BGR order
    assert a[0].tolist() == [[255, 255, 255]] * 4 and a[3].tolist() == [[255, 255, 255]] * 4
    assert a[1].tolist() == [[30, 20, 10]] * 4
