"""The GUI's job queue: tiny training jobs in worker processes, one at a time; stop (SIGINT) saves a state; a job
left "running" by a dead worker is marked interrupted; progress (it/s, ETA, effective lr) from the events file."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorakit.gui.jobs import JobStore, progress_of, write_status

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # tiny models: threads only contend


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train_common import make_images

    from lorakit.models.saving import save_single_file
    from lorakit.models.tiny import tiny_bundle

    root = tmp_path_factory.mktemp("jobs_assets")
    save_single_file(tiny_bundle("sd1", seed=0), root / "tiny.safetensors")
    make_images(root / "train" / "1_zq shape", 2)
    return root


def _options(assets: Path, out: Path, **kw) -> dict:
    return {"pretrained_model_name_or_path": str(assets / "tiny.safetensors"), "train_data_dir": str(assets / "train"),
            "output_dir": str(out), "resolution": "64", "network_dim": 2, "max_data_loader_n_workers": 1, "seed": 1,
            "network_train_unet_only": True, **kw}


def test_queue_runs_one_job_at_a_time(assets, tmp_path):
    store = JobStore(tmp_path / "jobs", env=ENV)
    first = store.submit(_options(assets, tmp_path / "out1", max_train_steps=4, output_name="first",
                                  optimizer_type="Prodigy", learning_rate=1.0))
    second = store.submit(_options(assets, tmp_path / "out2", max_train_steps=2,
                                   train_data_dir=str(tmp_path / "missing")), name="second")
    assert first.state == second.state == "queued"
    assert (first.dir / "config.toml").is_file() and json.loads((first.dir / "job.json").read_text())["kind"] == "train"
    started = store.tick()
    assert started is not None and started.id == first.id and first.state == "running"
    seen_second = set()
    while first.state == "running":
        assert store.tick() is None  # nothing else starts while a worker runs
        seen_second.add(second.state)
        time.sleep(0.2)
    assert seen_second == {"queued"}
    assert store.wait(first, 120) == "done", first.log_tail()
    st = first.status
    assert Path(st["final_lora"]) == tmp_path / "out1" / "first.safetensors" and Path(st["final_lora"]).is_file()
    prog = progress_of(first)
    assert prog.step == prog.max_steps == 4 and prog.steps == [1, 2, 3, 4] and len(prog.loss) == 4
    # Prodigy: the chart shows the step size it takes, d*lr (d starts at d0=1e-6), not the multiplier 1.0
    assert prog.lr_label.startswith("effective") and set(prog.lr) == {"unet"}
    assert all(0 < v < 1e-2 for v in prog.lr["unet"])
    assert any(s.endswith("first.safetensors") for s in prog.saved)
    assert "lorakit train --pretrained_model_name_or_path" in first.log_tail()

    assert store.wait(second, 120) == "failed"  # the next job started after the first, and failed cleanly
    assert "missing" in second.status["error"] and "Traceback" not in second.log_tail()
    assert store.current().id == second.id  # newest when nothing runs


def test_stop_saves_state(assets, tmp_path):
    store = JobStore(tmp_path / "jobs", env=ENV)
    job = store.submit(_options(assets, tmp_path / "out", max_train_steps=5000, output_name="long"))
    store.tick()
    end = time.time() + 90
    while progress_of(job).step < 1:
        assert time.time() < end and job.state == "running", job.log_tail()
        time.sleep(0.2)
    assert store.stop(job) == "stopping"
    assert store.wait(job, 60) == "stopped", job.log_tail()
    st = job.status
    state_dir = Path(st["state_dir"])
    assert state_dir.is_dir() and state_dir.parent == tmp_path / "out" and state_dir.name.endswith("-state")
    assert Path(st["final_lora"]).is_file() and 1 <= st["step"] < 5000
    # a queued job is cancelled without running
    queued = store.submit(_options(assets, tmp_path / "out2", max_train_steps=1))
    assert store.stop(queued) == "cancelled" and queued.state == "cancelled"
    assert store.tick() is None


def test_stale_running_job_is_marked_interrupted(tmp_path):
    store = JobStore(tmp_path / "jobs")
    job = store.submit({"output_dir": str(tmp_path)})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_status(job.dir, state="running", pid=dead.pid, started=time.time())
    alive = store.submit({"output_dir": str(tmp_path)}, name="alive")
    # a live process that is not a lorakit worker (a reused pid) does not count either
    # (its command line may still say "lorakit": a python in ~/lorakit/.venv, as the README's quick start makes)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "/home/me/lorakit/.venv/x"])
    try:
        write_status(alive.dir, state="running", pid=other.pid, started=time.time())
        JobStore(tmp_path / "jobs")  # a restarted server
        assert job.state == "interrupted" and "worker" in job.status["error"]
        assert alive.state == "interrupted"
    finally:
        other.kill()
        other.wait()


def test_progress_rate_eta_and_effective_lr(tmp_path):
    store = JobStore(tmp_path / "jobs")
    job = store.submit({})
    t0 = 1000.0
    lines = [{"event": "start", "max_steps": 100, "num_epochs": 2, "step": 0, "time": t0}]
    for s in range(1, 11):  # 2 steps per second
        lines.append({"event": "step", "step": s, "max_steps": 100, "epoch": 1, "loss": 0.1 * s, "loss_avg": 0.05 * s,
                      "lr": {"unet": 1.0}, "effective_lr": {"unet": 1e-4 * s}, "time": t0 + 0.5 * s})
    lines.append({"event": "sample", "paths": ["/x/a.png"], "time": t0 + 6})
    with open(job.events_path, "w") as fh:
        fh.write("\n".join(json.dumps(x) for x in lines) + "\n" + '{"event": "step", "ste')  # a line being written
    p = progress_of(job)
    assert p.step == 10 and p.max_steps == 100 and p.num_epochs == 2
    assert p.it_per_s == pytest.approx(2.0) and p.eta_s == pytest.approx(45.0)
    assert p.lr_label.startswith("effective") and p.lr["unet"] == pytest.approx([1e-4 * s for s in range(1, 11)])
    assert p.samples == ["/x/a.png"]
    assert "step 10/100" in p.text() and "2.00 it/s" in p.text() and "ETA 0:45" in p.text()
    plain = store.submit({})  # an optimizer with a fixed step size: the lr itself
    plain.events_path.write_text("\n".join(json.dumps({**x, "effective_lr": {}}) for x in lines) + "\n")
    p = progress_of(plain)
    assert p.lr_label == "learning rate" and p.lr == {"unet": [1.0] * 10}


def test_relora_job(assets, tmp_path):
    store = JobStore(tmp_path / "jobs", env=ENV)
    job = store.submit(_options(assets, tmp_path / "unused", max_train_steps=1), name="relora", kind="relora",
                       extra={"output_dir": str(tmp_path / "relora"), "rounds": 2, "learning_rates": [1e-3, 5e-4],
                              "merge_ratio": 1.0})
    assert store.wait(job, 150) == "done", job.log_tail()
    final = Path(job.status["final_model"])
    assert final == tmp_path / "relora" / "round_02" / "relora_r02_merged.safetensors" and final.is_file()
    state = json.loads((tmp_path / "relora" / "relora_state.json").read_text())
    assert [r["learning_rate"] for r in state["completed"]] == [1e-3, 5e-4]
    assert progress_of(job).steps == [1, 1]  # one step per round, both reported
