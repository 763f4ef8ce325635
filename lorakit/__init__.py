"""lorakit: the Stable Diffusion LoRA workflow in one toolkit."""

__version__ = "0.1.0"

from lorakit.utils.quiet import quiet_library_startup as _quiet  # noqa: E402  (logging only: stays cheap)

_quiet()  # before diffusers imports bitsandbytes: no alarming hub/download lines in an offline tool

from lorakit.utils.allocator import prefer_huge_pages as _huge_pages  # noqa: E402  (ctypes, os, sys only)

_huge_pages()  # before torch's first large allocation (utils/allocator.py says why)
