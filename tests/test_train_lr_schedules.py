"""LR curves against formulas written here (diffusers' definitions), warmup forms, exact resume."""

import math

import pytest
import torch

from lorakit.errors import UserError
from lorakit.train import lr_schedules as S

T = 100
BASE = 1e-3


def curve(name, warmup=0, steps=T, **kw):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=BASE)
    sch = S.create_scheduler(opt, name, total_steps=steps, warmup=warmup, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    return out


def expected(name, step, W, cycles=1, power=1.0):
    if step < W and name != "constant":
        return BASE * step / max(1, W)
    p = (step - W) / max(1, T - W)
    if name == "constant" or name == "constant_with_warmup":
        return BASE
    if name == "linear":
        return BASE * max(0.0, (T - step) / max(1, T - W))
    if name == "cosine":
        return BASE * 0.5 * (1 + math.cos(math.pi * p))
    if name == "cosine_with_restarts":
        return 0.0 if p >= 1 else BASE * 0.5 * (1 + math.cos(math.pi * ((cycles * p) % 1)))
    if name == "polynomial":
        end = 1e-7
        return (BASE - end) * (1 - p) ** power + end
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                  "polynomial"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_curves(name, warmup):
    if name == "constant":
        warmup = 0
    got = curve(name, warmup)
    for step, lr in enumerate(got):
        assert lr == pytest.approx(expected(name, step, warmup), rel=1e-9, abs=1e-15), (name, step)


def test_restarts_and_power():
    got = curve("cosine_with_restarts", 0, num_cycles=4)
    for step, lr in enumerate(got):
        assert lr == pytest.approx(expected("cosine_with_restarts", step, 0, cycles=4), rel=1e-9, abs=1e-15)
    # four restarts: the lr jumps back to the base at steps 25, 50, 75
    assert got[25] == pytest.approx(BASE) and got[50] == pytest.approx(BASE) and got[24] < 0.01 * BASE
    got = curve("polynomial", 5, power=2.0)
    for step, lr in enumerate(got):
        assert lr == pytest.approx(expected("polynomial", step, 5, power=2.0), rel=1e-9)


@pytest.mark.parametrize("value,steps", [(10, 10), (0.1, 10), ("10%", 10), ("5%", 5), (0.25, 25), ("0", 0)])
def test_warmup_forms(value, steps):
    assert S.resolve_steps(value, T) == steps
    got = curve("constant_with_warmup", value)
    first_full = next(i for i, lr in enumerate(got) if lr == pytest.approx(BASE))
    assert first_full == steps


def test_groups_keep_their_ratio():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1e-4}, {"params": [b], "lr": 1e-5}], lr=1e-4)
    sch = S.create_scheduler(opt, "cosine", total_steps=50, warmup=5)
    for _ in range(20):
        opt.step()
        sch.step()
        lrs = sch.get_last_lr()
        assert lrs[0] == pytest.approx(10 * lrs[1])


def test_state_dict_resume_is_exact():
    def make():
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=BASE)
        return opt, S.create_scheduler(opt, "cosine_with_restarts", total_steps=T, warmup=0.1, num_cycles=3)

    opt, sch = make()
    for _ in range(37):
        sch.step()
    state = sch.state_dict()
    full = []
    for _ in range(20):
        sch.step()
        full.append(opt.param_groups[0]["lr"])
    opt2, sch2 = make()
    sch2.load_state_dict(state)
    resumed = []
    for _ in range(20):
        sch2.step()
        resumed.append(opt2.param_groups[0]["lr"])
    assert resumed == full
    opt3 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE)
    other = S.create_scheduler(opt3, "linear", total_steps=T)
    with pytest.raises(UserError, match="same --lr_scheduler"):
        other.load_state_dict(state)


def test_other_schedules_and_errors():
    got = curve("warmup_stable_decay", 10, decay=0.2, min_lr_ratio=0.1)
    assert got[5] == pytest.approx(BASE * 0.5) and got[50] == pytest.approx(BASE)
    assert got[79] == pytest.approx(BASE) and got[99] == pytest.approx(BASE * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 19 / 20))))
    got = curve("inverse_sqrt", 10)
    assert got[10] == pytest.approx(BASE) and got[40] == pytest.approx(BASE / math.sqrt(4))
    with pytest.raises(UserError):
        curve("cosine_restart")
    with pytest.warns(UserWarning, match="constant_with_warmup"):
        curve("constant", 10)


def test_schedule_free_and_adafactor():
    import schedulefree
    from transformers.optimization import Adafactor

    p = torch.nn.Parameter(torch.ones(4, 4))
    opt = schedulefree.AdamWScheduleFree([p], lr=1e-3)
    sch = S.create_scheduler(opt, "constant", total_steps=10, schedule_free=True)
    sch.step()
    assert sch.get_last_lr() == [pytest.approx(1e-3)]
    opt = Adafactor([p], lr=None, relative_step=True)
    sch = S.create_scheduler(opt, "adafactor", total_steps=10, adafactor_initial_lr=1e-3)
    assert sch.get_last_lr() == [pytest.approx(1e-3)]
    p.grad = torch.ones_like(p)
    opt.step()
    sch.step()
    assert sch.get_last_lr()[0] > 0


def test_custom_torch_scheduler_type():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sch = S.create_scheduler(opt, "constant", total_steps=10, scheduler_type="StepLR",
                             scheduler_args=["step_size=2", "gamma=0.5"])
    lrs = []
    for _ in range(5):
        opt.step()
        sch.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [1.0, 0.5, 0.5, 0.25, 0.25]
