"""MAR sandbox: masked autoregressive image generation with continuous tokens (MAR + Diffusion Loss)."""

__version__ = "0.1.0"
