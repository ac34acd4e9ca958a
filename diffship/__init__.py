"""diffship: Stable Diffusion pipelines in, validated deployment artifacts out."""

__version__ = "0.1.0"
