"""lorakit lora relora: two rounds on a tiny model; round 2 trains on round 1's merged weights; resumable."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.tools.relora import relora, round_learning_rates


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(folder):
    sub = folder / "train" / "1_zq shape"
    sub.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text("zq shape")
    return folder / "train"


def test_round_learning_rates():
    assert round_learning_rates(3, 1e-4) == pytest.approx([1e-4, 5e-5, 2.5e-5])
    assert round_learning_rates(3, 1.0, [3e-4, 1e-4]) == [3e-4, 1e-4, 1e-4]


def test_two_rounds_second_starts_from_merged(tmp_path):
    from lorakit.models.loading import load_bundle
    from lorakit.models.saving import save_single_file
    from lorakit.models.tiny import tiny_bundle
    from lorakit.train.trainer import train
    from lorakit.tools.lora_merge import LoraSpec, merge_into_bundle

    base = tiny_bundle("sd1", seed=0)
    ckpt = tmp_path / "base.safetensors"
    save_single_file(base, ckpt)
    train_dir = _data(tmp_path)
    argv = ["--pretrained_model_name_or_path", str(ckpt), "--train_data_dir", str(train_dir), "--resolution", "64",
            "--network_dim", "2", "--network_alpha", "2", "--seed", "3", "--max_train_steps", "2",
            "--max_data_loader_n_workers", "1", "--network_train_unet_only", "--output_name", "rl"]
    seen = []

    def spy(opts, **kw):
        bundle = load_bundle(opts.pretrained_model_name_or_path)
        seen.append((opts.pretrained_model_name_or_path, opts.learning_rate,
                     {k: v.clone() for k, v in bundle.unet.state_dict().items()}))
        return train(opts, bundle=bundle, progress=False, **kw)

    out = tmp_path / "relora"
    state = relora(argv, out, rounds=1, learning_rates=[1e-2, 5e-3], log=lambda *a: None, train_fn=spy)
    assert len(state["completed"]) == 1 and len(seen) == 1
    # continuing with a second round trains round 2 only, on round 1's merged model
    state = relora(argv, out, rounds=2, learning_rates=[1e-2, 5e-3], log=lambda *a: None, train_fn=spy)
    assert len(seen) == 2
    r1, r2 = state["completed"]
    assert seen[0][0] == str(ckpt) and seen[0][1] == pytest.approx(1e-2)
    assert seen[1][0] == r1["merged_model"] and seen[1][1] == pytest.approx(5e-3)
    assert r2["base_model"] == r1["merged_model"]
    for r in (r1, r2):
        assert (tmp_path / r["lora"]).exists() and (tmp_path / r["merged_model"]).exists()
    # the weights round 2 started from are base + round 1's LoRA
    expect = tiny_bundle("sd1", seed=0)
    merge_into_bundle(expect, [LoraSpec(r1["lora"], 1.0)])
    changed = 0
    for k, v in expect.unet.state_dict().items():
        torch.testing.assert_close(seen[1][2][k], v, rtol=1e-5, atol=1e-6)
        changed += int(not torch.equal(v, seen[0][2][k]))
    assert changed > 0
    on_disk = json.loads((out / "relora_state.json").read_text())
    assert on_disk["learning_rates"] == [1e-2, 5e-3] and len(on_disk["completed"]) == 2
    # a third call with the same request does nothing
    relora(argv, out, rounds=2, learning_rates=[1e-2, 5e-3], log=lambda *a: None, train_fn=spy)
    assert len(seen) == 2


def test_cli_one_round(tmp_path):
    from lorakit.cli.main import main
    from lorakit.models.saving import save_single_file
    from lorakit.models.tiny import tiny_bundle

    ckpt = tmp_path / "base.safetensors"
    save_single_file(tiny_bundle("sd1", seed=1), ckpt)
    train_dir = _data(tmp_path)
    out = tmp_path / "rl"
    rc = main(["lora", "relora", "--output_dir", str(out), "--rounds", "1", "--", "--pretrained_model_name_or_path",
               str(ckpt), "--train_data_dir", str(train_dir), "--resolution", "64", "--network_dim", "2",
               "--max_train_steps", "1", "--max_data_loader_n_workers", "1", "--network_train_unet_only"])
    assert rc == 0
    st = json.loads((out / "relora_state.json").read_text())
    assert st["completed"][0]["merged_model"].endswith("relora_r01_merged.safetensors")
    assert st["learning_rates"] == [1e-4]
