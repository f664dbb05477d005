"""PaddlePaddle implementation of InternLM-XComposer2 (PaddleMIX-style package)."""

__version__ = "0.1.0"
