"""`lorakit demo` end to end with few steps: it trains on the shipped toy base, draws the before/after grid, scores
the LoRA and prints where everything is."""

import json

from PIL import Image
from safetensors import safe_open
from test_train_common import one_thread  # noqa: F401


def test_demo_runs_draws_grid_and_prints_metrics(tmp_path, capsys):
    from lorakit.cli.demo_cmd import GRID_PROMPTS, GRID_SEEDS
    from lorakit.cli.main import main

    assert main(["demo", "--output_dir", str(tmp_path), "--steps", "4", "--eval_seeds", "1", "--no_progress",
                 "--seed", "7"]) == 0
    out = capsys.readouterr().out
    lora = tmp_path / "output" / "usu_bear.safetensors"
    assert lora.exists() and f"LoRA: {lora}" in out
    assert len(list((tmp_path / "dataset" / "train" / "20_usu bear").glob("*.png"))) == 15
    # the documented variant: class images the base model drew, and the trigger's own vector bundled in the LoRA
    from lorakit.toyworld.recipe import REG_CLASSES

    for cls, n in REG_CLASSES:
        assert len(list((tmp_path / "dataset" / "reg" / f"1_{cls}").glob("*.png"))) == n
    assert "--train_embedding usu" in out and "--reg_data_dir" in out
    with safe_open(str(lora), "pt") as fh:
        assert "bundle_emb.usu.string_to_param.*" in fh.keys()
        assert fh.metadata()["ss_seed"] == "7"  # --seed reaches the training (the README's seed spread)
        assert fh.metadata()["ss_batch_size_per_device"] == "8"  # the variant's batch, not the recipe's 4
    command = next(line for line in out.splitlines() if line.lstrip().startswith("lorakit train "))
    for flag in ("--learning_rate", "--train_batch_size"):  # the variant replaces the recipe's value: named once
        assert command.split().count(flag) == 1, flag
    assert "lorakit train --pretrained_model_name_or_path" in out and "--max_train_steps 4" in out and "--seed 7" in out
    grid = Image.open(tmp_path / "before_after.png")
    # one 64 px cell per (prompt, base/LoRA, seed) plus label margins
    assert grid.width >= 64 * 2 * len(GRID_SEEDS) and grid.height >= 64 * len(GRID_PROMPTS)
    report = json.loads((tmp_path / "quality.json").read_text())
    for key in ("fidelity", "composability", "prior_agreement", "prior_leak", "bleed_agreement", "bleed_pixel_change"):
        shown = f"{report[key]:.3f}" if key == "bleed_pixel_change" else f"{report[key]:.2f}"
        assert 0.0 <= report[key] <= 1.0 and shown in out
    assert "fidelity" in out and "before/after grid" in out
    # the minutes after training say what they are spent on (issue 21: no silent waits)
    assert out.index("drawing the before/after grid ...") < out.index("before/after grid: ") < \
        out.index("measuring quality: ") < out.index("fidelity")
