"""The GUI's Eval tab: it reads the results a run wrote (JSON + PNGs), shows the curves and the sheet, and marks the
recommended file; a folder without results is a message, not a traceback."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio")


def _row(name, step, recall, drift, flags=(), path=None):
    return {"name": name, "path": path, "step": step, "epoch": None, "is_base": step is None,
            "concept_recall": recall, "tag_recall": recall, "full_match": 0.0, "core_tag_recall": {}, "adherence": 0.5,
            "prior_drift": drift, "tag_drift": drift / 2, "pixel_drift": 0.01, "class_leak": 0.0, "copy_rate": 0.0,
            "nearest_train_distance": 0.3, "diversity": 0.4, "flags": list(flags), "memorised": False}


def test_eval_tab_shows_a_runs_results(tmp_path):
    from lorakit.eval.report import write_outputs
    from lorakit.gui.app import build_app

    out = tmp_path / "out"
    rows = [_row("base model", None, 0.1, 0.0), _row("zq-000001", 10, 0.4, 0.5, path=str(out / "zq-000001.st")),
            _row("zq", 20, 0.7, 0.9, ["drift"], path=str(out / "zq.st"))]
    result = {"format": "lorakit-eval/1", "settings": {"max_drift": 0.8}, "samples_per_model": 2,
              "concept": {"trigger": "zq", "class_prompt": "girl", "core_tags": ["1girl"], "scene_tags": []},
              "prompts": [{"text": "zq", "kind": "trigger", "requested": []},
                          {"text": "girl", "kind": "class", "requested": []}],
              "rows": rows, "recommended": "zq-000001", "recommended_path": rows[1]["path"],
              "why": "zq-000001: the best concept recall", "pareto": ["zq-000001", "zq"]}
    imgs = [np.full((2, 64, 64, 3), 40 * i, np.uint8) for i in range(3)]
    write_outputs(result, imgs, out, "zq")

    demo, ctx = build_app(roots=[tmp_path], jobs_dir=tmp_path / "jobs")
    fns = {}
    for f in demo.fns.values():
        fns.setdefault(f.name, f.fn)
    verdict, chart, sheet, table, log = fns["on_eval_show"](str(out))
    assert f"Recommended: `{rows[1]['path']}`" in verdict and "zq_eval.json" in log
    assert chart.size == (720, 320) and sheet.width >= 2 * 128 and sheet.height >= 3 * 128
    assert [r[0] for r in table] == ["base model", "★ zq-000001 (recommended)", "zq (Pareto)"]
    assert table[2][-1] == "drift" and table[1][2] == "0.40"
    with pytest.raises(gr.Error, match="no \\*_eval.json"):
        fns["on_eval_show"](str(tmp_path))
    with pytest.raises(gr.Error, match="outside"):
        fns["on_eval_show"]("/etc")
    demo.lorakit_generators.close()


def test_eval_tab_evaluates_a_folder(tmp_path):
    """Evaluate: the same run_eval as `lorakit eval`, on a tiny model and a tiny ONNX tagger, shown in the panel."""
    pytest.importorskip("onnxruntime")
    from test_eval_pipeline import tiny, write_lora
    from test_eval_tagger import write_tagger, write_training_set

    from lorakit.gui.app import build_app
    from lorakit.models.saving import save_single_file

    b = tiny()
    model = save_single_file(b, tmp_path / "tiny.safetensors")
    loras = tmp_path / "out"
    loras.mkdir()
    for i in (1, 2):
        write_lora(b, loras / f"zq-{i:06d}.safetensors", 10 * i, 0.3 * i, i)
    train, tagger = write_training_set(tmp_path / "data"), write_tagger(tmp_path / "tagger")
    demo, ctx = build_app(roots=[tmp_path], jobs_dir=tmp_path / "jobs")
    fns = {}
    for f in demo.fns.values():
        fns.setdefault(f.name, f.fn)
    # thresholds wide open: the checkpoint with the best recall is recommended and marked
    verdict, chart, sheet, table, log = fns["on_eval_run"](str(loras), "zq*", str(model), str(train), str(tagger),
                                                           False, "", 2, 2, 5.0, 100.0, 1.0)
    from lorakit.eval.report import read_result

    res = read_result(loras / "zq_eval.json")
    assert res["recommended"] in ("zq-000001", "zq-000002")
    assert f"Recommended: `{res['recommended_path']}`" in verdict and "concept:" in log
    assert [r[0] for r in table][0] == "base model" and len(table) == 3
    assert f"★ {res['recommended']} (recommended)" in [r[0] for r in table]
    assert chart.size == (720, 320) and sheet.height >= 3 * 128
    with pytest.raises(gr.Error, match="--tagger_dir"):  # an empty folder is named with the flag it stands for
        fns["on_eval_run"](str(loras), "zq*", str(model), str(train), str(tmp_path / "jobs"), False, "", 2, 2, 5.0,
                           0.8, 0.25)
    demo.lorakit_generators.close()
