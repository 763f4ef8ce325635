"""Reading checkpoint files safely and lazily.

`.safetensors` are memory-mapped and read tensor by tensor. `.ckpt`/`.pt`/`.pth`/`.bin` go through torch's
weights-only unpickler, which never runs code from the file; the only non-tensor globals allowed are the harmless ones
that real SD checkpoints carry (a PyTorch Lightning callback record, numpy scalars).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path
from typing import Iterator

import torch

from lorakit.errors import UserError

SAFETENSORS_EXT = (".safetensors", ".sft")
PICKLE_EXT = (".ckpt", ".pt", ".pth", ".bin")


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class _LightningCheckpointRecord:
    """Stand-in for pytorch_lightning's ModelCheckpoint callback state found in SD1 .ckpt files (data only)."""

    def __setstate__(self, state):
        self.state = state


def _safe_globals() -> list:
    import numpy as np

    allowed: list = [(_LightningCheckpointRecord, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")]
    try:
        from numpy.core.multiarray import scalar  # noqa: F401  (numpy<2 name, still pickled by old files)

        allowed.append((scalar, "numpy.core.multiarray.scalar"))
    except ImportError:
        pass
    allowed.append(np.dtype)
    allowed.extend(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32"))
    return allowed


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """(tensor index, metadata) of a safetensors file, reading only its header."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            (n,) = struct.unpack("<Q", raw_len)
            if n > 100_000_000:
                raise ValueError("header length is implausible")
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        raise UserError(f"file {path} does not exist.") from None
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not a valid .safetensors file ({exc}); the download may be incomplete.") from None
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata


class StateSource:
    """Uniform, lazy access to the tensors of a checkpoint file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            from lorakit.models.paths import missing_model_error  # names no flag: several commands come here

            raise missing_model_error(path, what="model file")
        ext = self.path.suffix.lower()
        self.metadata: dict[str, str] = {}
        self._dict: dict[str, torch.Tensor] | None = None
        self._st = None
        self._buffer: bytearray | None = None  # reused by converted reads (_scratch)
        if ext in SAFETENSORS_EXT:
            index, self.metadata = read_safetensors_header(self.path)
            self._shapes = {k: tuple(v["shape"]) for k, v in index.items()}
            self._dtypes = {k: v["dtype"] for k, v in index.items()}
            self._offsets = {k: tuple(v["data_offsets"]) for k, v in index.items()}
            with open(self.path, "rb") as fh:
                self._data_start = 8 + struct.unpack("<Q", fh.read(8))[0]
            self._st = open(self.path, "rb")  # noqa: SIM115 - kept open while the source lives
        elif ext in PICKLE_EXT:
            self._dict = load_pickle_checkpoint(self.path)
            self._shapes = {k: tuple(v.shape) for k, v in self._dict.items()}
            self._dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in self._dict.items()}
        else:
            raise UserError(f"{self.path}: unsupported model file type {ext!r}; use .safetensors, .ckpt, or a diffusers folder.")

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...] | None:
        return self._shapes.get(key)

    def dtype_name(self, key: str) -> str | None:
        return self._dtypes.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `key`. With `dtype`, a floating-point tensor stored in another dtype may come back converted
        to it (a safetensors file's: read into a reused buffer and converted from there); callers still convert
        what they get (a no-op when it already is `dtype`)."""
        if self._st is not None:
            return self._read_safetensors_tensor(key, dtype)
        return self._dict[key]

    def _read_safetensors_tensor(self, key: str, want: torch.dtype | None = None) -> torch.Tensor:
        # Plain reads instead of mmap: pages of a memory-mapped file count towards RSS until unmapped, which would
        # add the whole file size to peak memory while loading.
        dtype = _ST_DTYPES.get(self._dtypes[key])
        if dtype is None:
            raise UserError(f"{self.path}: tensor {key} has unsupported dtype {self._dtypes[key]}.")
        begin, end = self._offsets[key]
        shape = self._shapes[key]
        if end == begin:
            return torch.empty(shape, dtype=want if want is not None and dtype.is_floating_point else dtype)
        convert = want is not None and want != dtype and dtype.is_floating_point
        # Converted tensors are read into one buffer reused for the whole file: a fresh buffer per tensor is
        # zero-filled and page-faulted only to be dropped after the conversion (0.25-0.4 s of a 2 GB fp16 -> bf16
        # load here). Tensors kept as stored own their fresh buffer.
        buf = self._scratch(end - begin) if convert else bytearray(end - begin)
        self._st.seek(self._data_start + begin)
        if self._st.readinto(buf) != end - begin:
            raise UserError(f"{self.path} is truncated: tensor {key} is cut short. Download the file again.")
        tensor = torch.frombuffer(buf, dtype=dtype).reshape(shape)
        return tensor.to(want) if convert else tensor

    def _scratch(self, size: int) -> memoryview:
        if self._buffer is None or len(self._buffer) < size:
            self._buffer = bytearray(size)
        return memoryview(self._buffer)[:size]

    def close(self) -> None:
        self._buffer = None
        if self._st is not None:
            self._st.close()
            self._st = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def release(self, key: str) -> None:
        """Drop a tensor we have consumed, so a pickled checkpoint is not held twice in memory."""
        if self._dict is not None:
            self._dict.pop(key, None)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self.keys():
            yield k, self.get(k)


def load_pickle_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A .ckpt/.pt state dict through the weights-only unpickler; code inside the pickle is refused, never run."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        detail = str(exc).split("\n")[0]
        raise UserError(
            f"{path} was refused: its pickle asks to run or import code that a model file never needs ({detail}). "
            "lorakit loads .ckpt files with a weights-only unpickler so a malicious file cannot execute anything. "
            "If you trust the file, convert it to .safetensors with a tool you trust, or get a .safetensors release."
        ) from None
    except (EOFError, OSError, RuntimeError, ValueError) as exc:
        raise UserError(f"{path} cannot be read as a PyTorch checkpoint ({type(exc).__name__}: {exc}).") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors.")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
