"""Per-step randomness as a pure function of (seed, epoch, index).

Every random choice the dataset makes (bucket order, shuffles inside buckets, caption shuffle/dropout, flips, crops,
colour jitter, random reg draws) takes a fresh numpy Generator from `rng_for(seed, stream, *keys)`. Nothing depends on
global random state or on how many batches were drawn before, so a trainer resuming at batch k of epoch e sees the
same batches as an uninterrupted run.
"""

from __future__ import annotations

import numpy as np

# stream ids: keep them stable, a change alters every seeded run
EPOCH_ORDER = 1  # order of batches in an epoch
BUCKET_SHUFFLE = 2  # order of samples inside a bucket
REG_DRAW = 3  # random reg sampling
VALIDATION_SPLIT = 4  # which images validation_split holds out
CAPTION = 10
FLIP = 11
CROP = 12
COLOR = 13
FACE = 14


def rng_for(seed: int, stream: int, *keys: int) -> np.random.Generator:
    """A Generator seeded from (seed, stream, keys...); all must be ints >= 0 (seed is reduced mod 2**64)."""
    entropy = [int(seed) % (1 << 64), int(stream)] + [int(k) for k in keys]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
