"""`python -m lorakit.gui.worker JOB_DIR`: run one GUI job (see lorakit.gui.jobs for the folder layout).

The options come from JOB_DIR/config.toml through the same `lorakit.options` code as `lorakit train --config_file`;
the trainer's progress events go to events.jsonl, its log lines to stdout (the job's log.txt), the outcome to
status.json. SIGINT (the Stop button) makes the trainer save a LoRA and its state and return.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path


def _event_writer(path: Path):
    fh = open(path, "a", encoding="utf-8")

    def on_event(ev: dict) -> None:
        fh.write(json.dumps({**ev, "time": time.time()}, default=str) + "\n")
        fh.flush()

    return on_event, fh


def _log(msg, *a, **k) -> None:
    print(msg, flush=True)


def run_job(job_dir: str | Path) -> int:
    from lorakit import options as O
    from lorakit.errors import UserError
    from lorakit.gui.jobs import read_json, write_status

    job_dir = Path(job_dir)
    info = read_json(job_dir / "job.json", {}) or {}
    kind = info.get("kind", "train")
    on_event, fh = _event_writer(job_dir / "events.jsonl")
    try:
        from lorakit.train.trainer import train

        config = O.load_config_file(job_dir / "config.toml")
        if kind == "relora":
            from lorakit.gui.forms import command_args
            from lorakit.tools.relora import relora

            extra = info.get("extra", {})
            import shlex

            argv = command_args(config)
            print(shlex.join(["lorakit", "lora", "relora", "--output_dir", extra["output_dir"], "--", *argv]),
                  flush=True)

            def train_fn(opts, log=_log):
                return train(opts, log=log, progress=False, on_event=on_event)

            state = relora(argv, extra["output_dir"], extra.get("rounds"), extra.get("learning_rates"),
                           float(extra.get("lr_decay", 0.5)), float(extra.get("merge_ratio", 1.0)),
                           extra.get("save_precision"), log=_log, train_fn=train_fn)
            done = [r for r in state["completed"] if r.get("merged_model")]
            final = done[-1]["merged_model"] if len(done) == state["rounds"] else None
            write_status(job_dir, state="done" if final else "stopped", finished=time.time(),
                         final_model=final, rounds_done=len(done))
            return 0
        opts = O.resolve_given({}, config=config)
        import shlex

        from lorakit.gui.forms import command_args

        print(shlex.join(["lorakit", "train", *command_args(config)]), flush=True)
        result = train(opts, log=_log, progress=False, on_event=on_event)
        if result.interrupted:
            write_status(job_dir, state="stopped", finished=time.time(), step=result.global_step,
                         final_lora=str(result.final_lora) if result.final_lora else None,
                         state_dir=str(result.states[-1]) if result.states else None)
            return 130
        write_status(job_dir, state="done", finished=time.time(), step=result.global_step,
                     final_lora=str(result.final_lora), saved=[str(p) for p in result.saved],
                     samples=[str(p) for p in result.samples])
        return 0
    except UserError as exc:
        print(f"lorakit: error: {exc}", flush=True)
        write_status(job_dir, state="failed", finished=time.time(), error=str(exc))
        return 2
    except KeyboardInterrupt:  # stopped before the training loop (model loading): nothing to save yet
        print("lorakit: stopped before training started", flush=True)
        write_status(job_dir, state="stopped", finished=time.time(), error="stopped before the first step")
        return 130
    except BaseException as exc:  # noqa: BLE001 - the traceback goes to the log, a one-line reason to the page
        traceback.print_exc()
        write_status(job_dir, state="failed", finished=time.time(), error=f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        fh.close()


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m lorakit.gui.worker JOB_DIR", file=sys.stderr)
        return 2
    from lorakit.utils.collector import paused_start_up

    with paused_start_up():  # as `lorakit train`: no cycle collection during start-up (the trainer resumes it)
        return run_job(argv[0])


if __name__ == "__main__":
    sys.exit(main())
