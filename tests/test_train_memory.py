"""Memory prediction (lorakit.train.memory): the tracker's arithmetic, the prediction of a tiny model's step against
the memory a real training run allocates, --max_memory refusing before the model loads, --auto_fit, and
--estimate_memory."""

from __future__ import annotations

import re

import pytest
import torch

from lorakit.train import memory as M
from test_train_common import dataset, one_thread, options, run, tiny  # noqa: F401


# ---- the tracker ---------------------------------------------------------------------------------------------------
def test_live_bytes_counts_new_storages_once_and_releases_them():
    with M.LiveBytes() as lb:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        v = a.view(10, 100)  # a view: no new memory
        a.add_(1)  # in place: no new memory
        b = torch.empty(500, dtype=torch.float64)  # 4000 more
        assert lb.live == 8000 and lb.peak == 8000
        del a, v
        assert lb.live == 4000
        c = torch.empty(250, dtype=torch.bfloat16)  # 500
        assert lb.live == 4500 and lb.peak == 8000
        del b, c
    assert lb.live == 0


def test_parse_size():
    assert M.parse_size("8GB") == 8 * 2**30 == M.parse_size("8 GiB") == M.parse_size("8g")
    assert M.parse_size("7.5GiB") == int(7.5 * 2**30)
    assert M.parse_size("8000MB") == 8000 * 2**20
    for bad in ("", "lots", "-1GB", "nanGB"):
        with pytest.raises(ValueError):
            M.parse_size(bad)


def test_optimizer_state_is_measured_per_shape():
    params = [torch.zeros(16, 8), torch.zeros(16, 8), torch.zeros(4)]
    adamw = M.optimizer_state_bytes(params, lambda g: torch.optim.AdamW(g, lr=1e-3))
    assert adamw == 2 * (2 * 16 * 8 + 4) * 4  # exp_avg and exp_avg_sq per parameter, float32
    sgd = M.optimizer_state_bytes(params, lambda g: torch.optim.SGD(g, lr=1e-3))
    assert sgd == 0


# ---- prediction against a real run ----------------------------------------------------------------------------------
CASES = {
    "lora": [],
    "checkpointing_dora": ["--gradient_checkpointing", "--network_args", "dora_wd=True"],
    "cached": ["--cache_latents", "--cache_text_encoder_outputs", "--network_train_unet_only"],
    "bf16": ["--mixed_precision", "bf16"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_prediction_within_15_percent_of_a_real_step(tmp_path, case):
    """The real run allocates under a tracking dispatch mode over real tensors, through the real trainer (data,
    caches, optimizer, loop); the prediction traced one fake step of its own. Weights exist before both, so the
    comparison is of everything the run adds: network, gradients, optimizer state, activations, caches."""
    data = dataset(tmp_path, n_train=4, sizes=((128, 128),))
    args = ["--resolution", "128", "--train_batch_size", "2", "--max_train_steps", "2", *CASES[case]]
    bundle = tiny("sd1")
    if case == "bf16":  # a checkpoint loads straight in the training dtype: so does the bundle here
        bundle = bundle.to(dtype=torch.bfloat16)
    predicted = run(options(tmp_path, data, *args, "--estimate_memory"), bundle=bundle,
                    predict_memory=True).memory
    want = predicted.trainable + predicted.gradients + predicted.optimizer + predicted.activations + predicted.caches
    with M.LiveBytes() as lb:
        result = run(options(tmp_path, data, *args), bundle=bundle)
    assert result.global_step == 2
    assert abs(want - lb.peak) <= 0.15 * lb.peak, (case, want, lb.peak)


# ---- acting on the prediction ---------------------------------------------------------------------------------------
def _cli(tmp_path, capsys, *extra):
    from lorakit.cli.main import main
    from lorakit.models.tiny import tiny_bundle
    from lorakit.models.saving import save_single_file

    model = tmp_path / "tiny.safetensors"
    if not model.exists():
        save_single_file(tiny_bundle("sd1", seed=0), model)
    data = dataset(tmp_path, n_train=2, sizes=((128, 128),))
    argv = ["train", "--pretrained_model_name_or_path", str(model), "--train_data_dir", data["train_data_dir"],
            "--output_dir", str(tmp_path / "out"), "--resolution", "128", "--train_batch_size", "2",
            "--max_train_steps", "1", "--network_dim", "4", "--no_progress", *extra]
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_estimate_memory_prints_the_table_and_loads_nothing(tmp_path, capsys, monkeypatch):
    from lorakit.train import stages

    monkeypatch.setattr(stages, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, out = _cli(tmp_path, capsys, "--estimate_memory")
    assert code == 0
    assert "activations (forward + backward peak)" in out and "predicted peak on cpu" in out
    assert "--gradient_checkpointing" in out and not (tmp_path / "out" / "last.safetensors").exists()


def test_max_memory_too_small_refuses_before_loading_with_the_fixes(tmp_path, capsys, monkeypatch):
    from lorakit.train import stages

    monkeypatch.setattr(stages, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    # the options already in use leave three changes to predict: checkpointing, cached text, a smaller batch
    code, out = _cli(tmp_path, capsys, "--max_memory", "100MB", "--cache_latents", "--mixed_precision", "bf16",
                     "--fp8_base")
    assert code != 0 and "Traceback" not in out
    assert "--max_memory" in out and "stopped before loading the model" in out
    assert re.search(r"--gradient_checkpointing -> [0-9.]+ GiB", out)
    assert re.search(r"--train_batch_size 1 --gradient_accumulation_steps 2 \(same effective batch\) -> [0-9.]+", out)


def test_auto_fit_applies_the_smallest_set_that_fits(tmp_path, capsys):
    """A budget between the prediction with and without gradient checkpointing: the run must add it and train."""
    from lorakit.train import stages as S
    from lorakit import options as O

    data = dataset(tmp_path, n_train=2, sizes=((256, 256),))
    base = ["--resolution", "256", "--train_batch_size", "4", "--max_train_steps", "1"]
    opts = O.normalize(options(tmp_path, data, *base))
    run_ = S.set_up_run(S.picked(S.RunOptions, opts), lambda *a: None, False)
    b = tiny("sd1")
    d = S.load_data(S.dataset_configs(opts, b.family, run_.log), S.picked(S.DataOptions, opts), run_)
    shape = M.step_shape(d)
    plain = M.estimate(opts, run_, b.family, b.configs, shape)
    import dataclasses

    with_gc = M.estimate(dataclasses.replace(opts, gradient_checkpointing=True), run_, b.family, b.configs, shape)
    assert with_gc.activations < 0.8 * plain.activations
    budget = (plain.peak + with_gc.peak) // 2
    logs = []
    result = run(options(tmp_path, data, *base, "--max_memory", str(budget), "--auto_fit"), bundle=b,
                 predict_memory=True, log=logs.append)
    assert result.global_step == 1
    assert any(line.startswith("--auto_fit: --gradient_checkpointing") for line in logs), logs
    assert result.memory.peak <= budget


def test_gui_shows_the_prediction_beside_start(tmp_path):
    from lorakit.gui.files import Roots
    from lorakit.gui.forms import form_fields
    from lorakit.gui.train_tab import memory_markdown
    from lorakit.models.saving import save_single_file
    from lorakit.models.tiny import tiny_bundle

    model = tmp_path / "tiny.safetensors"
    save_single_file(tiny_bundle("sd1", seed=0), model)
    data = dataset(tmp_path, n_train=2, sizes=((64, 64),))
    values = {f.name: None for f in form_fields()}
    roots = Roots([tmp_path])
    assert "fill the model" in memory_markdown(values, roots)
    values.update(pretrained_model_name_or_path=str(model), train_data_dir=data["train_data_dir"],
                  output_dir=str(tmp_path / "out"), resolution="64")
    text = memory_markdown(values, roots)
    assert re.search(r"Predicted peak memory:\*\* [0-9.]+ GiB on cpu \(weights", text), text
    values["max_memory"] = "10MB"
    assert "over the budget of 0.01 GiB" in memory_markdown(values, roots)


# ---- half precision on a CPU without the instructions for it --------------------------------------------------------
def test_cpu_half_probe_agrees_with_a_measurement():
    from lorakit.utils import cpu

    if cpu.native_half(torch.bfloat16):
        assert cpu.slow_half_warning(torch.device("cpu"), torch.bfloat16) is None
    else:  # oneDNN says no bf16 here: the reference path must measure slower (about 70x on an AVX2 EPYC)
        assert cpu.half_slowdown(torch.bfloat16) > 3
        assert "--mixed_precision bf16" in cpu.slow_half_warning(torch.device("cpu"), torch.bfloat16)
    assert cpu.native_half(torch.float32) and cpu.half_ok(torch.device("cuda"), torch.bfloat16)


def test_bf16_on_a_cpu_without_it_warns_before_loading_and_auto_fit_avoids_it(tmp_path, capsys, monkeypatch):
    from lorakit import options as O
    from lorakit.errors import UserError
    from lorakit.train import stages
    from lorakit.utils import cpu

    def stop(*a, **k):  # the warning must come before the dataset scan, let alone the model
        raise UserError("stopped here by the test")

    monkeypatch.setattr(stages, "load_data", stop)
    monkeypatch.setattr(cpu, "native_half", lambda dtype: dtype == torch.float32)
    code, out = _cli(tmp_path, capsys, "--mixed_precision", "bf16")
    assert code != 0 and "stopped here by the test" in out and "Traceback" not in out
    assert re.search(r"warning: --mixed_precision bf16 on this CPU .* [0-9]+x slower than fp32", out)
    code, out = _cli(tmp_path, capsys)  # fp32: nothing to warn of
    assert "stopped here by the test" in out and "warning: --mixed_precision" not in out

    opts = O.normalize(options(tmp_path, dataset(tmp_path, n_train=1, sizes=((64, 64),))))
    flags = [f.flags for f in M.candidate_fixes(opts, [], None, half_fast=False)]
    assert "--gradient_checkpointing" in flags and not any("bf16" in f or "fp8" in f for f in flags), flags
    flags = [f.flags for f in M.candidate_fixes(opts, [], None, half_fast=True)]  # a CPU with bf16, or a GPU
    assert "--mixed_precision bf16" in flags and any(f.startswith("--fp8_base") for f in flags), flags
    # and the run's own check asks the device: on this "CPU without bf16" the table offers neither
    monkeypatch.undo()
    monkeypatch.setattr(cpu, "native_half", lambda dtype: dtype == torch.float32)
    code, out = _cli(tmp_path, capsys, "--estimate_memory")
    assert code == 0 and "--gradient_checkpointing" in out
    assert "--mixed_precision bf16" not in out and "--fp8_base" not in out


# ---- the traced step kept between runs (train.memory_cache) -------------------------------------------------------
def _estimate_inputs(tmp_path):
    from lorakit import options as O
    from lorakit.train import stages as S

    data = dataset(tmp_path, n_train=2, sizes=((128, 128),))
    opts = O.normalize(options(tmp_path, data, "--resolution", "128", "--train_batch_size", "2"))
    run_ = S.set_up_run(S.picked(S.RunOptions, opts), lambda *a: None, False)
    b = tiny("sd1")
    d = S.load_data(S.dataset_configs(opts, b.family, run_.log), S.picked(S.DataOptions, opts), run_)
    return opts, run_, b, M.step_shape(d)


def _count_traces(monkeypatch) -> list:
    calls, real = [], M.trace_step
    monkeypatch.setattr(M, "trace_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_the_same_settings_reuse_the_traced_step(tmp_path, monkeypatch):
    import dataclasses

    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path / "cache"))
    opts, run_, b, shape = _estimate_inputs(tmp_path)
    calls = _count_traces(monkeypatch)
    first = M.estimate(opts, run_, b.family, b.configs, shape)
    assert calls == [1] and list((tmp_path / "cache" / "memory").glob("*.json"))
    # another output folder, seed, step count and learning-rate schedule: nothing a step's memory depends on
    other = dataclasses.replace(opts, output_dir=str(tmp_path / "elsewhere"), output_name="x", seed=7,
                                max_train_steps=99, save_every_n_steps=5, lr_scheduler="cosine")
    assert M.estimate(other, run_, b.family, b.configs, shape) == first
    assert calls == [1]


def test_a_change_the_step_depends_on_traces_again(tmp_path, monkeypatch):
    import dataclasses

    from lorakit.train import memory_cache

    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path / "cache"))
    opts, run_, b, shape = _estimate_inputs(tmp_path)
    calls = _count_traces(monkeypatch)
    first = M.estimate(opts, run_, b.family, b.configs, shape)
    bigger = M.estimate(dataclasses.replace(opts, network_dim=2 * opts.network_dim), run_, b.family, b.configs, shape)
    assert bigger.trainable == 2 * first.trainable
    gc = M.estimate(dataclasses.replace(opts, gradient_checkpointing=True), run_, b.family, b.configs, shape)
    assert gc.activations < first.activations
    tall = M.estimate(opts, run_, b.family, b.configs, dataclasses.replace(shape, height=2 * shape.height))
    assert tall.activations > first.activations
    assert len(calls) == 4
    monkeypatch.setattr(memory_cache, "code_fingerprint", lambda: "edited code")  # lorakit or a library changed
    assert M.estimate(opts, run_, b.family, b.configs, shape) == first
    assert len(calls) == 5


def test_a_broken_or_unwritable_cache_costs_only_a_trace(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path / "cache"))
    opts, run_, b, shape = _estimate_inputs(tmp_path)
    first = M.estimate(opts, run_, b.family, b.configs, shape)
    (kept,) = (tmp_path / "cache" / "memory").glob("*.json")
    kept.write_text("{not json")
    calls = _count_traces(monkeypatch)
    assert M.estimate(opts, run_, b.family, b.configs, shape) == first and calls == [1]
    assert kept.read_text().startswith("{\"key\"")  # traced again and kept again
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(blocker))  # the cache cannot be created: predicted all the same
    assert M.estimate(opts, run_, b.family, b.configs, shape) == first and calls == [1, 1]


def test_the_unkeyed_options_exist():
    """A renamed option left in the list would be keyed again silently (only costing traces): names must exist."""
    from lorakit import options as O
    from lorakit.train import memory_cache

    assert memory_cache._UNKEYED <= set(O.OPTIONS_BY_NAME)
    assert memory_cache._UNKEYED_GROUPS <= {o.group for o in O.OPTIONS}
