import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# OpenMP threads that wait by spinning crawl on a shared, busy machine (tests with 2 threads ran 3x slower);
# read when torch's OpenMP starts, so set before any test imports torch
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
