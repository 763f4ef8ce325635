"""Exact resume with a D-Adaptation optimizer, from a state saved by --save_every_n_steps --save_state."""

import torch

from test_train_common import dataset, one_thread, options, read_lora, run  # noqa: F401
from test_train_resume import COMMON


def test_resume_is_exact_dadaptation(tmp_path):
    data = dataset(tmp_path, n_train=3, sizes=((64, 64), (128, 64), (64, 128)))
    args = [*COMMON, "--optimizer_type", "DAdaptAdam", "--learning_rate", "1.0", "--network_train_unet_only",
            "--save_every_n_steps", "2", "--save_state"]
    full = run(options(tmp_path / "a", data, *args))
    state = tmp_path / "a" / "out" / "last-step00000002-state"
    assert state in full.states and (tmp_path / "a" / "out" / "last-step00000002.safetensors").exists()
    resumed = run(options(tmp_path / "b", data, *args, "--resume", str(state)))
    assert resumed.losses == full.losses[2:]
    a, _ = read_lora(full.final_lora)
    b, md = read_lora(resumed.final_lora)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert md["ss_optimizer"].startswith("dadaptation.dadapt_adam.DAdaptAdam")
