"""Saving never loses work: a full disk or an unwritable folder is a UserError naming the folder (and the space
needed), the previous file stays valid, temporary files are removed on every exit path (Ctrl-C included), and saved
files get the usual permissions. Also the NaN/inf refusal of LoRA files and models, and resume-state errors."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from lorakit.errors import UserError
from lorakit.utils import atomic

sys.path.insert(0, str(Path(__file__).parent))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def valid_old(path: Path) -> bool:
    from safetensors.torch import load_file

    return torch.equal(load_file(str(path))["w"], torch.ones(4))


@pytest.fixture
def old_file(tmp_path):
    path = tmp_path / "out" / "lora.safetensors"
    atomic.save_safetensors_atomic({"w": torch.ones(4)}, path)
    return path


def _failing_save_file(exc):
    """A safetensors writer that writes half a file, then fails like a full disk would."""
    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise exc

    return save_file


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, "No space left on device"),
    # how safetensors (Rust io::Error) and torch.save (C++ stream) word it, without an errno
    RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
                 'device" })'),
])
def test_disk_full_names_the_folder_and_keeps_the_old_file(old_file, monkeypatch, exc):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file(exc))
    with pytest.raises(UserError) as info:
        atomic.save_safetensors_atomic({"w": torch.zeros(1000)}, old_file)
    msg = str(info.value)
    assert f"the disk holding {old_file.parent} is full" in msg
    assert "about 4.2 KB are needed" in msg  # 1000 float32 values plus the header
    assert "unchanged" in msg and "Traceback" not in msg
    assert valid_old(old_file) and leftovers(old_file.parent) == []


def test_write_failure_without_errno_counts_as_full_when_space_is_short(old_file, monkeypatch):
    import safetensors.torch

    # torch.save's C++ message says nothing about space: the free space decides
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file(
        RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: "
                     "file write failed")))
    monkeypatch.setattr(atomic, "free_bytes", lambda folder: 10)
    with pytest.raises(UserError, match=r"is full: saving lora.safetensors failed \(about .* needed, 10 bytes are "):
        atomic.save_safetensors_atomic({"w": torch.zeros(10)}, old_file)
    monkeypatch.setattr(atomic, "free_bytes", lambda folder: 10**12)
    with pytest.raises(UserError, match=r"could not write lora.safetensors into .*out \(\[enforce fail"):
        atomic.save_safetensors_atomic({"w": torch.zeros(10)}, old_file)
    assert valid_old(old_file) and leftovers(old_file.parent) == []


def test_permission_denied_and_read_only(old_file, monkeypatch):
    import tempfile

    for code, why in ((errno.EACCES, "permission denied"), (errno.EROFS, "it is read-only")):
        def mkstemp(*a, _code=code, **k):
            raise OSError(_code, os.strerror(_code))

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        with pytest.raises(UserError, match=rf"cannot write lora.safetensors into .*out \({why}\)"):
            atomic.save_safetensors_atomic({"w": torch.zeros(2)}, old_file)
    monkeypatch.undo()
    assert valid_old(old_file)


def test_ctrl_c_and_errors_remove_the_temporary_file(old_file):
    for exc in (KeyboardInterrupt(), ValueError("a bug")):
        with pytest.raises(type(exc)):
            with atomic.atomic_path(old_file) as tmp:
                tmp.write_bytes(b"partial")
                raise exc
        assert valid_old(old_file) and leftovers(old_file.parent) == []


def test_parent_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(UserError, match=r"taken is a file"):
        atomic.write_text_atomic(tmp_path / "taken" / "sub" / "a.txt", "hello")


def test_saved_files_get_the_usual_permissions(tmp_path):
    from lorakit.adapters.file import save_lora
    from lorakit.train.state import TrainState, capture_rng, save_state

    old = os.umask(0o022)
    try:
        want_file, want_dir = 0o666 & ~atomic._UMASK, 0o777 & ~atomic._UMASK
        save_lora(tmp_path / "l.safetensors", {"lora_unet_x.lora_down.weight": torch.zeros(2, 3)}, {})
        atomic.write_text_atomic(tmp_path / "t.txt", "x")
        st = TrainState(network={"a": torch.zeros(2)}, optimizer={"state": {}, "param_groups": []}, scheduler={},
                        scaler=None, rng=capture_rng(), generators={},
                        counters={"epoch": 1, "batch": 0, "global_step": 0})
        folder = save_state(tmp_path / "s-state", st)
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "l.safetensors").st_mode & 0o777) == want_file
    assert (os.stat(tmp_path / "t.txt").st_mode & 0o777) == want_file
    assert (os.stat(folder).st_mode & 0o777) == want_dir
    assert {os.stat(p).st_mode & 0o777 for p in folder.iterdir()} == {want_file}
    assert atomic._UMASK != 0o022 or want_file == 0o644


def test_state_save_on_a_full_disk_keeps_the_previous_state(tmp_path, monkeypatch):
    from lorakit.train import state as S

    st = S.TrainState(network={"a": torch.ones(3)}, optimizer={"state": {}, "param_groups": []}, scheduler={},
                      scaler=None, rng=S.capture_rng(), generators={},
                      counters={"epoch": 1, "batch": 0, "global_step": 5})
    folder = S.save_state(tmp_path / "run-state", st)

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"\0" * 10)
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(S.torch, "save", full)
    monkeypatch.setattr(atomic, "free_bytes", lambda folder: 0)
    with pytest.raises(UserError, match=r"the disk holding .* is full"):
        S.save_state(folder, st)
    monkeypatch.undo()
    assert S.load_state(folder).counters["global_step"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["run-state"]  # no temporary folder left


# ---- resume states --------------------------------------------------------------------------------------------
@pytest.fixture
def saved_state(tmp_path):
    from lorakit.adapters.network import create_network
    from lorakit.train import state as S
    from test_train_common import tiny

    torch.manual_seed(0)
    net = create_network(tiny("sd1"), "networks.lora", 2, 2, {}, train_text_encoder=False)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    st = S.TrainState(network={k: v.detach().clone() for k, v in net.state_dict().items()}, optimizer=opt.state_dict(),
                      scheduler={}, scaler=None, rng=S.capture_rng(), generators={},
                      counters={"epoch": 1, "batch": 2, "global_step": 2}, options={"network_dim": 2})
    return S.save_state(tmp_path / "run-state", st), net, opt


@pytest.mark.parametrize("variant,match", [
    ("missing", r"missing optimizer.pt.*Resume from another state folder"),
    ("truncated", r"optimizer.pt is damaged or incomplete \(RuntimeError: PytorchStreamReader"),
    ("garbage", r"training.pt is damaged or incomplete"),
    ("empty-json", r"train_state.json is damaged or incomplete"),
    ("json-no-counters", r"train_state.json is damaged or incomplete \(KeyError"),
    ("network-cut", r"network.safetensors is damaged or incomplete"),
    ("network-nan", r"network.safetensors holds NaN/inf weights"),
    ("pickle-with-code", r"training.pt holds Python objects .* not loaded"),
    ("not-a-folder", r"no such state folder"),
])
def test_broken_state_folders(saved_state, variant, match):
    from safetensors.torch import load_file, save_file

    from lorakit.train.state import load_state

    folder = saved_state[0]
    if variant == "missing":
        (folder / "optimizer.pt").unlink()
    elif variant == "truncated":
        data = (folder / "optimizer.pt").read_bytes()
        (folder / "optimizer.pt").write_bytes(data[: len(data) // 2])
    elif variant == "garbage":
        (folder / "training.pt").write_bytes(os.urandom(3000))
    elif variant == "empty-json":
        (folder / "train_state.json").write_text("", encoding="utf-8")
    elif variant == "json-no-counters":
        (folder / "train_state.json").write_text(json.dumps({"version": 1}), encoding="utf-8")
    elif variant == "network-cut":
        (folder / "network.safetensors").write_bytes((folder / "network.safetensors").read_bytes()[:50])
    elif variant == "network-nan":
        sd = load_file(str(folder / "network.safetensors"))
        next(v for k, v in sd.items() if k.endswith("lora_up.weight"))[0, 0] = float("nan")
        save_file(sd, str(folder / "network.safetensors"))
    elif variant == "pickle-with-code":
        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {folder}/pwned",))

        torch.save({"scheduler": Evil()}, folder / "training.pt")
    elif variant == "not-a-folder":
        shutil.rmtree(folder)
        folder.write_text("x")
    with pytest.raises(UserError, match=match) as info:
        load_state(folder)
    assert f"--resume {folder}" in str(info.value)
    assert not (folder.parent / "pwned").exists() and not (Path(str(folder)) / "pwned").exists()


def test_state_from_another_network_or_optimizer(saved_state):
    from lorakit.adapters.network import create_network
    from lorakit.train.state import check_state_matches, load_state
    from test_train_common import tiny

    folder, net, opt = saved_state
    st = load_state(folder)
    check_state_matches(st, net, folder, opt)  # the same network: fine
    other = create_network(tiny("sd1"), "networks.lora", 3, 3, {}, train_text_encoder=False)
    with pytest.raises(UserError, match=r"has shape \(2, .*\), this run's \(3, .*network_dim 2.*same --network_dim"):
        check_state_matches(st, other, folder)
    with_te = create_network(tiny("sd1"), "networks.lora", 2, 2, {})
    with pytest.raises(UserError, match=r"saved from a different network \(\d+ tensors there, \d+ in this run"):
        check_state_matches(st, with_te, folder)
    sgd = torch.optim.SGD([{"params": list(net.parameters())[:3]}, {"params": list(net.parameters())[3:]}], lr=1)
    with pytest.raises(UserError, match="optimizer state has parameter groups"):
        check_state_matches(st, net, folder, sgd)


# ---- NaN / inf ------------------------------------------------------------------------------------------------
def test_finite_checks():
    from lorakit.utils.finite import check_lora_finite, nonfinite_names, tensor_is_finite

    big = torch.full((10,), 3e38)  # the float32 sum overflows, the values are finite
    assert tensor_is_finite(big) and tensor_is_finite(torch.tensor([1, 2])) and tensor_is_finite(torch.zeros(0))
    assert not tensor_is_finite(torch.tensor([1.0, float("inf")], dtype=torch.float16))
    assert not tensor_is_finite(torch.tensor([7e4]), max_abs=65504.0)
    sd = {"lora_unet_a.lora_up.weight": torch.ones(2, 2),
          "lora_unet_b.lora_down.weight": torch.tensor([[float("nan")]]),
          "lora_te_c.alpha": torch.tensor(float("-inf"))}
    assert nonfinite_names(sd.items()) == ["lora_unet_b.lora_down.weight", "lora_te_c.alpha"]
    with pytest.raises(UserError, match=r"LoRA file x.safetensors holds NaN/inf values in lora_unet_b \(and 1 more\)"):
        check_lora_finite(sd, "x.safetensors")


def test_merge_into_model_never_writes_nan(tmp_path):
    from safetensors.torch import save_file

    from lorakit.models.saving import save_single_file
    from lorakit.tools.lora_merge import LoraSpec, merge_into_model
    from test_train_common import tiny

    b = tiny("sd1")
    save_single_file(b, tmp_path / "m.safetensors")
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    w = b.unet.down_blocks[0].attentions[0].proj_in.weight
    rank = 1
    huge = {f"{name}.lora_down.weight": torch.full((rank, w.shape[1]), 1e3),
            f"{name}.lora_up.weight": torch.full((w.shape[0], rank), 1e3), f"{name}.alpha": torch.tensor(1.0)}
    save_file(huge, str(tmp_path / "huge.safetensors"))
    # finite in fp32, but 1e6 per weight does not fit fp16
    with pytest.raises(UserError, match=r"would hold NaN/inf or beyond 65504 .*unet\..*proj_in.*nothing was written"):
        merge_into_model(tmp_path / "m.safetensors", [LoraSpec(str(tmp_path / "huge.safetensors"), 1.0)],
                         tmp_path / "out.safetensors", save_precision="fp16", log=None)
    assert not (tmp_path / "out.safetensors").exists() and leftovers(tmp_path) == []


def test_lora_info_reports_rank_mismatch(tmp_path, capsys):
    from safetensors.torch import save_file

    from lorakit.cli.main import main

    save_file({"lora_unet_a_to_q.lora_down.weight": torch.ones(4, 8),
               "lora_unet_a_to_q.lora_up.weight": torch.ones(8, 2),  # rank 2 against 4
               "lora_unet_b_to_k.lora_down.weight": torch.ones(2, 8),
               "lora_unet_b_to_k.lora_up.weight": torch.ones(8, 2)},
              str(tmp_path / "mix.safetensors"))
    rc = main(["lora", "info", str(tmp_path / "mix.safetensors"), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert info["flagged"] == [{"module": "lora_unet_a_to_q", "problem": "up/down ranks differ: lora_up has rank 2, "
                                "lora_down rank 4 (the file is damaged or was edited; it cannot be applied)"}]
