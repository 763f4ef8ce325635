"""Validation loss (--validation_split and friends): the seeded split, the fixed timesteps and noise, the score
against the formula, isolation from the training's random streams, and where it is reported."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lorakit.errors import UserError
from test_train_common import dataset, one_thread, options, read_lora, run, tiny  # noqa: F401
from test_train_golden import lora_hash


def _group(tmp, data, *extra, seed=3):
    from lorakit.data import DatasetGroup, build_dataset_configs

    opts = options(tmp, data, *extra)
    return DatasetGroup.build(build_dataset_configs(opts), seed=seed, scan_cache=False)


# ---- the split ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, split", [(10, 0.2), (7, 0.3), (3, 0.5), (5, 0.1)])
def test_split_sizes_disjoint_and_reg_kept(tmp_path, n, split):
    data = dataset(tmp_path, n_train=n, n_reg=3, repeats=4)
    g = _group(tmp_path, data, "--validation_split", str(split))
    val = g.validation_group()
    train_paths = [e.path for e in g.datasets[0].entries if not e.is_reg]
    n_train = math.ceil(n * (1 - split))  # sd-scripts keeps ceil(n * (1 - split)) for training
    assert len(train_paths) == n_train
    held = [e.path for e in val.datasets[0].entries] if val else []
    assert len(held) == n - n_train and not set(held) & set(train_paths)
    assert len(set(held) | set(train_paths)) == n
    assert sum(e.is_reg for e in g.datasets[0].entries) == 3  # regularization images are never held out
    if val:
        assert all(e.num_repeats == 1 and not e.is_reg for e in val.datasets[0].entries)  # each once
        assert val.num_train_images == n - n_train


def test_split_is_seeded(tmp_path):
    data = dataset(tmp_path, n_train=12)

    def held(*extra, seed=3):
        return sorted(e.path.name for e in _group(tmp_path, data, "--validation_split", "0.25", *extra,
                                                   seed=seed).validation_group().datasets[0].entries)

    assert held() == held()  # the run's seed
    assert held("--validation_seed", "7", seed=1) == held("--validation_seed", "7", seed=2)  # its own seed wins
    draws = {tuple(held("--validation_seed", str(s))) for s in range(6)}
    assert len(draws) > 1
    assert _group(tmp_path, data).validation_group() is None  # no split, no validation set


def test_validation_split_in_toml(tmp_path):
    data = dataset(tmp_path, n_train=4)
    toml = tmp_path / "ds.toml"
    toml.write_text(f'[general]\nvalidation_seed = 5\n[[datasets]]\nresolution = 64\nvalidation_split = 0.5\n'
                    f'[[datasets.subsets]]\nimage_dir = "{tmp_path / "train" / "1_zq shape"}"\n', encoding="utf-8")
    g = _group(tmp_path, {"dataset_config": str(toml)})
    assert g.num_train_images == 2 and g.validation_group().num_train_images == 2


# ---- the score -----------------------------------------------------------------------------------------------------
def test_validation_timesteps_are_sd_scripts_four():
    from lorakit.train.validation import validation_timesteps

    assert validation_timesteps(None, None) == [200, 400, 600, 800]
    assert validation_timesteps(100, 600) == [200, 300, 400, 500]


class _Log:
    def __init__(self):
        self.calls = []

    def validation(self, *a):
        self.calls.append(a)


def _validator(tmp_path, *extra, family="sd1"):
    """A Validator over a tiny model with a LoRA applied, built through the stages."""
    from lorakit.adapters.network import create_network
    from lorakit.train import stages as S
    from lorakit.train.loop import LossOptions, NoiseOptions, StepMaths
    from lorakit.train.validation import ValidationOptions, Validator, plan_validation

    data = dataset(tmp_path, n_train=6)
    opts = options(tmp_path, data, "--validation_split", "0.5", "--train_batch_size", "2", *extra)
    g = _group(tmp_path, data, "--validation_split", "0.5", "--train_batch_size", "2", *extra)
    bundle = tiny(family)
    torch.manual_seed(0)
    net = create_network(bundle, "networks.lora", 4, 4, {})
    net.apply_to(bundle)
    for a in net.adapters:
        torch.nn.init.normal_(a.lora_up.weight, std=0.05)
    ac = torch.cumprod(1 - torch.linspace(0.00085, 0.012, 1000), 0)
    maths = StepMaths(ac, "epsilon", S.picked(NoiseOptions, opts), S.picked(LossOptions, opts), None, None, True,
                      torch.device("cpu"), torch.float32)
    model = S.Model(bundle, "epsilon", ac, torch.float32)
    plan = plan_validation(S.picked(ValidationOptions, opts), g.validation_group(), 3)

    class Run:
        is_main = True

    class Optim:
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)

    inputs = S.Inputs(S.vae_encoder(bundle, torch.Generator().manual_seed(0), torch.float32), None)
    return Validator(plan, model, net, inputs, maths, Run(), Optim(), _Log()), bundle, net, maths


def test_validation_loss_is_the_formula(tmp_path):
    """The mean over held-out batches and the four timesteps of |eps_theta(sqrt(a) x + sqrt(1-a) n, t) - n|^2, with
    n from the generator keyed by (seed, batch, timestep) and x one fixed VAE draw per batch."""
    from lorakit.models.conditioning import encode_captions
    from lorakit.train.validation import noise_seed

    v, bundle, net, maths = _validator(tmp_path)
    got = v.loss()
    assert v.plan.batches == 2 and v.plan.seed == 3
    net.eval()
    total = []
    with torch.no_grad():
        for k in range(2):
            batch = v.plan.group.get_batch(1, k, global_step=v.plan.group.max_train_steps)
            gen = torch.Generator().manual_seed(noise_seed(3, k, 1 << 20))
            dist = bundle.vae.encode(batch["images"]).latent_dist
            x = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)) * bundle.latent_scale
            hidden, _ = encode_captions(bundle, batch["captions"], None, None)
            for j, t in enumerate([200, 400, 600, 800]):
                n = torch.randn(x.shape, generator=torch.Generator().manual_seed(noise_seed(3, k, j)))
                a = maths.alphas_cumprod[t]
                pred = bundle.unet(a.sqrt() * x + (1 - a).sqrt() * n, torch.full((x.shape[0],), t), hidden).sample
                total.append(((pred - n) ** 2).mean().item())
    assert got == pytest.approx(sum(total) / len(total), rel=1e-5)
    assert v.loss() == got  # the same weights always score the same


def test_max_validation_steps_and_refusals(tmp_path):
    v, *_ = _validator(tmp_path, "--max_validation_steps", "1")
    assert v.plan.batches == 1
    from lorakit.train.validation import ValidationOptions, plan_validation

    o = ValidationOptions(5, None, None, None, None, None)
    with pytest.raises(UserError, match="--validate_every_n_steps set but no image is held out"):
        plan_validation(o, None, 1)
    assert plan_validation(ValidationOptions(None, None, None, None, None, None), None, 1) is None


# ---- in a run ------------------------------------------------------------------------------------------------------
def test_validation_never_moves_the_training_streams(tmp_path):
    data = dataset(tmp_path, n_train=6)
    base = ["--validation_split", "0.34", "--max_train_steps", "4", "--flip_aug", "--shuffle_caption",
            "--noise_offset", "0.05", "--network_dropout", "0.1"]
    plain = run(options(tmp_path / "a", data, *base), predict_memory=False)
    events = []
    validated = run(options(tmp_path / "b", data, *base, "--validate_every_n_steps", "1",
                            "--logging_dir", str(tmp_path / "logs")), on_event=events.append, predict_memory=False)
    assert lora_hash(plain.final_lora) == lora_hash(validated.final_lora)
    vals = [e for e in events if e["event"] == "validation"]
    assert [e["step"] for e in vals] == [1, 2, 3, 4, 4] and vals[-1]["kind"] == "epoch"
    assert vals[-1]["loss"] == vals[-2]["loss"] and all(math.isfinite(e["loss"]) for e in vals)
    assert [r["step"] for r in validated.validation] == [1, 2, 3, 4, 4]
    assert len(plain.validation) == 1  # every epoch by default, when images are held out
    _, md = read_lora(validated.final_lora)
    assert md["ss_num_validation_images"] == "2" and md["ss_validation_split"] == "0.34"
    assert md["ss_validate_every_n_steps"] == "1" and md["ss_num_train_images"] == "4"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "loss/validation/step_average" in tags and "loss/validation/epoch_average" in tags
    assert [round(e.value, 6) for e in acc.Scalars("loss/validation/step_average")] == \
        [round(e["loss"], 6) for e in vals if e["kind"] == "step"]


def test_validate_options_without_a_split_are_refused_before_loading(tmp_path, monkeypatch):
    from lorakit.train import stages as S

    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(S, "prepare_model", no_load)
    with pytest.raises(UserError, match="--validate_every_n_epochs set but no image is held out"):
        run(options(tmp_path, dataset(tmp_path, n_train=2), "--validate_every_n_epochs", "1"), predict_memory=False)


def test_gui_progress_reads_validation_events(tmp_path):
    from lorakit.gui.jobs import progress_of
    from lorakit.gui.train_tab import loss_series

    class Job:
        events_path = tmp_path / "events.jsonl"

    evs = [{"event": "start", "max_steps": 4, "num_epochs": 1, "step": 0}]
    for s in range(1, 5):
        evs.append({"event": "step", "step": s, "max_steps": 4, "epoch": 1, "loss": 1.0 / s, "loss_avg": 1.0, "lr": {},
                    "time": float(s)})
        if s % 2 == 0:
            evs.append({"event": "validation", "step": s, "epoch": 1, "kind": "step", "loss": 0.5 / s,
                        "loss_ema": 0.4 / s})
    evs.append({"event": "validation", "step": 4, "epoch": 1, "kind": "epoch", "loss": 0.125, "loss_ema": 0.1})
    Job.events_path.write_text("".join(json.dumps(e) + "\n" for e in evs))
    p = progress_of(Job())
    assert p.val_steps == [2, 4] and p.val_loss == [0.25, 0.125] and p.val_loss_ema == pytest.approx([0.2, 0.1])
    series = loss_series(p)
    assert series["validation"] == ([2, 4], [0.25, 0.125]) and "validation (EMA)" in series
    from lorakit.gui.charts import line_chart

    img = np.asarray(line_chart(series, "loss"))
    assert img.shape[2] == 3
