"""Where lorakit keeps what it can compute again (~/.cache/lorakit, or $LORAKIT_CACHE_DIR), and a fingerprint of the
code that computed it."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lorakit"))


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A digest of lorakit's source files (path, size, modification time), its version and the versions of the
    libraries whose modules it runs: results cached under it are recomputed after any edit or upgrade. Stats, not
    contents: ~200 files in a few milliseconds."""
    from importlib import metadata

    import lorakit

    h = hashlib.sha256(lorakit.__version__.encode())
    for dist in ("torch", "diffusers", "transformers"):
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=none".encode())
    root = Path(lorakit.__file__).parent
    for path in sorted(root.rglob("*.py")):
        st = path.stat()
        h.update(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()
