"""Python's cycle collector, kept out of a training run's start-up.

Why: importing torch, diffusers and transformers and building the model creates millions of objects that live for the
whole run, and each full collection the allocation count triggers on the way scans every one of them again. Measured
on `lorakit train` (full-size SD1.5, bf16, 2-core CPU, three runs each, interleaved): process start -> first step done
12.4 -> 11.1 s (medians) with the collector off until the loop. Two bursts are handled apart: the memory estimate's
traced steps leave about 530,000 objects of cyclic garbage, which are collected right after it (a scan of only what
came since the objects before it were frozen: 0.5-0.7 s, paid inside the 11.1 s; peak RSS 3.10 -> 3.12 GiB); and
before the loop, what exists is frozen (gc.freeze: a generation the collector never scans) and collection resumes,
so reference cycles made during training are freed as usual. Nothing numeric depends on it.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager

_paused = False


def pause_collector() -> None:
    """Start-up: no cycle collection until resume_collector() (idempotent; leaves a collector someone else turned
    off alone)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


@contextmanager
def paused_start_up():
    """A command's whole job (`lorakit train`, the GUI's worker): paused from here; the trainer resumes collection
    before its loop, and this resumes it in any case when the job ends (an error, --estimate_memory)."""
    pause_collector()
    try:
        yield
    finally:
        resume_collector()


@contextmanager
def garbage_collected():
    """A burst of short-lived objects during a paused start-up (the memory estimate's traced steps, several with
    --auto_fit): what exists before it is frozen, and the cyclic garbage it leaves is collected after it by a scan of
    only what came since - instead of frozen for the run with the model. Does nothing when not paused."""
    if _paused:
        gc.freeze()
    try:
        yield
    finally:
        if _paused:
            gc.collect()


def resume_collector() -> None:
    """Freeze what exists and collect again, if pause_collector() turned the collector off (idempotent)."""
    global _paused
    if _paused:
        gc.freeze()
        gc.enable()
        _paused = False
