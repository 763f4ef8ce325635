"""Every optimizer name runs a few steps on a tiny problem; args parsing; param groups; effective lr."""

import warnings

import pytest
import torch

from lorakit.errors import UserError
from lorakit.train import optimizers as OPT

BNB_CPU = None


def bnb_cpu():
    global BNB_CPU
    if BNB_CPU is None:
        BNB_CPU = OPT.bnb_available_on("cpu")
    return BNB_CPU


def tiny_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    # a 64x64 weight: big enough (4096 elements) that bitsandbytes really quantizes its state
    w = torch.nn.Parameter(torch.randn(64, 64, generator=g) * 0.1)
    b = torch.nn.Parameter(torch.zeros(64))
    x = torch.randn(32, 64, generator=g)
    y = x @ torch.randn(64, 64, generator=g) * 0.1
    return [w, b], lambda: ((x @ w + b - y) ** 2).mean()


CASES = [
    ("AdamW", 1e-2, None), ("adamw", 1e-2, ["weight_decay=0.01", "betas=0.9,0.99"]), ("Lion", 1e-3, None),
    ("SGDNesterov", 1e-1, None), ("DAdaptation", 1.0, None), ("DAdaptAdam", 1.0, ["decouple=True"]),
    ("DAdaptLion", 1.0, ["betas=0.9,0.999", "weight_decay=0", "d0=1e-06"]), ("DAdaptAdan", 1.0, None),
    ("DAdaptAdanIP", 1.0, None), ("DAdaptSGD", 1.0, None), ("DAdaptAdaGrad", 1.0, None),
    ("Prodigy", 1.0, ["betas=0.9,0.999", "weight_decay=0", "d0=1e-06"]), ("AdaFactor", 1e-3, None),
    ("AdaFactor", 1e-2, ["relative_step=False", "scale_parameter=False", "warmup_init=False"]),
    ("RAdamScheduleFree", 1e-2, None), ("AdamWScheduleFree", 1e-2, None), ("SGDScheduleFree", 1e-1, None),
    ("torch.optim.RMSprop", 1e-2, None), ("Adagrad", 1e-1, None),
    ("AdamW8bit", 1e-2, None), ("PagedAdamW8bit", 1e-2, None), ("Lion8bit", 1e-3, None),
    ("PagedLion8bit", 1e-3, None), ("SGDNesterov8bit", 1e-1, None),
]


@pytest.mark.parametrize("name,lr,args", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_optimizer_runs_and_learns(name, lr, args):
    if ("8bit" in name.lower() or name.lower().startswith("paged")) and not bnb_cpu():
        pytest.skip("bitsandbytes 8-bit optimizers need a CUDA GPU with this bitsandbytes build")
    params, loss_fn = tiny_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = OPT.create_optimizer(name, params, lr, args)
        start = loss_fn().item()
        seen = []
        for _ in range(30):
            info.optimizer.zero_grad()
            loss = loss_fn()
            seen.append(loss.item())
            loss.backward()
            info.optimizer.step()
        OPT.set_train_mode(info.optimizer, False)  # schedule-free: evaluate at the averaged weights
        seen.append(loss_fn().item())
    assert all(torch.isfinite(p).all() for p in params)
    # adaptive step sizes may overshoot in 30 steps; each must go below the start at some point
    assert min(seen) < start, (name, start, seen)
    lrs = OPT.effective_lrs(info.optimizer)
    assert len(lrs) == 1 and all(v >= 0 for v in lrs)
    assert info.metadata_string.startswith(info.class_path)


def test_canonical_names_and_metadata_string():
    params, _ = tiny_problem()
    info = OPT.create_optimizer("adamw8bit" if bnb_cpu() else "ADAMW", params, 1e-3, ["weight_decay=0.1"])
    assert info.name in ("AdamW8bit", "AdamW")
    assert info.metadata_string.endswith("(weight_decay=0.1)")
    sgd = OPT.create_optimizer("sgdnesterov", tiny_problem()[0], 0.1)
    assert sgd.optimizer.defaults["nesterov"] and sgd.optimizer.defaults["momentum"] == 0.9
    assert sgd.metadata_string == "torch.optim.sgd.SGD(momentum=0.9)"


def test_parse_optimizer_args_literals():
    got = OPT.parse_optimizer_args(["betas=0.9,0.999", "weight_decay=0", "d0=1e-06", "decouple=True",
                                    "name='x'", "eps=None"])
    assert got == {"betas": (0.9, 0.999), "weight_decay": 0, "d0": 1e-6, "decouple": True, "name": "x", "eps": None}
    with pytest.raises(UserError, match="key=value"):
        OPT.parse_optimizer_args(["betas"])


def test_unknown_optimizer_suggests():
    with pytest.raises(UserError, match="DAdaptLion"):
        OPT.create_optimizer("DAdaptLoin", tiny_problem()[0], 1.0)
    with pytest.raises(UserError, match="no 'Nope'"):
        OPT.create_optimizer("torch.optim.Nope", tiny_problem()[0], 1.0)
    with pytest.raises(UserError, match="optimizer_args"):
        OPT.create_optimizer("AdamW", tiny_problem()[0], 1e-3, ["nonsense_arg=1"])


def _named(n, prefix):
    return [(f"{prefix}.{i}.lora_down.weight", torch.nn.Parameter(torch.zeros(2))) for i in range(n)] + \
           [(f"{prefix}.{i}.lora_up.weight", torch.nn.Parameter(torch.zeros(2))) for i in range(n)]


def test_param_groups_component_block_and_loraplus():
    unet = OPT.ParamSet("unet", _named(2, "lora_unet_down") + _named(1, "lora_unet_up"))
    te1 = OPT.ParamSet("text_encoder1", _named(1, "lora_te1"), lr=1e-5)
    te2 = OPT.ParamSet("text_encoder2", _named(1, "lora_te2"), lr=0.0)  # lr 0: not trained
    weight = lambda comp, name: 0.5 if "unet_up" in name else 1.0
    groups = OPT.make_param_groups([unet, te1, te2], 1e-4, block_lr_weight=weight, loraplus_ratio=16)
    by_name = {g["name"]: g for g in groups}
    assert by_name["unet"]["lr"] == pytest.approx(1e-4) and len(by_name["unet"]["params"]) == 2
    assert by_name["unet_plus"]["lr"] == pytest.approx(16e-4)
    assert by_name["unet_block0.5"]["lr"] == pytest.approx(0.5e-4)
    assert by_name["unet_block0.5_plus"]["lr"] == pytest.approx(8e-4)
    assert by_name["text_encoder1"]["lr"] == pytest.approx(1e-5)
    assert by_name["text_encoder1_plus"]["lr"] == pytest.approx(16e-5)
    assert not any(n.startswith("text_encoder2") for n in by_name)
    assert all(not p.requires_grad for _, p in te2.named_params)
    opt = OPT.create_optimizer("AdamW", groups, 1e-4)
    assert sorted(OPT.effective_lrs(opt.optimizer)) == sorted(g["lr"] for g in groups)


def test_single_lr_optimizers_refuse_mixed_group_lrs():
    unet = OPT.ParamSet("unet", _named(1, "u"))
    te = OPT.ParamSet("text_encoder", _named(1, "t"), lr=0.5)
    groups = OPT.make_param_groups([unet, te], 1.0)
    for name in ("DAdaptAdam", "DAdaptLion", "Prodigy", "DAdaptSGD", "DAdaptation"):
        with pytest.raises(UserError, match="different learning rates"):
            OPT.create_optimizer(name, OPT.make_param_groups([unet, te], 1.0), 1.0)
    OPT.create_optimizer("DAdaptAdan", groups, 1.0)  # accepts them


def test_effective_lr_is_d_times_lr():
    params, loss_fn = tiny_problem()
    info = OPT.create_optimizer("Prodigy", params, 1.0, ["d0=1e-6"])
    assert OPT.effective_lrs(info.optimizer) == [pytest.approx(1e-6)]
    for _ in range(5):
        info.optimizer.zero_grad()
        loss_fn().backward()
        info.optimizer.step()
    g = info.optimizer.param_groups[0]
    assert OPT.effective_lrs(info.optimizer)[0] == pytest.approx(g["d"] * g["lr"])
    assert g["d"] > 1e-6  # d grew from d0


def test_optimizer_state_round_trip_is_exact():
    p1, f1 = tiny_problem()
    p2, f2 = tiny_problem()
    o1 = OPT.create_optimizer("DAdaptAdam", p1, 1.0).optimizer
    o2 = OPT.create_optimizer("DAdaptAdam", p2, 1.0).optimizer
    for _ in range(3):
        o1.zero_grad(); f1().backward(); o1.step()
        o2.zero_grad(); f2().backward(); o2.step()
    sd = o1.state_dict()
    p3 = [torch.nn.Parameter(p.detach().clone()) for p in p1]
    o3 = OPT.create_optimizer("DAdaptAdam", p3, 1.0).optimizer
    o3.load_state_dict(sd)
    x = tiny_problem()[1]
    for _ in range(3):
        for o, ps in ((o2, p2), (o3, p3)):
            o.zero_grad()
            loss = sum(((pp - 1) ** 2).sum() for pp in ps)
            loss.backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(p2, p3))


def test_fused_adamw_is_the_default_and_follows_the_adamw_formula():
    """AdamW runs torch's fused kernel by default where torch has one for the parameters' device (one pass over
    weight, gradient and moments instead of the for-each form's ~10: SD1.5's 7M LoRA parameters 15 -> 3 ms a step on
    a CPU); its steps are AdamW's maths (decoupled decay, bias-corrected moments), written out here.
    `--optimizer_args foreach=True` (or fused=False) keeps the for-each kernels sd-scripts' runs use, and the file's
    ss_optimizer records only what the user chose, as sd-scripts does."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    info = OPT.create_optimizer("AdamW", [w], 1e-2, ["weight_decay=0.1", "betas=0.9,0.99", "eps=1e-8", "fused=True"])
    assert info.optimizer.param_groups[0]["fused"] is True
    ref, m, v = w.detach().clone().double(), torch.zeros(5, 3, dtype=torch.float64), torch.zeros(5, 3,
                                                                                             dtype=torch.float64)
    for t in range(1, 4):
        g = torch.randn(5, 3)
        w.grad = g.clone()
        info.optimizer.step()
        g = g.double()
        ref *= 1 - 1e-2 * 0.1
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        ref -= 1e-2 * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.99 ** t)).sqrt() + 1e-8)
    assert torch.allclose(w.detach().double(), ref, rtol=0, atol=1e-6)
    plain = OPT.create_optimizer("AdamW", [torch.nn.Parameter(torch.zeros(2))], 1e-3)
    assert plain.optimizer.param_groups[0]["fused"] is True and plain.metadata_string == "torch.optim.adamw.AdamW"
    for args in (["foreach=True"], ["fused=False"]):
        chosen = OPT.create_optimizer("AdamW", [torch.nn.Parameter(torch.zeros(2))], 1e-3, args)
        assert not chosen.optimizer.param_groups[0]["fused"], args
    meta = OPT.create_optimizer("AdamW", [torch.nn.Parameter(torch.zeros(2, device="meta"))], 1e-3)
    assert not meta.optimizer.param_groups[0]["fused"]  # no fused kernel for that device: torch's default


@pytest.mark.parametrize("scale", [1e-3, 9.8e-3, 1.0, float("inf"), float("nan")])
def test_clip_grad_norm_gives_torchs_gradients_bit_for_bit(scale):
    """Below, at and above the limit, and with an inf or NaN gradient: the same gradients as torch's clip_grad_norm_;
    below the limit the gradients are not even written (the multiply by 1.0 skipped)."""
    g = torch.Generator().manual_seed(3)
    shapes = [(16, 320), (320, 16), (7,)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, ref):
        grad = torch.randn(a.shape, generator=g) * (scale if scale == scale and scale != float("inf") else 1.0)
        a.grad, b.grad = grad.clone(), grad.clone()
    if scale != scale or scale == float("inf"):
        ours[1].grad[3, 0] = ref[1].grad[3, 0] = scale
    versions = [p.grad._version for p in ours]
    before = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b.grad) for b in ref])))
    OPT.clip_grad_norm(ours, 1.0)
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    for a, b in zip(ours, ref):
        assert torch.equal(a.grad.nan_to_num(7.0), b.grad.nan_to_num(7.0))
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b.grad) for b in ref]))
    written = [p.grad._version != v for p, v in zip(ours, versions)]
    assert all(written) == (not before < 1.0) and any(written) == all(written)
    if scale == 1.0:
        assert before > 50 and abs(float(total) - 1.0) < 1e-4  # clipped to the limit
    OPT.clip_grad_norm([torch.nn.Parameter(torch.ones(2))], 1.0)  # no gradient at all: nothing to do
