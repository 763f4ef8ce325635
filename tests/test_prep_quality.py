"""`lorakit dataset quality`: quality tags by booru score."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorakit.cli.main import main
from lorakit.errors import UserError
from lorakit.tools.quality_tags import add_quality_tags, load_scores, parse_thresholds, quality_tags_for

TH = parse_thresholds("6=high quality,18=best quality,60=masterpiece")


def test_tiers():
    assert TH == [(6.0, "high quality"), (18.0, "best quality"), (60.0, "masterpiece")]
    assert quality_tags_for(5.9, TH) == []
    assert quality_tags_for(6, TH) == ["high quality"]
    assert quality_tags_for(17, TH) == ["high quality"]
    assert quality_tags_for(18, TH) == ["best quality"]
    assert quality_tags_for(60, TH) == ["masterpiece"]
    assert quality_tags_for(60, TH, "cumulative") == ["masterpiece", "best quality", "high quality"]
    assert quality_tags_for(20, TH, "cumulative") == ["best quality", "high quality"]
    assert parse_thresholds("10=good, 1=ok") == [(1.0, "ok"), (10.0, "good")]
    with pytest.raises(UserError):
        parse_thresholds("6:high quality")


@pytest.fixture
def ds(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    for name, cap in [("a", "trig, 1girl, smile"), ("b", "trig, 1girl, masterpiece"), ("c", "trig, sky"),
                      ("d", "trig, cat"), ("e", None)]:
        (d / f"{name}.png").write_bytes(b"img")
        if cap is not None:
            (d / f"{name}.txt").write_text(cap + "\n", encoding="utf-8")
    return d


def read(d: Path, stem: str) -> str:
    return (d / f"{stem}.txt").read_text(encoding="utf-8")


def test_scores_json_highest_with_keep_tokens(ds, tmp_path):
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"a.png": 7, "b": 3, "c.png": {"score": 75}, "e.png": 100}), encoding="utf-8")
    rep = add_quality_tags(ds, scores=scores, keep_tokens=1)
    assert read(ds, "a") == "trig, high quality, 1girl, smile\n"
    assert read(ds, "b") == "trig, 1girl\n"  # below 6: a stale quality tag is removed
    assert read(ds, "c") == "trig, masterpiece, sky\n"
    assert read(ds, "d") == "trig, cat\n"
    assert rep.no_score == ["d.png"] and rep.no_caption == ["e.png"]
    assert rep.tagged == {"high quality": 1, "masterpiece": 1}
    # idempotent; a new threshold table replaces the old tags instead of adding to them
    add_quality_tags(ds, scores=scores, keep_tokens=1)
    assert read(ds, "a") == "trig, high quality, 1girl, smile\n"
    add_quality_tags(ds, scores=scores, thresholds="5=high quality,70=masterpiece", mode="cumulative", backup=False)
    assert read(ds, "a") == "high quality, trig, 1girl, smile\n"
    assert read(ds, "c") == "masterpiece, high quality, trig, sky\n"


def test_scores_csv_and_list_json(ds, tmp_path):
    csvf = tmp_path / "scores.csv"
    csvf.write_text("id,file,score\n1,a.png,18\n2,c.png,59.5\n", encoding="utf-8")
    assert load_scores(csvf) == {"a.png": 18.0, "c.png": 59.5}
    add_quality_tags(ds, scores=csvf, mode="cumulative")
    assert read(ds, "a") == "best quality, high quality, trig, 1girl, smile\n"
    assert read(ds, "c") == "best quality, high quality, trig, sky\n"
    lst = tmp_path / "scores2.json"
    lst.write_text(json.dumps([{"filename": "d.png", "fav_count": 70, "score": 1}]), encoding="utf-8")
    assert load_scores(lst, "fav_count") == {"d.png": 70.0}
    bare = tmp_path / "bare.csv"
    bare.write_text("a.png,6\nb.png,x\n", encoding="utf-8")
    assert load_scores(bare) == {"a.png": 6.0}
    with pytest.raises(UserError, match="no scores"):
        empty = tmp_path / "empty.json"
        empty.write_text("{}", encoding="utf-8")
        load_scores(empty)


def test_sidecar_json_gallery_dl_and_e621(ds):
    (ds / "a.png.json").write_text(json.dumps({"id": 1, "score": 25, "rating": "g"}), encoding="utf-8")
    (ds / "c.json").write_text(json.dumps({"score": {"up": 70, "down": -5, "total": 65}}), encoding="utf-8")
    rep = add_quality_tags(ds)
    assert read(ds, "a") == "best quality, trig, 1girl, smile\n"
    assert read(ds, "c") == "masterpiece, trig, sky\n"
    assert sorted(rep.no_score) == ["b.png", "d.png", "e.png"]
    assert read(ds, "b") == "trig, 1girl, masterpiece\n"  # no score: untouched


def test_dry_run_changes_nothing(ds, tmp_path, capsys):
    scores = tmp_path / "s.json"
    scores.write_text(json.dumps({"a.png": 100}), encoding="utf-8")
    old = 1_600_000_000_000_000_000
    for p in ds.iterdir():
        os.utime(p, ns=(old, old))
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in ds.iterdir()}
    rc = main(["dataset", "quality", str(ds), "--scores", str(scores), "--dry_run"])
    assert rc == 0
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in ds.iterdir()} == before
    out = capsys.readouterr().out
    assert "-trig, 1girl, smile\n+masterpiece, trig, 1girl, smile\n" in out
    rc = main(["dataset", "quality", str(ds), "--scores", str(scores), "--keep_tokens", "1"])
    assert rc == 0 and read(ds, "a") == "trig, masterpiece, 1girl, smile\n"
    assert (next((ds / ".lorakit-backup").iterdir()) / "a.txt").read_text(encoding="utf-8") == "trig, 1girl, smile\n"
