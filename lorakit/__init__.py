"""lorakit: the Stable Diffusion LoRA workflow in one toolkit."""

__version__ = "0.1.0"
