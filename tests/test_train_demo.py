"""`lorakit demo` end to end with few steps: it trains, saves and prints where everything is."""

from test_train_common import one_thread  # noqa: F401


def test_demo_runs_and_prints_paths(tmp_path, capsys):
    from lorakit.cli.main import main

    assert main(["demo", "--output_dir", str(tmp_path), "--steps", "4", "--no_progress"]) == 0
    out = capsys.readouterr().out
    lora = tmp_path / "output" / "usu_bear.safetensors"
    assert lora.exists() and f"LoRA: {lora}" in out
    samples = sorted((tmp_path / "output" / "sample").glob("*.png"))
    assert len(samples) == 2 and all(f"sample image: {p}" in out for p in samples)
    assert "lorakit train --pretrained_model_name_or_path" in out
