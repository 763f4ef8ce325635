"""The one map from dtype names (as options, CLI flags and metadata spell them) to torch dtypes."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def dtype_named(name: str | None, default: torch.dtype | None = None) -> torch.dtype | None:
    """The dtype a name means (case-insensitive), or `default` for None and names that are no dtype (--mixed_precision
    "no" means full precision)."""
    if name is None:
        return default
    return DTYPES.get(str(name).lower(), default)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype linear/conv ops will run in: autocast's when it is on (torch >= 2.4 API), else x's."""
    kind = x.device.type
    if hasattr(torch, "get_autocast_dtype") and kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype
