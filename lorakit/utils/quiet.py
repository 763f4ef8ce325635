"""Silence library start-up lines that read as errors in an offline tool that never downloads.

diffusers imports bitsandbytes when it is installed; on CPUs with AVX512-BF16, bitsandbytes then asks the `kernels`
package for an optional 4-bit kernel on the Hugging Face Hub, which (offline, as lorakit always is) logs two warnings
about a hub and a download. lorakit never uses 4-bit matmuls, so those two records are dropped; every other record of
those loggers passes. The filters sit on the loggers by name, so they work before the libraries are imported.
"""

from __future__ import annotations

import logging

# (logger name, text that marks the record) of the lines dropped
_DROPPED = (
    ("bitsandbytes.backends.cpu.ops", "kernels-community"),
    ("kernels._internals.hf_hub", "publisher trust check"),
)


class _DropText(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return self.text not in record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is not ours to judge
            return True


def quiet_library_startup() -> None:
    """Install the filters once (idempotent)."""
    for name, text in _DROPPED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropText) and f.text == text for f in logger.filters):
            logger.addFilter(_DropText(text))


__all__ = ["quiet_library_startup"]
