"""Multi-process training (what `accelerate launch`/torchrun start): 2 CPU processes over gloo share the batches and
end with identical LoRA weights."""

import hashlib
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from test_train_common import dataset, one_thread, options  # noqa: F401


def _worker(rank, world, port, tmp, data, queue):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pathlib import Path

    import torch.distributed as dist
    from lorakit.models.tiny import tiny_bundle
    from lorakit.train.trainer import train

    opts = options(Path(tmp), data, "--max_train_steps", "2", "--learning_rate", "1e-3", "--network_train_unet_only",
                   "--save_every_n_steps", "1", "--save_state")
    result = train(opts, bundle=tiny_bundle("sd1"), progress=False, log=lambda *a: None)
    h = hashlib.sha256()
    for k, v in sorted(result.network.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().numpy().tobytes())
    queue.put((rank, h.hexdigest(), result.global_step, result.losses, str(result.final_lora)))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_cpu_processes_gloo(tmp_path):
    data = dataset(tmp_path, n_train=4)  # 4 batches: 2 optimizer steps of 2 processes x 1 batch
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path), data, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(queue.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (r0, h0, s0, l0, f0), (r1, h1, s1, l1, f1) = got
    assert h0 == h1  # gradients were all-reduced: both processes hold the same weights
    assert s0 == s1 == 2 and l0 != l1  # each process saw its own batches
    assert os.path.exists(f0)  # only rank 0 writes files
    # the state holds both processes' noise generators (for an exact multi-process resume)
    from lorakit.train.state import load_state

    st = load_state(os.path.join(tmp_path, "out", "last-step00000001-state"))
    assert len(st.generators["per_rank"]) == 2 and len(st.rng["per_rank"]) == 2
