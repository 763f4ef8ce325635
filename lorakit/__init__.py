"""lorakit: the Stable Diffusion LoRA workflow in one toolkit."""

__version__ = "0.1.0"

from lorakit.utils.quiet import quiet_library_startup as _quiet  # noqa: E402  (logging only: stays cheap)

_quiet()  # before diffusers imports bitsandbytes: no alarming hub/download lines in an offline tool
