"""The GUI's training jobs: one folder per job, one worker process at a time, state kept on disk.

    <jobs_dir>/<YYYYmmdd-HHMMSS>-<name>-<id>/
        job.json      kind ("train" | "relora"), name, created, extra arguments
        config.toml   the training options, in `lorakit train --config_file` format
        status.json   {"state": queued|running|done|stopped|failed|cancelled|interrupted, "pid", "started", ...}
                      written atomically (lorakit.utils.atomic)
        log.txt       the worker's stdout and stderr
        events.jsonl  the trainer's progress events (trainer.train(on_event=...)), one JSON object per line + "time"
        stop          present once a stop was asked for

Everything the page shows is read from these files, so a browser refresh (or a restarted server) finds the running
job again. The worker runs in its own session: a job survives the server; on start, a job still marked running whose
process is gone is marked "interrupted". Stop sends SIGINT: the trainer saves a LoRA and its state at the next step.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import UserError
from lorakit.utils.atomic import write_text_atomic

DEFAULT_JOBS_DIR = Path("~/.lorakit/jobs")
ACTIVE = ("queued", "running")
FINAL = ("done", "stopped", "failed", "cancelled", "interrupted")


def read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def write_status(job_dir: Path, **changes) -> dict:
    """Merge `changes` into status.json (atomically)."""
    status = read_json(job_dir / "status.json", {}) or {}
    status.update(changes)
    write_text_atomic(job_dir / "status.json", json.dumps(status, indent=1, default=str))
    return status


def pid_alive(pid: int | None) -> bool:
    """The process exists and (where /proc tells) is a lorakit worker, not a reused pid."""
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{int(pid)}/cmdline")
    if cmdline.exists():
        try:
            args = cmdline.read_bytes().decode("utf-8", "replace").split("\0")
        except OSError:
            return True
        # the worker's own module argument: "lorakit" anywhere would also match a python inside a lorakit/.venv
        if "lorakit.gui.worker" not in args:
            return False
        stat = Path(f"/proc/{int(pid)}/stat")
        try:  # a zombie (exited, not yet reaped) is not running
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        except (OSError, IndexError):
            pass
    return True


@dataclass
class Job:
    dir: Path

    @property
    def id(self) -> str:
        return self.dir.name

    @property
    def info(self) -> dict:
        return read_json(self.dir / "job.json", {}) or {}

    @property
    def status(self) -> dict:
        return read_json(self.dir / "status.json", {}) or {}

    @property
    def state(self) -> str:
        return self.status.get("state", "unknown")

    @property
    def config_path(self) -> Path:
        return self.dir / "config.toml"

    @property
    def log_path(self) -> Path:
        return self.dir / "log.txt"

    @property
    def events_path(self) -> Path:
        return self.dir / "events.jsonl"

    def options(self) -> dict:
        from lorakit import options as O

        return O.load_config_file(self.config_path) if self.config_path.exists() else {}

    def log_tail(self, max_chars: int = 20000) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - max_chars))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""


@dataclass
class Progress:
    """What the page shows, computed from events.jsonl."""
    step: int = 0
    max_steps: int = 0
    epoch: int = 0
    num_epochs: int = 0
    it_per_s: float | None = None
    eta_s: float | None = None
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    loss_avg: list[float] = field(default_factory=list)
    lr: dict[str, list[float]] = field(default_factory=dict)  # effective lr (d*lr) when the optimizer adapts
    lr_label: str = "learning rate"
    val_steps: list[int] = field(default_factory=list)  # validation losses (--validation_split) and their steps
    val_loss: list[float] = field(default_factory=list)
    val_loss_ema: list[float] = field(default_factory=list)  # the EMA weights' (--ema_decay), NaN when absent
    saved: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.step / self.max_steps if self.max_steps else 0.0

    def text(self) -> str:
        if not self.max_steps:
            return "waiting for the first step..."
        parts = [f"step {self.step}/{self.max_steps} ({100 * self.fraction:.0f}%)",
                 f"epoch {self.epoch}/{self.num_epochs}" if self.num_epochs else f"epoch {self.epoch}"]
        if self.it_per_s:
            parts.append(f"{self.it_per_s:.2f} it/s" if self.it_per_s >= 1 else f"{1 / self.it_per_s:.2f} s/it")
        if self.eta_s is not None and self.step < self.max_steps:
            parts.append("ETA " + format_seconds(self.eta_s))
        if self.loss_avg:
            parts.append(f"loss {self.loss_avg[-1]:.4f}")
        return " | ".join(parts)


def format_seconds(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class _EventCache:
    """Reads events.jsonl incrementally (a long run has one line per step)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._files: dict[Path, tuple[int, list[dict]]] = {}

    def read(self, path: Path) -> list[dict]:
        with self._lock:
            offset, events = self._files.get(path, (0, []))
            try:
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    data = fh.read()
            except OSError:
                return list(events)
            end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
            for line in data[:end].splitlines():
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass
            self._files[path] = (offset + end, events)
            return list(events)


_EVENTS = _EventCache()


def progress_of(job: Job, window: int = 20) -> Progress:
    p = Progress()
    times: list[float] = []
    effective: dict[str, list[float]] = {}
    for ev in _EVENTS.read(job.events_path):
        kind = ev.get("event")
        if kind == "start":
            p.max_steps, p.num_epochs = int(ev.get("max_steps", 0)), int(ev.get("num_epochs", 0))
            p.step = int(ev.get("step", 0))
        elif kind == "step":
            p.step, p.max_steps, p.epoch = int(ev["step"]), int(ev.get("max_steps", p.max_steps)), int(ev.get("epoch", 0))
            p.steps.append(p.step)
            p.loss.append(float(ev.get("loss", float("nan"))))
            p.loss_avg.append(float(ev.get("loss_avg", float("nan"))))
            times.append(float(ev.get("time", 0.0)))
            for k, v in (ev.get("lr") or {}).items():
                p.lr.setdefault(k, []).append(float(v))
            for k, v in (ev.get("effective_lr") or {}).items():
                effective.setdefault(k, []).append(float(v))
        elif kind == "validation":
            if p.val_steps and p.val_steps[-1] == int(ev["step"]):  # epoch and step validation at one step
                continue
            p.val_steps.append(int(ev["step"]))
            p.val_loss.append(float(ev.get("loss", float("nan"))))
            ema = ev.get("loss_ema")
            p.val_loss_ema.append(float("nan") if ema is None else float(ema))
        elif kind == "saved":
            p.saved.append(ev["path"])
        elif kind == "sample":
            p.samples += list(ev.get("paths", []))
    if effective:  # D-Adaptation / Prodigy: the step size is d*lr, the lr itself is a multiplier
        p.lr, p.lr_label = effective, "effective learning rate (d*lr)"
    if len(times) >= 2:
        k = min(window, len(times) - 1)
        dt = times[-1] - times[-1 - k]
        if dt > 0:
            p.it_per_s = (p.steps[-1] - p.steps[-1 - k]) / dt
            p.eta_s = (p.max_steps - p.step) / p.it_per_s if p.it_per_s > 0 else None
    return p


class JobStore:
    """The job folders under `root`, and the queue that runs them one at a time."""

    def __init__(self, root: str | os.PathLike | None = None, python: str | None = None,
                 env: dict[str, str] | None = None):
        self.root = Path(root or DEFAULT_JOBS_DIR).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.python = python or sys.executable
        self.env = dict(env or {})  # extra environment of the workers (e.g. OMP_NUM_THREADS)
        self._lock = threading.RLock()
        self._proc: subprocess.Popen | None = None
        self._proc_job: Job | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.mark_stale()

    # ---- listing ----------------------------------------------------------------------------------------------
    def jobs(self) -> list[Job]:
        """Newest first."""
        out = [Job(p) for p in self.root.iterdir() if p.is_dir() and (p / "status.json").exists()]
        out.sort(key=lambda j: (j.info.get("created", 0), j.id), reverse=True)
        return out

    def get(self, job_id: str) -> Job:
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise UserError(f"No job {job_id!r}.")
        job = Job(self.root / job_id)
        if not (job.dir / "status.json").exists():
            raise UserError(f"No job {job_id!r} in {self.root}.")
        return job

    def current(self) -> Job | None:
        """The running job, else the first queued one, else the newest."""
        jobs = self.jobs()
        for state in ("running", "queued"):
            found = [j for j in jobs if j.state == state]
            if found:
                return found[-1] if state == "queued" else found[0]
        return jobs[0] if jobs else None

    # ---- submitting -------------------------------------------------------------------------------------------
    def submit(self, options: dict[str, Any], name: str | None = None, kind: str = "train",
               extra: dict | None = None) -> Job:
        """Queue a job for these `lorakit train` options ({name: value}, as from a --config_file)."""
        from lorakit.train.config_files import write_toml

        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name or options.get("output_name") or kind)[:40] or kind
        created = time.time()
        job_dir = self.root / f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(created))}-{stem}-{secrets.token_hex(3)}"
        job_dir.mkdir(parents=True)
        write_toml(job_dir / "config.toml", options)
        write_text_atomic(job_dir / "job.json", json.dumps({"kind": kind, "name": stem, "created": created,
                                                            "extra": extra or {}}, indent=1))
        write_status(job_dir, state="queued", queued=created)
        return Job(job_dir)

    # ---- stopping ---------------------------------------------------------------------------------------------
    def stop(self, job: Job) -> str:
        """Queued: cancel it. Running: SIGINT (the trainer saves a LoRA and its state, then exits)."""
        with self._lock:
            st = job.status
            if st.get("state") == "queued":
                write_status(job.dir, state="cancelled", finished=time.time())
                return "cancelled"
            if st.get("state") != "running":
                return st.get("state", "unknown")
            (job.dir / "stop").write_text(str(time.time()))
            pid = st.get("pid")
            if pid_alive(pid):
                try:
                    os.kill(int(pid), signal.SIGINT)
                except ProcessLookupError:
                    pass
            return "stopping"

    # ---- the queue --------------------------------------------------------------------------------------------
    def mark_stale(self) -> list[Job]:
        """Jobs marked running whose worker is gone (server or machine died): state "interrupted"."""
        out = []
        with self._lock:
            for job in self.jobs():
                st = job.status
                if st.get("state") == "running" and not (self._proc_job and self._proc_job.dir == job.dir) \
                        and not pid_alive(st.get("pid")):
                    write_status(job.dir, state="interrupted", finished=time.time(),
                                 error="the worker process ended without reporting (server stopped or process "
                                       "killed); a saved state, if any, is in the output folder")
                    out.append(job)
        return out

    def running(self) -> Job | None:
        with self._lock:
            if self._proc is not None:
                return self._proc_job
            for job in self.jobs():
                if job.state == "running" and pid_alive(job.status.get("pid")):
                    return job  # adopted from an earlier server
            return None

    def tick(self) -> Job | None:
        """Reap the finished worker and start the next queued job when nothing runs. Returns the started job."""
        with self._lock:
            if self._proc is not None:
                rc = self._proc.poll()
                if rc is None:
                    return None
                job = self._proc_job
                self._proc, self._proc_job = None, None
                if job is not None and job.state == "running":  # the worker died before writing its result
                    write_status(job.dir, state="failed", finished=time.time(), returncode=rc,
                                 error=f"the worker exited with status {rc}; see the log")
            self.mark_stale()
            if self.running() is not None:
                return None
            queued = [j for j in self.jobs() if j.state == "queued"]
            if not queued:
                return None
            job = queued[-1]  # oldest first
            log = open(job.log_path, "ab")
            env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
            env.setdefault("HF_HUB_OFFLINE", "1")
            try:
                self._proc = subprocess.Popen([self.python, "-m", "lorakit.gui.worker", str(job.dir)], stdout=log,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                              start_new_session=True)
            finally:
                log.close()
            self._proc_job = job
            write_status(job.dir, state="running", pid=self._proc.pid, started=time.time())
            return job

    def start(self, interval: float = 0.5) -> "JobStore":
        """Run the queue in a daemon thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, args=(interval,), name="lorakit-jobs", daemon=True)
            self._thread.start()
        return self

    def _loop(self, interval: float) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - the queue must keep running; the error goes to the server log
                print(f"lorakit gui: job queue error: {exc}", file=sys.stderr)
            self._stop.wait(interval)

    def shutdown(self, wait: float = 5.0) -> None:
        """Stop the queue thread (running workers keep running; a later server adopts them)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(wait)
            self._thread = None

    def wait(self, job: Job, timeout: float = 120.0, states=FINAL) -> str:
        """Tests and scripts: wait until the job reaches one of `states`."""
        end = time.time() + timeout
        while time.time() < end:
            if self._thread is None:
                self.tick()
            s = job.state
            if s in states:
                return s
            time.sleep(0.2)
        raise TimeoutError(f"job {job.id} still {job.state} after {timeout} s; log:\n{job.log_tail(3000)}")


__all__ = ["Job", "JobStore", "Progress", "progress_of", "write_status", "pid_alive", "format_seconds",
           "DEFAULT_JOBS_DIR", "ACTIVE", "FINAL"]
