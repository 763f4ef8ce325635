"""Exact resume: N steps + state + stop + resume + N steps == 2N uninterrupted steps, bit for bit (CPU)."""

import torch

from test_train_common import dataset, one_thread, options, read_lora, run  # noqa: F401

# caption shuffle, buckets of two shapes, flips, noise tricks and dropout all draw random numbers
COMMON = ["--shuffle_caption", "--keep_tokens", "1", "--enable_bucket", "--min_bucket_reso", "64",
          "--max_bucket_reso", "128", "--flip_aug", "--noise_offset", "0.05", "--multires_noise_iterations", "2",
          "--ip_noise_gamma", "0.05", "--network_dropout", "0.1", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1",
          "--max_train_steps", "4", "--network_dim", "2"]


def _check_resume(tmp_path, *opt_args):
    data = dataset(tmp_path, n_train=3, sizes=((64, 64), (128, 64), (64, 128)))
    full = run(options(tmp_path / "a", data, *COMMON, *opt_args))
    stopped = run(options(tmp_path / "b", data, *COMMON, *opt_args), stop_after_step=2)
    assert stopped.interrupted and stopped.global_step == 2 and stopped.states
    state = stopped.states[-1]
    assert state.name == "last-step00000002-state"
    resumed = run(options(tmp_path / "b", data, *COMMON, *opt_args, "--resume", str(state)))
    assert resumed.global_step == 4 and len(resumed.losses) == 2
    assert resumed.losses == full.losses[2:]
    a, md_a = read_lora(full.final_lora)
    b, md_b = read_lora(resumed.final_lora)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert md_b["ss_steps"] == "4"


def test_resume_is_exact_adamw(tmp_path):
    _check_resume(tmp_path, "--optimizer_type", "AdamW", "--learning_rate", "1e-3")
