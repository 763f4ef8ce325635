"""The pieces behind the bad-input corpus, called directly: images over Pillow's limit, captions of only commas,
folders named `0_x` / `-3_x`, a subset with num_repeats 0."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lorakit.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))


def test_decompression_bomb_is_an_image_error(tmp_path):
    from test_bad_inputs import bomb_png

    from lorakit.data.scan import image_size as header_size, scan_sizes
    from lorakit.utils.images import ImageReadError, image_size, open_image

    p = bomb_png(tmp_path / "huge.png")
    for reader in (open_image, image_size, header_size):
        with pytest.raises(ImageReadError, match=r"huge.png is too large to decode safely .*--on_bad_image skip"):
            reader(p)
    sizes, errors = scan_sizes([p], None, workers=1)
    assert sizes == {} and "too large" in errors[p]


def test_odd_decoder_errors_are_image_errors(tmp_path, monkeypatch):
    from PIL import Image, ImageFile

    from lorakit.utils.images import ImageReadError, open_image

    src = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(src)

    def broken_load(self):
        raise IndexError("tile index out of range")  # what some damaged TIFF/BMP files raise

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken_load)
    with pytest.raises(ImageReadError, match=r"a.png cannot be read \(IndexError: tile index"):
        open_image(src)


@pytest.mark.parametrize("text,wildcard,ok", [
    (",,,", False, False), (" , ,\n", False, False), ("\n\nzq", False, False), ("zq, ,", False, True),
    (",,\nzq\n, ,", True, True), (", ,\n ,", True, False), ("", False, False),
])
def test_caption_of_only_separators_is_empty(tmp_path, text, wildcard, ok):
    from lorakit.data.captions import CaptionError, read_caption_file

    p = tmp_path / "c.txt"
    p.write_text(text, encoding="utf-8")
    if ok:
        assert read_caption_file(p, wildcard).replace(",", "").strip()
    else:
        with pytest.raises(CaptionError, match=r"c.txt (is empty|holds only commas|has an empty first line)"):
            read_caption_file(p, wildcard)


@pytest.mark.parametrize("name,kind,fix", [
    ("0_zq bear", "error", "`1_zq bear`"), ("-3_zq bear", "error", "`3_zq bear`"), ("0", "error", "`1_class tokens`"),
    ("zq bear", "skip", "`10_zq bear`"), ("samples", "skip", "`10_samples`"), ("5_zq", None, None),
])
def test_repeat_folder_names(tmp_path, name, kind, fix):
    from lorakit.data.scan import repeat_folder_problem

    found = repeat_folder_problem(tmp_path / name)
    if kind is None:
        assert found is None
    else:
        assert found[0] == kind and fix in found[1] and str(tmp_path / name) in found[1]
        if kind == "error":
            assert f"repeat count {int(name.split('_')[0])}" in found[1] and "no leading" not in found[1]


def test_subset_with_zero_repeats_is_an_error(tmp_path):
    from test_train_common import make_images

    from lorakit.data.config import build_dataset_configs
    from lorakit.data.dataset import DatasetGroup

    make_images(tmp_path / "imgs", 1)
    toml = tmp_path / "d.toml"
    toml.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'imgs'}'\n"
                    f"[[datasets.subsets]]\nimage_dir = '{tmp_path / 'imgs'}'\nnum_repeats = 2\n", encoding="utf-8")
    configs = build_dataset_configs({"dataset_config": str(toml)})
    configs[0].subsets[0].num_repeats = 0  # as a caller could set it in code
    with pytest.raises(UserError, match=r"imgs has num_repeats = 0: .*Set num_repeats = 1"):
        DatasetGroup.build(configs, on_bad_image="error", scan_cache=False)
    group = DatasetGroup.build(configs, on_bad_image="skip", scan_cache=False)  # dataset check lists it instead
    assert [p.kind for p in group.problems] == ["repeats"] and group.num_train_images == 2
