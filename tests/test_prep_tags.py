"""`lorakit dataset tags`: caption editing, dry runs, backups, category CSVs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lorakit.cli.main import main
from lorakit.errors import UserError
from lorakit.tools.tag_edit import (
    TagEditOptions,
    edit_folder,
    edit_tags,
    load_tag_categories,
    normalize_tag,
    parse_replacement,
)


def T(s: str) -> list[str]:
    return [t.strip() for t in s.split(",") if t.strip()]


def test_normalize():
    assert normalize_tag("Aiming_at  viewer") == "aiming at viewer"
    assert normalize_tag(r"yuuka \(blue archive\)") == "yuuka (blue archive)" == normalize_tag("yuuka_(blue_archive)")


def test_replace_remove_glob():
    opts = TagEditOptions(
        replace=[parse_replacement("aiming at viewer=aav"), parse_replacement("\\=_\\==equal"), parse_replacement("hat=")],
        remove=["solo", "*background", "sky?"],
    )
    got = edit_tags(T("1girl, solo, aiming_at_viewer, =_=, white background, hat, aiming, skyx, sky"), opts)
    assert got == ["1girl", "aav", "equal", "aiming", "sky"]


def test_replace_into_two_tags():
    assert parse_replacement("twintails=long hair, twintails") == ("twintails", ["long hair", "twintails"])
    with pytest.raises(UserError, match="old tag=new tag"):
        parse_replacement("no equals sign")


def test_trigger_keep_tokens_dedupe_sort():
    opts = TagEditOptions(add_front=["usu bear"], dedupe=True, sort=True)
    assert edit_tags(T("smile, 1girl, usu bear, smile, 1girl, blue sky"), opts) == [
        "usu bear", "1girl", "blue sky", "smile"]
    # keep_tokens 2: the trigger already within the first two stays put; the head is neither sorted nor deduped
    opts = TagEditOptions(add_front=["usu bear"], keep_tokens=2, dedupe=True, sort=True)
    assert edit_tags(T("zebra, usu bear, smile, zebra, apple, smile"), opts) == ["zebra", "usu bear", "apple", "smile"]
    # keep_tokens 1, trigger outside the head: moved to the very front
    opts = TagEditOptions(add_front=["usu bear"], keep_tokens=1, sort=True)
    assert edit_tags(T("zebra, yak, usu_bear, apple"), opts) == ["usu bear", "apple", "yak", "zebra"]
    # keep_tokens alone protects the head from sorting
    assert edit_tags(T("zz, yy, bb, aa"), TagEditOptions(keep_tokens=2, sort=True)) == ["zz", "yy", "aa", "bb"]
    # dedupe sees "_" and " " as the same tag
    assert edit_tags(T("long_hair, long hair, Long Hair"), TagEditOptions(dedupe=True)) == ["long_hair"]


def test_categories_from_both_csv_kinds(tmp_path):
    sel = tmp_path / "selected_tags.csv"
    sel.write_text("tag_id,name,category,count\n1,1girl,0,10\n2,hatsune_miku,4,5\n3,general,9,1\n", encoding="utf-8")
    dan = tmp_path / "danbooru.csv"
    dan.write_text('1girl,0,100,"1girls,sole_female"\nwlop,1,50,"wlop_(artist)"\nblue_archive,3,40,\n', encoding="utf-8")
    cs = load_tag_categories(sel)
    assert cs == {"1girl": 0, "hatsune miku": 4, "general": 9}
    cd = load_tag_categories(dan)
    assert cd["wlop"] == 1 and cd["wlop (artist)"] == 1 and cd["blue archive"] == 3 and cd["sole female"] == 0
    opts = TagEditOptions(remove_categories={1, 3}, categories=cd)
    assert edit_tags(T(r"1girl, wlop, blue archive, wlop_\(artist\), smile"), opts) == ["1girl", "smile"]


def _snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))
            if p.is_file()}


@pytest.fixture
def caps(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "a.txt").write_text("1girl, aiming at viewer, solo, solo, artist_x\n", encoding="utf-8")
    (d / "b.txt").write_text("aiming_at_viewer,smile\r\nsecond line stays\r\n", encoding="utf-8")
    (d / "c.txt").write_text("landscape, sky", encoding="utf-8")  # no newline at the end
    (d / "a.png").write_bytes(b"png")  # images are never touched
    old = 1_600_000_000_000_000_000
    for p in d.iterdir():
        os.utime(p, ns=(old, old))
    return d


def test_dry_run_changes_nothing_and_prints_diff(caps, capsys):
    before = _snapshot(caps)
    rc = main(["dataset", "tags", str(caps), "--replace", "aiming at viewer=aav", "--add_front", "trig", "--dedupe",
               "--dry_run"])
    assert rc == 0
    assert _snapshot(caps) == before and not (caps / ".lorakit-backup").exists()
    out = capsys.readouterr().out
    assert "--- a/a.txt\n+++ b/a.txt\n" in out
    assert "-1girl, aiming at viewer, solo, solo, artist_x\n+trig, 1girl, aav, solo, artist_x\n" in out
    assert "+trig, aav, smile\r\n" in out
    assert "-landscape, sky\n\\ No newline at end of file\n+trig, landscape, sky\n\\ No newline at end of file\n" in out
    assert "would change 3" in out


def test_edit_writes_and_backs_up(caps):
    before = _snapshot(caps)
    rep, freq = edit_folder(caps, TagEditOptions(replace=[parse_replacement("aiming at viewer=aav")],
                                                 remove=["artist_*"], dedupe=True))
    assert rep.changed == 2  # c.txt has nothing to edit
    assert (caps / "a.txt").read_text(encoding="utf-8") == "1girl, aav, solo\n"
    assert (caps / "b.txt").read_bytes() == b"aav, smile\r\nsecond line stays\r\n"
    assert (caps / "c.txt").read_text(encoding="utf-8") == "landscape, sky"
    assert freq == {"1girl": 1, "aav": 2, "solo": 1, "smile": 1, "landscape": 1, "sky": 1}
    # backups hold the originals byte for byte; unchanged files are not backed up
    bk = rep.backup_dir
    assert bk is not None and bk.parent.name == ".lorakit-backup"
    assert (bk / "a.txt").read_bytes() == before["a.txt"][0]
    assert (bk / "b.txt").read_bytes() == before["b.txt"][0]
    assert not (bk / "c.txt").exists()
    assert (caps / "a.png").read_bytes() == b"png"


def test_unchanged_files_keep_their_bytes(caps):
    (caps / "d.txt").write_text("x ,y,  z\n", encoding="utf-8")
    before = (caps / "d.txt").stat().st_mtime_ns
    edit_folder(caps, TagEditOptions(remove=["nothing"]))
    assert (caps / "d.txt").read_text(encoding="utf-8") == "x ,y,  z\n"
    assert (caps / "d.txt").stat().st_mtime_ns == before


def test_no_backup_and_second_run_uses_new_backup_folder(caps):
    edit_folder(caps, TagEditOptions(add_front=["t1"]), backup=False)
    assert not (caps / ".lorakit-backup").exists()
    assert (caps / "c.txt").read_text(encoding="utf-8") == "t1, landscape, sky"
    r1, _ = edit_folder(caps, TagEditOptions(add_front=["t2"]))
    r2, _ = edit_folder(caps, TagEditOptions(add_front=["t3"]))
    assert r1.backup_dir != r2.backup_dir
    assert (r2.backup_dir / "c.txt").read_text(encoding="utf-8") == "t2, t1, landscape, sky"
    # the backup folder is hidden: a recursive edit never edits the backups
    r3, _ = edit_folder(caps, TagEditOptions(remove=["t3"]), recursive=True)
    assert r3.files == 3


def test_cli_category_removal_and_frequency(caps, tmp_path, capsys):
    dan = tmp_path / "danbooru.csv"
    dan.write_text("artist_x,1,5,\nsolo,0,9,\n", encoding="utf-8")
    rc = main(["dataset", "tags", str(caps), "--remove_category", "artist", "--tags_csv", str(dan), "--sort",
               "--show_frequency", "--no_backup"])
    assert rc == 0
    assert (caps / "a.txt").read_text(encoding="utf-8") == "1girl, aiming at viewer, solo, solo\n"
    out = capsys.readouterr().out
    assert "2  solo\n" in out
    assert main(["dataset", "tags", str(caps), "--remove_category", "artist"]) == 2  # needs --tags_csv
    assert main(["dataset", "tags", str(caps)]) == 2  # nothing to do
