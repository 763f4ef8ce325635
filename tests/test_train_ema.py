"""EMA of the trained weights (--ema_decay, --ema_warmup, --ema_update_every, --ema_save_as, --ema_samples):
the average against its formula, the files, exact resume, previews and the GUI form."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import UserError
from test_train_common import dataset, one_thread, options, read_lora, run  # noqa: F401


def test_decay_schedule():
    from lorakit.train.ema import ema_decay_at

    assert ema_decay_at(0.999, 1, False) == 0.999
    assert [ema_decay_at(0.9, n, True) for n in (1, 2, 10, 80, 100)] == \
        pytest.approx([2 / 11, 3 / 12, 11 / 20, 0.9, 0.9])


def test_ema_against_the_recurrence():
    from lorakit.train.ema import Ema

    m = torch.nn.Linear(3, 2)
    frozen = torch.nn.Linear(1, 1).requires_grad_(False)
    m.add_module("frozen", frozen)
    ema = Ema(m, 0.8, warmup=True, update_every=2)
    assert set(ema.shadow) == {"weight", "bias"}  # trainable parameters only
    want = {k: v.detach().clone().double() for k, v in m.named_parameters() if v.requires_grad}
    n = 0
    for step in range(1, 8):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        ema.after_step(step)
        if step % 2 == 0:
            n += 1
            d = min(0.8, (1 + n) / (10 + n))
            for k, p in m.named_parameters():
                if k in want:
                    want[k] = d * want[k] + (1 - d) * p.detach().double()
    assert ema.updates == 3
    for k in want:
        assert torch.allclose(ema.shadow[k].double(), want[k], atol=1e-6)
    before = {k: p.detach().clone() for k, p in m.named_parameters()}
    with ema.swapped():
        assert torch.equal(m.weight, ema.shadow["weight"])
    assert all(torch.equal(p, before[k]) for k, p in m.named_parameters())  # bit-exact restore


def _snapshots(monkeypatch):
    """Record the network's weights at every EMA call (the weights the EMA must average)."""
    from lorakit.train import ema as E

    seen = []
    orig = E.Ema.after_step

    def spy(self, step):
        seen.append((step, {k: p.detach().clone().double() for k, p in self.params.items()},
                     {k: v.clone().double() for k, v in self.shadow.items()} if not seen else None))
        orig(self, step)

    monkeypatch.setattr(E.Ema, "after_step", spy)
    return seen


def test_saved_ema_file_is_the_average_of_the_run(tmp_path, monkeypatch):
    seen = _snapshots(monkeypatch)
    data = dataset(tmp_path, n_train=2)
    result = run(options(tmp_path, data, "--max_train_steps", "5", "--ema_decay", "0.7", "--ema_update_every", "2",
                         "--save_precision", "float", "--learning_rate", "1e-2"), predict_memory=False)
    assert result.saved_ema == [tmp_path / "out" / "last-ema.safetensors"]
    raw, _ = read_lora(result.final_lora)
    ema_t, md = read_lora(result.saved_ema[0])
    assert md["ss_output_name"] == "last-ema" and '"updates": 2' in md["lorakit.ema"]
    # by hand: start from the first weights the EMA saw (the initial ones), average every 2nd step
    avg = dict(seen[0][2])
    for step, weights, _ in seen:
        if step % 2 == 0:
            for k in avg:
                avg[k] = 0.7 * avg[k] + 0.3 * weights[k]
    assert set(avg) == {k for k in ema_t if not k.endswith(".alpha")}  # the file's keys are the parameters'
    for k, v in avg.items():
        assert torch.allclose(ema_t[k].double(), v, atol=1e-6), k
    assert any(not torch.equal(ema_t[k], raw[k]) for k in raw if "lora_up" in k)


def test_ema_resume_is_exact_and_ema_as_lora(tmp_path):
    data = dataset(tmp_path, n_train=3)
    args = ["--max_train_steps", "6", "--ema_decay", "0.8", "--ema_warmup", "--save_precision", "float"]
    full = run(options(tmp_path / "a", data, *args), predict_memory=False)
    stopped = run(options(tmp_path / "b", data, *args), stop_after_step=3, predict_memory=False)
    resumed = run(options(tmp_path / "b", data, *args, "--resume", str(stopped.states[-1])), predict_memory=False)
    a, _ = read_lora(full.saved_ema[-1])
    b, _ = read_lora(resumed.saved_ema[-1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # --ema_save_as lora: the LoRA file holds the EMA weights (the raw ones stay in the state)
    as_lora = run(options(tmp_path / "c", data, *args, "--ema_save_as", "lora", "--save_state"), predict_memory=False)
    c, md = read_lora(as_lora.final_lora)
    assert as_lora.saved_ema == [] and "lorakit.ema" in md
    assert all(torch.equal(a[k], c[k]) for k in a)
    from lorakit.train.state import load_state

    st = load_state(tmp_path / "c" / "out" / "last-state")
    assert st.extra["ema"]["updates"] == 6


def test_previews_use_ema_weights(tmp_path, monkeypatch):
    from lorakit.train import previews as P

    prompts = tmp_path / "p.txt"
    prompts.write_text("zq shape --w 64 --h 64 --s 2\n", encoding="utf-8")
    seen = []

    def fake_render(bundle, prompts, out_dir, name, **kw):
        seen.append({n: p.detach().clone() for n, p in net_ref[0].named_parameters()})
        return []

    net_ref = []
    from lorakit.train import trainer as T

    orig = T.make_ema

    def keep(o, network, run_):
        net_ref.append(network)
        return orig(o, network, run_)

    monkeypatch.setattr(T, "make_ema", keep)
    monkeypatch.setattr(P, "render_samples", fake_render)
    data = dataset(tmp_path, n_train=2)
    result = run(options(tmp_path, data, "--max_train_steps", "2", "--ema_decay", "0.5", "--ema_samples",
                         "--sample_prompts", str(prompts), "--sample_every_n_steps", "2", "--save_precision", "float"),
                 predict_memory=False)
    ema_t, _ = read_lora(result.saved_ema[0])
    raw, _ = read_lora(result.final_lora)
    up = next(k for k in raw if "lora_up" in k)
    assert torch.equal(seen[0][up], ema_t[up]) and not torch.equal(seen[0][up], raw[up])


def test_ema_options_without_decay_are_refused(tmp_path):
    with pytest.raises(UserError, match="--ema_samples set without --ema_decay"):
        run(options(tmp_path, dataset(tmp_path), "--ema_samples"), predict_memory=False)


def test_gui_form_shows_ema_and_validation_fields():
    from lorakit.gui.forms import form_fields

    fields = {f.name: f for f in form_fields()}
    assert fields["ema_decay"].kind == "text" and fields["ema_decay"].group == "ema"
    assert fields["ema_warmup"].kind == "checkbox" and fields["ema_samples"].kind == "checkbox"
    assert fields["ema_save_as"].kind == "dropdown" and set(fields["ema_save_as"].choices) == {"beside", "lora"}
    for name in ("validation_split", "validation_seed", "validate_every_n_steps", "validate_every_n_epochs",
                 "max_validation_steps"):
        assert fields[name].group == "validation"
    assert fields["masked_loss"].kind == "checkbox" and "conditioning_data_dir" in fields


def test_gui_form_values_become_the_options():
    """The GUI's fields for the new features reach the run's options (and its command line) through the schema."""
    from lorakit.gui.forms import command_line, default_values, form_to_given

    values = dict(default_values(), ema_decay="0.99", ema_warmup=True, ema_save_as="lora", ema_samples=True,
                  validation_split="0.2", validate_every_n_steps="20", masked_loss=True, alpha_mask=True,
                  v_parameterization=True, zero_terminal_snr=True)
    given, errors = form_to_given(values)
    assert not errors
    from lorakit import options as O

    opts = O.normalize(O.resolve_given(given))
    assert (opts.ema_decay, opts.ema_warmup, opts.ema_save_as, opts.ema_samples) == (0.99, True, "lora", True)
    assert (opts.validation_split, opts.validate_every_n_steps, opts.masked_loss) == (0.2, 20, True)
    assert "--ema_decay 0.99" in command_line(given) and "--validation_split 0.2" in command_line(given)
