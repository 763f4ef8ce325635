"""`lorakit eval` on a tiny SD1 model: batched samples equal the generation layer's, each checkpoint is merged and
taken out exactly, the CLI writes its JSON/PNGs and a recommendation that respects the thresholds, and the training
hook (--eval_every_n_steps) scores saved files without changing the trained weights."""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from test_eval_tagger import write_tagger, write_training_set  # noqa: E402
from test_train_common import dataset, one_thread, options, read_lora, run  # noqa: E402,F401

from lorakit.eval.sampling import SampleSettings, sample_images  # noqa: E402

SETTINGS = SampleSettings(steps=2, sampler="DDIM", cfg_scale=5.0, width=64, height=64, batch_size=16)


@functools.lru_cache(maxsize=None)
def _tiny():
    from lorakit.models.tiny import tiny_bundle

    return tiny_bundle("sd1", seed=0)


def tiny():
    return copy.deepcopy(_tiny())


def write_lora(bundle, path: Path, step: int, scale: float, seed: int) -> Path:
    from lorakit.adapters.network import create_network

    net = create_network(bundle, "networks.lora", network_dim=2, network_alpha=2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("lora_up.weight"):  # zero-initialised: give the checkpoint an effect
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    net.save_weights(path, precision="fp32", metadata={"ss_steps": str(step), "ss_epoch": str(step // 10),
                                                       "ss_resolution": "(64, 64)"})
    return path


def test_batched_samples_equal_the_generator():
    from lorakit.generate.pipeline import GenerationSettings, Generator

    b = tiny()
    prompts, seeds = ["zq shape", "a red ball", "zq shape"], [7, 7, 8]
    imgs = sample_images(b, prompts, seeds, SampleSettings(steps=3, cfg_scale=5.0, width=64, height=64, batch_size=2))
    with Generator(b) as gen:
        for i, (p, s) in enumerate(zip(prompts, seeds)):
            ref = gen(GenerationSettings(prompt=p, steps=3, sampler="DDIM", cfg_scale=5.0, seed=s, width=64,
                                         height=64)).images[0]
            # batched UNet/VAE calls round differently from one-image calls: at most a level or two
            assert np.abs(np.asarray(ref, np.int16) - imgs[i].astype(np.int16)).max() <= 2


def test_checkpoints_merge_and_restore_exactly(tmp_path):
    from lorakit.eval.concept import find_concept, training_images
    from lorakit.eval.runner import EvalSettings, Evaluation, find_checkpoints
    from lorakit.eval.taggers import WD14Adapter

    b = tiny()
    before = {k: v.clone() for k, v in {**b.unet.state_dict(), **b.text_encoders[0].state_dict()}.items()}
    loras = tmp_path / "out"
    loras.mkdir()
    write_lora(b, loras / "zq-000002.safetensors", 20, 0.5, 1)
    write_lora(b, loras / "zq-000001.safetensors", 10, 0.5, 2)
    write_lora(b, loras / "zq.safetensors", 30, 0.5, 3)
    (loras / "other.safetensors").write_bytes((loras / "zq.safetensors").read_bytes())
    ckpts = find_checkpoints(loras, "zq*")
    assert [c.name for c in ckpts] == ["zq-000001", "zq-000002", "zq"] and [c.step for c in ckpts] == [10, 20, 30]
    tagger = WD14Adapter(write_tagger(tmp_path / "tagger"))
    concept = find_concept(training_images(write_training_set(tmp_path / "data")), tagger,
                           unrelated_prompts=["landscape"])
    ev = Evaluation(b, concept, tagger, EvalSettings(seeds=2, sample=SETTINGS), log=lambda *_: None)
    base_row = ev.add_base()
    rows = [ev.add_file(c) for c in ckpts]
    after = {**b.unet.state_dict(), **b.text_encoders[0].state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)  # unmerged bit for bit
    assert base_row["tag_drift"] == 0 and base_row["pixel_drift"] == 0
    again = ev.sample_now()  # the base model again: the same images as at the start
    assert np.array_equal(again.images, ev.base.images)
    res = ev.result()
    assert [r["name"] for r in res["rows"]] == ["base model", "zq-000001", "zq-000002", "zq"]
    assert len(res["rows"]) == 4 and res["samples_per_model"] == 2 * 5 == ev.n_samples
    ok = [r for r in rows if not r["flags"]]
    if ok:  # the best recall among the checkpoints without flags
        assert res["recommended"] == max(ok, key=lambda r: r["concept_recall"])["name"]
    else:
        assert res["recommended"] is None
    assert set(res["pareto"]) <= {r["name"] for r in rows}


def test_cli_writes_table_chart_sheet(tmp_path, capsys):
    from lorakit.cli.main import main
    from lorakit.models.saving import save_single_file

    b = tiny()
    model = save_single_file(b, tmp_path / "tiny.safetensors")
    loras = tmp_path / "out"
    loras.mkdir()
    for i in (1, 2):
        write_lora(b, loras / f"zq-{i:06d}.safetensors", 10 * i, 0.3 * i, i)
    argv = ["eval", "--model", str(model), "--lora_dir", str(loras), "--train_data_dir",
            str(write_training_set(tmp_path / "data")), "--tagger_dir", str(write_tagger(tmp_path / "tagger")),
            "--seeds", "2", "--steps", "2", "--unrelated_prompts", "landscape | city", "--no_progress",
            "--max_drift", "100", "--max_copy_rate", "1", "--min_diversity", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    res = json.loads((loras / "zq_eval.json").read_text())
    assert res["format"] == "lorakit-eval/1" and res["concept"]["core_tags"] == ["1girl", "red theme", "zq chan"]
    assert res["settings"]["width"] == 64 and res["samples_per_model"] == 2 * 6
    # thresholds wide open: nothing flagged, the best recall recommended (the earlier one on a tie)
    rows = res["rows"][1:]
    best = max(rows, key=lambda r: (r["concept_recall"], r["adherence"] or 0, -(r["prior_drift"] or 0)))
    assert res["recommended"] == best["name"] and f"recommended: {best['path']}" in out
    from PIL import Image

    sheet = Image.open(loras / "zq_eval_sheet.png")
    assert sheet.width >= 6 * 128 and sheet.height >= 3 * 128  # 6 prompts x (base + 2 checkpoints)
    assert Image.open(loras / "zq_eval_chart.png").size == (720, 320)
    assert "| **" in (loras / "zq_eval.md").read_text()
    # which scene tags and why: one line of the log, and in the table's notes
    why = "the most frequent caption tags that wd14 (tagger) reads, among its scene labels"  # folder "tagger"
    assert f"scene tags: outdoors ({why})" in out and why in (loras / "zq_eval.md").read_text()
    # errors are one paragraph naming the flag
    assert main(argv[:1] + ["--model", str(model), "--lora_dir", str(loras), "--tagger", "toy"]) == 2
    assert "--train_data_dir" in capsys.readouterr().err
    assert main(argv + ["--loras", "nothing*"]) == 2
    assert "--loras" in capsys.readouterr().err
    assert main(argv + ["--width", "30"]) == 2  # checked with the other values, before the model loads
    captured = capsys.readouterr()
    assert "--width 30" in captured.err and "samples per model" not in captured.out


def test_training_hook_scores_saves_and_leaves_training_alone(tmp_path):
    data = dataset(tmp_path, n_train=2, captions=["zq shape, tag1", "zq shape, tag2"])
    tagger = write_tagger(tmp_path / "tagger")
    common = ("--max_train_steps", "4", "--learning_rate", "1e-3")
    plain = run(options(tmp_path / "a", data, *common))
    hooked = run(options(tmp_path / "b", data, *common, "--eval_every_n_steps", "2", "--eval_tagger", str(tagger),
                         "--eval_seeds", "1", "--eval_core_tags", "1girl", "--sample_sampler", "ddim",
                         "--sample_prompts", str(_prompt_file(tmp_path))))
    want, _ = read_lora(plain.final_lora)
    got, _ = read_lora(hooked.final_lora)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    out = tmp_path / "b" / "out"
    res = json.loads((out / "last_eval.json").read_text())
    # the LoRA at step 2 was saved for the eval (no --save_every_n_steps), then the final one
    assert [r["name"] for r in res["rows"]] == ["base model", "last-step00000002", "last"]
    assert [r["step"] for r in res["rows"]] == [None, 2, 4]
    assert res["settings"]["steps"] == 2 and res["settings"]["cfg_scale"] == 3.0  # from the prompt file
    assert (out / "last_eval_sheet.png").is_file() and (out / "last_eval_chart.png").is_file()


def _prompt_file(tmp_path: Path) -> Path:
    p = tmp_path / "prompts.txt"
    p.write_text("zq shape --s 2 --l 3\n", encoding="utf-8")
    return p


def test_eval_in_bf16_on_a_cpu_without_it_warns_before_loading(tmp_path, capsys, monkeypatch):
    """utils.cpu: `lorakit eval --dtype bf16` where the CPU has no bf16 arithmetic names the measured slowdown before
    the model loads (the load is stopped there: the warning is what is checked)."""
    from lorakit.cli.main import main
    from lorakit.errors import UserError
    from lorakit.models import loading
    from lorakit.utils import cpu

    loras = tmp_path / "out"
    loras.mkdir()
    write_lora(tiny(), loras / "zq-000010.safetensors", 10, 0.3, 1)

    def stop(*a, **k):
        raise UserError("load stopped by the test")

    monkeypatch.setattr(loading, "load_bundle", stop)
    argv = ["eval", "--model", str(tmp_path / "m.safetensors"), "--lora_dir", str(loras), "--train_data_dir",
            str(write_training_set(tmp_path / "data")), "--tagger_dir", str(write_tagger(tmp_path / "tagger")),
            "--seeds", "2", "--steps", "2", "--no_progress", "--device", "cpu"]
    (tmp_path / "m.safetensors").write_bytes(b"")
    monkeypatch.setattr(cpu, "native_half", lambda dtype: dtype == torch.float32)
    assert main(argv + ["--dtype", "bf16"]) == 2
    out = capsys.readouterr().out
    assert re.search(r"warning: --dtype bf16 on this CPU .* [0-9]+x slower than fp32", out), out
    assert out.index("warning: --dtype bf16") < out.index("loading ")
    monkeypatch.setattr(cpu, "native_half", lambda dtype: True)
    assert main(argv + ["--dtype", "bf16"]) == 2
    out = capsys.readouterr().out
    assert "loading " in out and "warning: --dtype" not in out
