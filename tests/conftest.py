import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# OpenMP threads that wait by spinning crawl on a shared, busy machine (tests with 2 threads ran 3x slower);
# read when torch's OpenMP starts, so set before any test imports torch
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject.toml): one worker per core, at most 4. Most tests run tiny models on one thread, where
    per-op overhead dominates, so a 2-core machine runs two test files at once at nearly twice the speed; each worker
    imports torch, diffusers and transformers once (seconds) and holds a few GB at most, hence the cap."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))



@pytest.fixture(autouse=True, scope="session")
def _session_cache_dir(tmp_path_factory):
    """lorakit's caches (folder scans, traced memory steps) in the session's temporary folder: tests neither read
    what earlier sessions or the user's runs left nor leave anything in ~/.cache."""
    old = os.environ.get("LORAKIT_CACHE_DIR")
    os.environ["LORAKIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("lorakit-cache"))
    yield
    if old is None:
        os.environ.pop("LORAKIT_CACHE_DIR", None)
    else:
        os.environ["LORAKIT_CACHE_DIR"] = old
