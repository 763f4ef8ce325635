"""Build lorakit's CLIP BPE data file from the public (MIT) vocabulary published with OpenAI CLIP / open_clip.

We do not depend on open_clip_torch at run time (it pulls a CUDA torchvision). This script downloads its wheel once
with pip (no dependencies), reads `bpe_simple_vocab_16e6.txt.gz`, keeps the 48,894 merges CLIP's tokenizer uses and
writes them to lorakit/models/data/clip_bpe_merges.txt.gz. The vocabulary itself is derived from the merges at load
time (lorakit.models.tokenizer), so only this one file ships.

    python scripts/make_clip_vocab.py [--wheel path/to/open_clip_torch-*.whl]
"""

from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

NUM_MERGES = 49408 - 256 * 2 - 2  # vocab size minus byte tokens, their </w> forms and the two specials
OUT = Path(__file__).resolve().parents[1] / "lorakit" / "models" / "data" / "clip_bpe_merges.txt.gz"


def fetch_wheel(dest: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), "open_clip_torch"],
        check=True,
    )
    return next(dest.glob("open_clip_torch-*.whl"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", type=Path, help="an already downloaded open_clip_torch wheel")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            raw = gzip.decompress(zf.read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode("utf-8")
    lines = raw.split("\n")[1 : NUM_MERGES + 1]  # first line is a version header
    assert len(lines) == NUM_MERGES and all(len(line.split(" ")) == 2 for line in lines)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the file byte-identical across rebuilds.
    with open(OUT, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write("\n".join(lines).encode("utf-8"))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(lines)} merges)")


if __name__ == "__main__":
    main()
